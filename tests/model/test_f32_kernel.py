"""The compiled float32 matmul kernel (model/f32_matmul.cc via jax.ffi): equal to the exact
product within float32 summation error on every instruction set this CPU has (vector
tails, row bands, column blocks, threads), differentiable, under vmap; used by `Einsum`
only where it should be; the same greedy tokens as XLA's dots; XLA's path without it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxlm.infer import LLM, SamplingParams
from flaxlm.model import FlaxlmError, cpu_kernels, f32_kernel
from flaxlm.model.layers import Einsum
from flaxlm.model.sharding import make_mesh, use_sharding

# The instruction sets this CPU runs: the portable code always, then AVX2, then AVX-512.
ORDER = ["portable", "avx2", "avx512"]
VARIANTS = ORDER[:ORDER.index(f32_kernel.best_variant() or "portable") + 1]


def _operands(m, k, n, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((k, n)).astype(np.float32))
    return x, w


def _assert_within_float_rounding(got, x, w):
    """|got - x @ w| <= K eps sum_k |x_k w_k|: what float32 sums in any order satisfy
    (XLA's dot as well, checked alongside); a lost or doubled band of rows is far off."""
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    bound = x.shape[1] * 2.0 ** -24 * (np.abs(x64) @ np.abs(w64))
    for result in (np.asarray(got), np.asarray(jnp.matmul(x, w))):
        assert result.shape == bound.shape
        assert np.all(np.abs(result - x64 @ w64) <= bound), np.abs(result - x64 @ w64).max()


def test_library_is_built():
    assert cpu_kernels.LIBRARY.exists(), "run `make kernels`"
    assert f32_kernel.best_variant() in ORDER


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("k, n", [(67, 37), (9, 5), (577, 1531), (40, 8195), (0, 5)],
                         ids=["odd", "short", "threads", "column-blocks", "empty"])
def test_kernel_equals_the_product(variant, m, k, n):
    """odd: vector tails (N % 16, N % 8) and row tails (K % 8); threads: ~880k weights
    in 14 bands of 42 rows shared by the caller's thread and a helper; column-blocks: N
    above 8192 splits each band of rows in two; empty: K = 0 gives zeros."""
    x, w = _operands(m, k, n)
    for threads in (1, 0):
        run = jax.jit(lambda x, w: f32_kernel.f32_matmul(x, w, variant=variant,
                                                         max_threads=threads))
        _assert_within_float_rounding(run(x, w), x, w)


def test_kernel_gradients_equal_xla():
    x, w = _operands(4, 48, 20)
    cotangent = jnp.asarray(np.random.default_rng(3).standard_normal((4, 20)), jnp.float32)

    def grads(matmul):
        return jax.grad(lambda x, w: jnp.sum(matmul(x, w) * cotangent), argnums=(0, 1))(x, w)

    for g, want in zip(grads(f32_kernel.f32_matmul), grads(jnp.matmul)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_kernel_under_vmap():
    x, w = _operands(3, 64, 24)
    xs = jnp.stack([x, 2 * x, -x])                                   # [3, M, K]
    ws = jnp.stack([w, -w, w / 2])                                   # [3, K, N]
    shared = jax.vmap(f32_kernel.f32_matmul, in_axes=(0, None))(xs, w)
    per_row = jax.jit(jax.vmap(f32_kernel.f32_matmul))(xs, ws)
    for i in range(3):
        _assert_within_float_rounding(shared[i], xs[i], w)
        _assert_within_float_rounding(per_row[i], xs[i], ws[i])


def _projection(dtype=jnp.float32, param_dtype=jnp.float32):
    """A q-projection [embed 64] -> [heads 4, head_dim 8], as the decoder builds it."""
    return Einsum("btd,dnh->btnh", (64, 4, 8), ("embed", "heads", "head_dim"), fan_in=64,
                  dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))


def _uses_kernel(proj, x) -> bool:
    # A new function each time: jit would reuse a trace made under other settings.
    program = jax.jit(lambda x: proj(x))
    return f32_kernel.TARGET in program.lower(x).as_text()


def test_einsum_uses_the_kernel_only_where_it_should(monkeypatch):
    proj = _projection()
    x = jnp.ones((1, 1, 64))
    assert _uses_kernel(proj, x)                                      # batch-1 decode
    assert _uses_kernel(proj, jnp.ones((2, 8, 64)))                   # 16 rows
    assert not _uses_kernel(proj, jnp.ones((1, f32_kernel.MAX_ROWS + 1, 64)))  # prefill
    assert not _uses_kernel(_projection(jnp.bfloat16, jnp.bfloat16), x)
    assert not _uses_kernel(_projection(jnp.float32, jnp.bfloat16), x)  # bf16 weight cast up
    # GSPMD would all-gather a custom call's sharded weights: sharded programs keep XLA's dot.
    with use_sharding(make_mesh({"tensor": 2}, jax.devices()[:2])):
        assert not _uses_kernel(proj, x)
    monkeypatch.setenv("FLAXLM_F32_KERNEL", "0")
    assert not _uses_kernel(proj, x)


def test_einsum_with_the_kernel_equals_xla_and_differentiates(monkeypatch):
    graphdef, state = nnx.split(_projection())
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 3, 64)), jnp.float32)

    def loss(x, state):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x)))

    program = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    assert f32_kernel.TARGET in program.lower(x, state).as_text()
    got = program(x, state)
    monkeypatch.setenv("FLAXLM_F32_KERNEL", "0")
    want = jax.value_and_grad(loss, argnums=(0, 1))(x, state)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


