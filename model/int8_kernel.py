"""flaxlm's int8 matmul kernel for XLA:CPU (model/int8_matmul.cc), called through jax.ffi.

    y [M, N] float32 = x [M, K] float32 @ (q [N, K] int8 * scale [N, G]).T

XLA:CPU converts int8 to float at ~12 GB/s and never fuses the convert into its dot, so
its int8 path (`flaxlm.model.int8`) can stream weights at most ~1.1x faster than float32.
The kernel reads each int8 weight once and converts it in registers (AVX-512, AVX2+FMA
or portable code, chosen at run time), splitting the output rows over XLA's CPU thread
pool. `flaxlm.model.int8.int8_matmul` uses it for few rows (batch-1 decode): see
`use_kernel`.

`make kernels` (part of `make setup`) builds it into model/_cpu_kernels.so
(`flaxlm.model.cpu_kernels`). Without the library (no compiler, a failed build), or with
the environment variable FLAXLM_INT8_KERNEL=0, int8 matmuls take the XLA path.
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

TARGET = "flaxlm_int8_matmul"
# Rows of x up to which the kernel beats XLA's blocked convert+dot (decode, small
# batches); prefill's GEMMs stay in XLA. Measured with scripts/bench_int8_matmul.py.
MAX_ROWS = 16


def best_variant() -> str | None:
    """The instruction set the kernel runs on this CPU, or None without the library."""
    return cpu_kernels.best_variant(TARGET)


def enabled() -> bool:
    """The library is loaded and FLAXLM_INT8_KERNEL is not "0"."""
    return (os.environ.get("FLAXLM_INT8_KERNEL", "1") != "0"
            and cpu_kernels.library() is not None)


def use_kernel(x: jax.Array, q: jax.Array) -> bool:
    """Whether the CPU branch of `int8_matmul(x, q, ...)` should call the kernel: float32
    activations with at most MAX_ROWS rows, and no mesh (a custom call's operands would be
    all-gathered by GSPMD; sharded programs keep XLA's partitioned dot)."""
    rows = math.prod(x.shape[:-1])
    return (x.dtype == jnp.float32 and q.ndim == 2 and rows <= MAX_ROWS
            and mesh_size() == 1 and enabled())


def int8_matmul(x: jax.Array, q: jax.Array, scale: jax.Array, *, variant: str = "auto",
                max_threads: int = 0) -> jax.Array:
    """x [M, K] float32, q int8 [N, K], scale float32 [N, G] -> [M, N] float32, on CPU.

    `variant` forces an instruction set ("portable", "avx2", "avx512"; an error if the
    CPU lacks it), `max_threads` caps the threads (0: XLA's pool size). Differentiable in
    x and scale (the backward pass is XLA's); under vmap, unbatched operands broadcast.
    """
    if cpu_kernels.library() is None:
        raise FlaxlmError(f"the int8 CPU kernel is not built ({cpu_kernels.LIBRARY}); "
                          "run `make kernels`")
    if (x.dtype, q.dtype, scale.dtype) != (jnp.float32, jnp.int8, jnp.float32):
        raise FlaxlmError(f"int8 kernel: needs x float32, q int8, scale float32 "
                          f"(got {x.dtype}, {q.dtype}, {scale.dtype})")
    return _matmul(x, q, scale, cpu_kernels.VARIANTS[variant], max_threads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _matmul(x, q, scale, variant, max_threads):
    out = jax.ShapeDtypeStruct((*x.shape[:-1], q.shape[-2]), jnp.float32)
    call = jax.ffi.ffi_call(TARGET, out, vmap_method="expand_dims")
    return call(x, q, scale, variant=np.int32(variant), max_threads=np.int32(max_threads))


def _matmul_fwd(x, q, scale, variant, max_threads):
    return _matmul(x, q, scale, variant, max_threads), (x, q, scale)


def _matmul_bwd(variant, max_threads, residuals, g):
    x, q, scale = residuals

    def reference(x, scale):  # XLA's formulation of the same product
        n, k = q.shape
        w = q.reshape(n, scale.shape[1], -1).astype(jnp.float32) * scale[:, :, None]
        return x @ w.reshape(n, k).T

    dx, dscale = jax.vjp(reference, x, scale)[1](g)
    return dx, np.zeros(q.shape, jax.dtypes.float0), dscale


_matmul.defvjp(_matmul_fwd, _matmul_bwd)
