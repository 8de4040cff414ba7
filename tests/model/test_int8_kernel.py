"""The compiled int8 matmul kernel (model/int8_matmul.cc via jax.ffi): equal to XLA's int8
path on every instruction set this CPU has, tails, batches, vmap and gradients; used by
`int8_matmul` only where it should be; and the XLA fallback without it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxlm.model.int8 as int8
from flaxlm.infer import LLM, SamplingParams
from flaxlm.model import FlaxlmError, cpu_kernels, int8_kernel
from flaxlm.model.sharding import make_mesh, use_sharding

# The instruction sets this CPU runs: the portable code always, then AVX2, then AVX-512.
ORDER = ["portable", "avx2", "avx512"]
VARIANTS = ORDER[:ORDER.index(int8_kernel.best_variant() or "portable") + 1]


def _operands(m, k, n, groups, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32))
    q = jnp.asarray(rng.integers(-127, 128, (n, k), dtype=np.int8))
    scale = jnp.asarray(rng.uniform(0.001, 0.01, (n, groups)).astype(np.float32))
    return x, q, scale


def _assert_equal_to_float_rounding(got, x, q, scale):
    """|got - XLA| within float32 summation error: K eps sum_k |x_k w_k| (any order)."""
    want = np.asarray(int8._fused_matmul(x, q, scale))
    w = np.abs(np.asarray(int8.dequantize(q, scale)))
    bound = x.shape[1] * 2.0 ** -24 * (np.abs(np.asarray(x)) @ w.T)
    assert got.shape == want.shape
    assert np.all(np.abs(np.asarray(got) - want) <= bound), np.abs(np.asarray(got) - want).max()


def test_library_is_built():
    assert cpu_kernels.LIBRARY.exists(), "run `make kernels`"
    assert int8_kernel.enabled() and int8_kernel.best_variant() in ORDER


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("m", [1, 3, 32])
@pytest.mark.parametrize("k, n, groups", [(67, 37, 1), (96, 37, 3), (60, 9, 3), (35, 5, 1)],
                         ids=["per-channel", "q8_0-blocks", "groups-of-20", "short-rows"])
def test_kernel_equals_xla_path(variant, m, k, n, groups):
    """Odd K tests the vector tails; q8_0-blocks
    (K / 32 groups) scales each weight before its product, per-channel the sum; groups of
    20 (not a power of two) take the portable loop inside the vector variants."""
    x, q, scale = _operands(m, k, n, groups)
    for threads in (1, 0):
        run = jax.jit(lambda x, q, s: int8_kernel.int8_matmul(x, q, s, variant=variant,
                                                              max_threads=threads))
        _assert_equal_to_float_rounding(run(x, q, scale), x, q, scale)


@pytest.mark.parametrize("k, n, groups", [(576, 1536, 18), (577, 1531, 1)])
def test_kernel_shares_large_weights_between_threads(k, n, groups):
    """~880k weights: ~27 chunks of rows (the last one short) taken by the caller's thread
    and a helper on XLA's pool."""
    x, q, scale = _operands(2, k, n, groups)
    _assert_equal_to_float_rounding(jax.jit(int8_kernel.int8_matmul)(x, q, scale), x, q, scale)


def test_kernel_under_vmap():
    x, q, scale = _operands(3, 64, 24, 2)
    xs = jnp.stack([x, 2 * x, -x])                                   # [3, M, K]
    qs = jnp.stack([q, -q, q // 2])                                  # [3, N, K]
    shared = jax.vmap(int8_kernel.int8_matmul, in_axes=(0, None, None))(xs, q, scale)
    for i in range(3):
        _assert_equal_to_float_rounding(shared[i], xs[i], q, scale)
    per_row = jax.jit(jax.vmap(int8_kernel.int8_matmul, in_axes=(0, 0, None)))(xs, qs, scale)
    for i in range(3):
        _assert_equal_to_float_rounding(per_row[i], xs[i], qs[i], scale)


def test_kernel_gradients_equal_xla():
    x, q, scale = _operands(4, 64, 24, 2)
    cotangent = jnp.asarray(np.random.default_rng(3).standard_normal((4, 24)), jnp.float32)

    def loss(matmul):
        return jax.grad(lambda x, s: jnp.sum(matmul(x, q, s) * cotangent), argnums=(0, 1))

    got = loss(int8_kernel.int8_matmul)(x, scale)
    want = loss(int8._fused_matmul)(x, scale)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


def _uses_kernel(x, q, scale) -> bool:
    # A new function each time: jit would reuse a trace made under other settings.
    program = jax.jit(lambda x, q, s: int8.int8_matmul(x, q, s))
    return int8_kernel.TARGET in program.lower(x, q, scale).as_text()


def test_int8_matmul_uses_the_kernel_only_where_it_should(monkeypatch):
    x, q, scale = _operands(1, 64, 24, 1)
    assert _uses_kernel(x, q, scale)
    assert _uses_kernel(jnp.ones((2, 8, 64)), q, scale)  # 16 rows
    assert not _uses_kernel(jnp.ones((int8_kernel.MAX_ROWS + 1, 64)), q, scale)  # prefill
    assert not _uses_kernel(x.astype(jnp.bfloat16), q, scale)
    # GSPMD would all-gather a custom call's sharded weights: sharded programs keep XLA's path.
    with use_sharding(make_mesh({"tensor": 2}, jax.devices()[:2])):
        assert not _uses_kernel(x, q, scale)
    monkeypatch.setenv("FLAXLM_INT8_KERNEL", "0")
    assert not _uses_kernel(x, q, scale)


def test_falls_back_to_xla_without_the_library(monkeypatch, tmp_path):
    x, q, scale = _operands(1, 64, 24, 1)
    monkeypatch.setattr(cpu_kernels, "LIBRARY", tmp_path / "missing.so")
    cpu_kernels.library.cache_clear()
    try:
        assert not int8_kernel.enabled() and int8_kernel.best_variant() is None
        assert not _uses_kernel(x, q, scale)
        _assert_equal_to_float_rounding(int8.int8_matmul(x, q, scale), x, q, scale)
        with pytest.raises(FlaxlmError, match="make kernels"):
            int8_kernel.int8_matmul(x, q, scale)
    finally:
        monkeypatch.undo()
        cpu_kernels.library.cache_clear()
    assert int8_kernel.enabled()


def test_bad_operands_name_the_problem():
    x, q, scale = _operands(1, 64, 24, 1)
    with pytest.raises(FlaxlmError, match="x float32, q int8"):
        int8_kernel.int8_matmul(x.astype(jnp.bfloat16), q, scale)


def test_int8_model_generates_the_same_tokens_with_and_without_the_kernel(tiny_hf, monkeypatch):
    _, directory = tiny_hf("llama-gqa", 1)
    llm = LLM.load(directory, quantize="int8")
    prompts = [[5, 9, 13, 2], [7, 7, 1, 30, 31, 8, 99]]
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    step = jax.jit(lambda ids: llm.model(ids))
    assert int8_kernel.TARGET in step.lower(jnp.zeros((1, 1), jnp.int32)).as_text()
    with_kernel = [r.token_ids for r in llm.generate(prompts, params)]
    monkeypatch.setenv("FLAXLM_INT8_KERNEL", "0")
    jax.clear_caches()
    assert int8_kernel.TARGET not in step.lower(jnp.zeros((1, 1), jnp.int32)).as_text()
    without = [r.token_ids for r in LLM.load(directory, quantize="int8").generate(prompts, params)]
    assert with_kernel == without
