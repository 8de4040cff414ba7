"""flaxlm's float32 matmul kernel for few rows on XLA:CPU (model/f32_matmul.cc), via jax.ffi."""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.model import int8_kernel
from flaxlm.model.errors import FlaxlmError
from flaxlm.model.sharding import mesh_size

TARGET = "flaxlm_f32_matmul"
LAYOUTS = {"kn": 0, "nk": 1}
VARIANTS = {"auto": 0, "portable": 1, "avx512": 3}
MAX_ROWS = 16


@functools.cache
def _library():
    lib = int8_kernel._library()
    if lib is None or not hasattr(lib, "FlaxlmF32Matmul"):
        return None
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.FlaxlmF32Matmul), platform="cpu")
    return lib


def enabled() -> bool:
    return os.environ.get("FLAXLM_F32_KERNEL", "1") != "0" and _library() is not None


def use_kernel(x, w) -> bool:
    rows = math.prod(x.shape[:-1])
    return (x.dtype == jnp.float32 and w.dtype == jnp.float32 and w.ndim == 2
            and rows <= MAX_ROWS and mesh_size() == 1 and enabled())


def f32_matmul(x, w, *, layout="kn", variant="auto", max_threads=0):
    if _library() is None:
        raise FlaxlmError("the float32 CPU kernel is not built; run `make kernels`")
    return _matmul(x, w, LAYOUTS[layout], VARIANTS[variant], max_threads)


def _reference(x, w, layout):
    return x @ w if layout == 0 else x @ w.T


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _matmul(x, w, layout, variant, max_threads):
    n = w.shape[1] if layout == 0 else w.shape[0]
    out = jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32)
    call = jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")
    return call(x, w, layout=np.int32(layout), variant=np.int32(variant),
                max_threads=np.int32(max_threads))


def _matmul_fwd(x, w, layout, variant, max_threads):
    return _matmul(x, w, layout, variant, max_threads), (x, w)


def _matmul_bwd(layout, variant, max_threads, residuals, g):
    x, w = residuals
    return jax.vjp(lambda x, w: _reference(x, w, layout), x, w)[1](g)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def best_variant():
    lib = _library()
    if lib is None:
        return None
    number = lib.flaxlm_f32_matmul_best_variant()
    return next(name for name, v in VARIANTS.items() if v == number)
