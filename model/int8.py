"""Int8 weights, numerically: quantize, dequantize, GGUF Q8_0 blocks, and the matmul.

An int8 weight is a kernel `q` int8 [N, K] stored output-major (one row per
output channel, like HF's [out, in] and GGUF's rows) and float32 scales
[N, G]: row n is split into G groups of K // G consecutive inputs and
w[n, k] = q[n, k] * scale[n, k // (K // G)]. G = 1 is symmetric per-output-
channel quantization (what `quantize_rows` makes); GGUF Q8_0 tensors keep
their own blocks, G = K / 32.

The matmul never builds a float copy of a whole weight. On XLA:CPU it walks
the output rows in blocks: each block is converted to float into a buffer
that stays in cache and multiplied there; the block size is measured on the CPU
at first use (`flaxlm.model.int8_blocks`). scripts/bench_int8_matmul.py measures
this against the alternatives: converting the whole weight first, or a dot
that takes int8 directly, are 5-20x slower than the float32 dot they
replace. With few rows (decode) on CPU it calls the compiled kernel of
`flaxlm.model.int8_kernel` instead, which converts in registers. Other backends get
the plain `dot(x, q.astype(...)) * scale`, whose convert XLA:GPU fuses into the dot.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.model import int8_blocks, int8_kernel
from flaxlm.model.errors import CheckpointError

Q8_0_BLOCK = 32                  # values per GGUF Q8_0 block
_Q8_0_BYTES = 2 + Q8_0_BLOCK     # float16 scale, then 32 int8 values


def quantize_rows(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric per-row int8: w [N, K] float -> (q int8 [N, K], scale float32 [N, 1]).

    scale = max |w[n]| / 127 (1 for an all-zero row), q = round(w / scale), so
    |w - q * scale| <= scale / 2 elementwise.
    """
    w = jnp.asarray(w, jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=1, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return q, scale


def dequantize(q: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
    """q int8 [N, K], scale [N, G] -> w [N, K] in `dtype`."""
    n, k = q.shape
    groups = scale.shape[1]
    w = q.reshape(n, groups, k // groups).astype(jnp.float32) * scale[:, :, None]
    return w.reshape(n, k).astype(dtype)


def q8_0_to_int8(data: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """GGUF Q8_0 rows, uint8 [N, K / 32 * 34], -> (q int8 [N, K], scale float32 [N, K / 32])."""
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] % _Q8_0_BYTES:
        raise CheckpointError(f"tensor {name}: not Q8_0 rows (got {data.dtype} {data.shape}, "
                              f"expected uint8 rows of {_Q8_0_BYTES}-byte blocks)")
    blocks = data.reshape(data.shape[0], -1, _Q8_0_BYTES)
    scale = blocks[:, :, :2].copy().view(np.float16)[:, :, 0].astype(np.float32)
    q = blocks[:, :, 2:].copy().view(np.int8).reshape(data.shape[0], -1)
    return q, scale


def int8_matmul(x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    """x [..., K] float, q int8 [N, K], scale [N, G] -> x @ w.T [..., N] float32."""
    rows = math.prod(x.shape[:-1])
    kernel = int8_kernel.use_kernel(x, q)  # then no block size is needed (or measured)
    return _int8_matmul(x, q, scale, 0 if kernel else int8_blocks.block_bytes(rows), kernel)


# Jitted, so that a model called eagerly compiles each weight shape's matmul once instead of
# tracing the per-platform choice and the block loop again at every call (inside a jitted
# program it is inlined). The block size and the kernel choice are arguments, read when called.
@functools.partial(jax.jit, static_argnums=(3, 4))
def _int8_matmul(x: jax.Array, q: jax.Array, scale: jax.Array, block_bytes: int,
                 kernel: bool = False) -> jax.Array:
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    blocked = functools.partial(_blocked_matmul, block_bytes=block_bytes)
    cpu = int8_kernel.int8_matmul if kernel else blocked  # few rows: the compiled kernel
    y = jax.lax.platform_dependent(x2, q, scale, cpu=cpu, default=_fused_matmul)
    return y.reshape(*lead, q.shape[0])


def _block_product(x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    """x [M, K] @ (q [R, K] * scale [R, G]).T -> [M, R] float32, one block."""
    dims = (((1,), (1,)), ((), ()))
    if scale.shape[1] == 1:  # per-channel: scale the R outputs, not the R * K weights
        y = jax.lax.dot_general(x, q.astype(x.dtype), dims, preferred_element_type=jnp.float32)
        return y * scale[:, 0]
    return jax.lax.dot_general(x, dequantize(q, scale, x.dtype), dims,
                               preferred_element_type=jnp.float32)


def _fused_matmul(x, q, scale):
    return _block_product(x, q, scale)


def block_rows(n: int, k: int, block_bytes: int) -> int:
    """Rows per converted block: the largest divisor of n whose float block fits
    `block_bytes`, or the byte budget itself when n has no divisor near it."""
    target = max(1, min(block_bytes // (4 * k), n // 2))
    divisor = max(d for d in range(1, target + 1) if n % d == 0)
    return divisor if 2 * divisor >= target else target


def _cpu_block_product(x, q, scale):
    # The barrier makes the block's conversion wait for x, so XLA cannot schedule
    # the conversions of many weights early and hold their float copies at once.
    x, q = jax.lax.optimization_barrier((x, q))
    return _block_product(x, q, scale)


def _blocked_matmul(x, q, scale, block_bytes):
    n, k = q.shape
    rows = block_rows(n, k, block_bytes)
    if rows == n:
        return _cpu_block_product(x, q, scale)
    full = n // rows * rows

    def body(i, y):
        start = i * rows
        q_block = jax.lax.dynamic_slice_in_dim(q, start, rows)
        s_block = jax.lax.dynamic_slice_in_dim(scale, start, rows)
        return jax.lax.dynamic_update_slice_in_dim(
            y, _cpu_block_product(x, q_block, s_block), start, axis=1)

    y = jax.lax.fori_loop(0, n // rows, body, jnp.zeros((x.shape[0], n), jnp.float32))
    if full == n:
        return y
    tail = _cpu_block_product(x, q[full:], scale[full:])
    return jax.lax.dynamic_update_slice_in_dim(y, tail, full, axis=1)
