"""flaxlm's float32 matmul kernel for few rows on XLA:CPU (model/f32_matmul.cc), via jax.ffi.

    y [M, N] float32 = x [M, K] float32 @ w [K, N] float32

At batch-1 decode every projection is a matrix-vector product bound by reading its
weight. XLA:CPU runs each as one dot split over its threads; the kernel hands bands of
the weight's rows to whichever thread asks next, so a helper thread that wakes late
costs little (AVX-512, AVX2+FMA or portable code, chosen at run time). `matmul` uses it
for few rows (decode, small batches) on CPUs with AVX-512: see `use_kernel`, `enabled`.
The tied LM head ([vocab, embed], `Embedder.attend`) stays XLA's: its 113 MB
matrix-vector product is as fast there (docs/benchmarks.md).

Built by `make kernels` into model/_cpu_kernels.so (`flaxlm.model.cpu_kernels`).
Without the library, or with the environment variable FLAXLM_F32_KERNEL=0, float32
projections are XLA's dots.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.model import cpu_kernels
from flaxlm.model.errors import FlaxlmError
from flaxlm.model.sharding import mesh_size

TARGET = "flaxlm_f32_matmul"
# Rows of x up to which the kernel beats XLA's dot on SmolLM2's projections (at 32 it
# loses: the GEMM is no longer bound by reading the weight). scripts/bench_f32_matmul.py.
MAX_ROWS = 16


def best_variant() -> str | None:
    """The instruction set the kernel runs on this CPU, or None without the library."""
    return cpu_kernels.best_variant(TARGET)


def enabled() -> bool:
    """The library is loaded, this CPU runs its AVX-512 code, and FLAXLM_F32_KERNEL is not
    "0". The AVX2 and portable code is tested but not chosen by itself: on the Xeon it was
    measured on, AVX2 code ran 0.98x XLA's (AVX-512) dots at batch 1, and no AVX2-only
    CPU has measured it yet (scripts/bench_f32_matmul.py, column `kernel`)."""
    return os.environ.get("FLAXLM_F32_KERNEL", "1") != "0" and best_variant() == "avx512"


def use_kernel(x: jax.Array, w: jax.Array) -> bool:
    """Whether `matmul(x, w)` calls the kernel on CPU: float32 x with at most MAX_ROWS
    rows, a float32 2-D w, and no mesh (GSPMD would all-gather a custom call's sharded
    operands; sharded programs keep XLA's partitioned dot)."""
    rows = math.prod(x.shape[:-1])
    return (x.dtype == jnp.float32 and w.dtype == jnp.float32 and x.ndim == w.ndim == 2
            and rows <= MAX_ROWS and mesh_size() == 1 and enabled())


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [M, K] @ w [K, N]: the kernel on CPU where `use_kernel` says so, else XLA's dot."""
    if not use_kernel(x, w):
        return jnp.matmul(x, w)
    return jax.lax.platform_dependent(x, w, cpu=f32_matmul, default=jnp.matmul)


def f32_matmul(x: jax.Array, w: jax.Array, *, variant: str = "auto",
               max_threads: int = 0) -> jax.Array:
    """x [M, K] float32 @ w [K, N] float32 -> [M, N] float32, on CPU.

    `variant` forces an instruction set ("portable", "avx2", "avx512"; an error if the
    CPU lacks it), `max_threads` caps the threads (0: XLA's pool size). Differentiable
    (the backward pass is XLA's); under vmap, one call per batch element.
    """
    if cpu_kernels.library() is None:
        raise FlaxlmError(f"the float32 CPU kernel is not built ({cpu_kernels.LIBRARY}); "
                          "run `make kernels`")
    if (x.dtype, w.dtype) != (jnp.float32, jnp.float32) or x.ndim != 2 or w.ndim != 2 \
            or x.shape[1] != w.shape[0]:
        raise FlaxlmError(f"float32 kernel: needs x float32 [M, K] and w float32 [K, N] "
                          f"(got {x.dtype} {x.shape}, {w.dtype} {w.shape})")
    return _matmul(x, w, cpu_kernels.VARIANTS[variant], max_threads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(x, w, variant, max_threads):
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32)
    call = jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")
    return call(x, w, variant=np.int32(variant), max_threads=np.int32(max_threads))


def _matmul_fwd(x, w, variant, max_threads):
    return _matmul(x, w, variant, max_threads), (x, w)


def _matmul_bwd(variant, max_threads, residuals, g):
    x, w = residuals
    return jax.vjp(jnp.matmul, x, w)[1](g)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)
