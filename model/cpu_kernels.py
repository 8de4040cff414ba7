"""flaxlm's compiled CPU kernels: one library, model/_cpu_kernels.so, built by `make kernels`
(part of `make setup`) from model/int8_matmul.cc and model/f32_matmul.cc with the stock
C++ compiler. Loading it registers its XLA FFI targets for the CPU platform once; without
it (no compiler, a failed build) `library()` is None and every matmul takes XLA's path.
The users are `flaxlm.model.int8_kernel` and `flaxlm.model.f32_kernel`.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

import jax

LIBRARY = Path(__file__).with_name("_cpu_kernels.so")
TARGETS = {"flaxlm_int8_matmul": "FlaxlmInt8Matmul", "flaxlm_f32_matmul": "FlaxlmF32Matmul"}
# Instruction sets by the number the kernels give them (0: the best this CPU runs).
VARIANTS = {"auto": 0, "portable": 1, "avx2": 2, "avx512": 3}

_log = logging.getLogger(__name__)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded library with its FFI targets registered, or None when it is not built."""
    try:
        lib = ctypes.CDLL(str(LIBRARY))
    except OSError as error:
        _log.debug("CPU kernels not loaded (%s); matmuls use XLA's dots", error)
        return None
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform="cpu")
    _log.debug("CPU kernels loaded from %s", LIBRARY)
    return lib


def best_variant(target: str) -> str | None:
    """The instruction set the kernel `target` runs on this CPU (its exported
    `<target>_best_variant`), or None without the library."""
    lib = library()
    if lib is None:
        return None
    number = getattr(lib, f"{target}_best_variant")()
    return next(name for name, v in VARIANTS.items() if v == number)