def test_falls_back_to_xla_without_the_library(monkeypatch, tmp_path):
    proj, x = _projection(), jnp.ones((1, 1, 64))
    monkeypatch.setattr(cpu_kernels, "LIBRARY", tmp_path / "missing.so")
    cpu_kernels.library.cache_clear()
    try:
        assert not f32_kernel.enabled() and f32_kernel.best_variant() is None
        assert not _uses_kernel(proj, x)
        with pytest.raises(FlaxlmError, match="make kernels"):
            f32_kernel.f32_matmul(*_operands(1, 8, 4))
    finally:
        monkeypatch.undo()
        cpu_kernels.library.cache_clear()
    assert f32_kernel.enabled()


def test_bad_operands_name_the_problem():
    x, w = _operands(2, 8, 4)
    with pytest.raises(FlaxlmError, match="x float32 \\[M, K\\] and w float32 \\[K, N\\]"):
        f32_kernel.f32_matmul(x.astype(jnp.bfloat16), w)
    with pytest.raises(FlaxlmError, match=r"\(2, 8\).*\(4, 8\)"):
        f32_kernel.f32_matmul(x, w.T)


def test_model_generates_the_same_tokens_with_and_without_the_kernel(tiny_hf, monkeypatch):
    _, directory = tiny_hf("llama-gqa", 1)
    llm = LLM.load(directory)
    prompts = [[5, 9, 13, 2], [7, 7, 1, 30, 31, 8, 99]]
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    step = jax.jit(lambda ids: llm.model(ids))
    ids = jnp.asarray([[5, 9, 13]], jnp.int32)
    assert f32_kernel.TARGET in step.lower(ids).as_text()
    logits = step(ids)
    with_kernel = [r.token_ids for r in llm.generate(prompts, params)]
    monkeypatch.setenv("FLAXLM_F32_KERNEL", "0")
    jax.clear_caches()
    assert f32_kernel.TARGET not in step.lower(ids).as_text()
    np.testing.assert_allclose(np.asarray(step(ids)), np.asarray(logits), rtol=1e-5, atol=1e-5)
    without = [r.token_ids for r in LLM.load(directory).generate(prompts, params)]
    assert with_kernel == without
