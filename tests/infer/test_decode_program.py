"""The KV cache is written in place: the compiled decode loop holds no copy of a
cache-sized buffer (read from the optimized HLO, so no timing is involved)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.infer import LLM, BeamParams, SamplingParams
from flaxlm.infer.beam import beam_programs
from flaxlm.infer.generate import Row, make_batch
from flaxlm.model.cache import KVCache

GREEDY = SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_hf):
    return LLM.load(tiny_hf("llama-gqa", 0)[1])


def cache_sized_copies(hlo: str, cache: KVCache) -> list[str]:
    """Instructions of the HLO text that copy a whole layer's k or v buffer: copies, and
    fusions XLA names after a copy they contain."""
    shape = re.escape("f32[" + ",".join(str(d) for d in cache.layers[0].k.shape) + "]")
    return [line.strip() for line in hlo.splitlines()
            if re.search(rf"= {shape}(\{{[^}}]*\}})? copy(-start)?\(", line)
            or re.search(rf"^\s*(ROOT )?%copy[\w.-]*fusion[\w.-]* = {shape}", line)]


def _loop(llm, lengths):
    rows = [Row(prompt_ids=tuple(range(1, n + 1)), params=GREEDY, eos_ids=()) for n in lengths]
    b = make_batch(rows, llm.config.vocab_size)
    loop = llm.programs.start(b.tokens, b.lengths, b.active, b.sampling, cache_len=b.cache_len,
                              max_new=b.max_new, top_n=b.top_n)
    return loop, b


@pytest.mark.parametrize("lengths", [(7,), (5, 9, 3)])
def test_decode_loop_writes_the_cache_in_place(llm, lengths):
    loop, b = _loop(llm, lengths)
    hlo = llm.programs._run.lower(llm.programs.state, loop, b.sampling, jnp.int32(4),
                                  top_n=0).compile().as_text()
    assert "dynamic-update-slice" in hlo
    assert cache_sized_copies(hlo, loop.cache) == []


def test_beam_search_loop_writes_the_cache_in_place(llm):
    rows = [Row(prompt_ids=(1, 2, 3, 4, 5), params=BeamParams(num_beams=4, max_new_tokens=8),
                eos_ids=(0,))]
    from flaxlm.infer.beam import _start

    state, arrays, _ = _start(llm.programs, rows)
    run = beam_programs(llm.programs)[1]
    hlo = run.lower(llm.programs.state, state, arrays, jnp.int32(4)).compile().as_text()
    assert cache_sized_copies(hlo, state.cache) == []


def test_the_check_sees_copies(llm):
    """Not vacuous: a loop that reads the cache and writes it with nothing ordering the
    two (the write's inputs do not depend on the read) makes XLA copy the whole buffer
    at every step, and the check says so."""
    loop, _ = _loop(llm, (5, 9, 3))
    k = loop.cache.layers[0].k  # [4, kv_heads, slots, head_dim]

    def unordered(k, q):
        def body(i, carry):
            k, q = carry
            read = jnp.einsum("bnh,bnsh->bnh", q, k)  # [4, kv_heads, head_dim]
            new = jnp.full(k.shape[:2] + (1,) + k.shape[3:], 0.5, k.dtype) * i
            k = jax.lax.dynamic_update_slice(k, new, (0, 0, i, 0))
            return k, jnp.tanh(read)
        return jax.lax.fori_loop(0, 3, body, (k, q))

    q = jnp.ones((k.shape[0], k.shape[1], k.shape[3]))
    hlo = jax.jit(unordered, donate_argnums=0).lower(k, q).compile().as_text()
    assert cache_sized_copies(hlo, loop.cache)


def _prefill(llm, cache_len, empty_cache, tokens=None, lengths=None):
    from flaxlm.infer.engine import prefill

    if tokens is None:
        tokens = jnp.array([[5, 6, 7, 8, 9, 10, 0, 0], [11, 12, 13, 0, 0, 0, 0, 0]], jnp.int32)
        lengths = jnp.array([6, 3], jnp.int32)

    def run(state, tokens, lengths):
        from flax import nnx

        model = nnx.merge(llm.programs.graphdef, state)
        cache = KVCache.init(model.config, 2, cache_len)
        return prefill(model, tokens, lengths, cache, empty_cache=empty_cache)

    return jax.jit(run), (llm.programs.state, tokens, lengths)


@pytest.mark.parametrize("family", ["llama-gqa", "gemma3-local-global"])
def test_a_fresh_cache_prefill_is_the_same_without_reading_the_cache(tiny_hf, family):
    """`empty_cache` (start, beam search) skips attention over the cache's slots: the same
    logits and held cache slots bit for bit (sliding windows included; a padding query's
    output, never read, may differ), and a cost
    that no longer grows with the cache's capacity (XLA's own FLOP count; the old path also
    made XLA constant-fold the attention over the zero cache, minutes per program at
    batch 32)."""
    llm = LLM.load(tiny_hf(family, 0)[1])
    fresh, args = _prefill(llm, 64, True)
    full, _ = _prefill(llm, 64, False)
    (c1, l1), (c2, l2) = fresh(*args), full(*args)
    assert jnp.array_equal(l1, l2)
    assert jnp.array_equal(c1.positions, c2.positions) and jnp.array_equal(c1.end, c2.end)
    held = (c1.positions >= 0)[:, None, :, None]  # padding slots are never read
    for a, b in zip(c1.layers, c2.layers):
        assert jnp.array_equal(jnp.where(held, a.k, 0), jnp.where(held, b.k, 0))
        assert jnp.array_equal(jnp.where(held, a.v, 0), jnp.where(held, b.v, 0))

    def flops(cache_len, empty):
        run, args = _prefill(llm, cache_len, empty)
        return run.lower(*args).compile().cost_analysis()["flops"]

    assert flops(512, True) == flops(64, True)
    assert flops(512, False) > flops(64, False)


@pytest.mark.parametrize("family", ["llama-gqa", "gemma3-local-global"])
def test_a_long_fresh_prefill_in_query_blocks_equals_the_full_product(tiny_hf, family):
    """From 256 prompt tokens the fresh-cache prefill attends in causal query blocks
    (`query_blocks`): the same logits and cache as attending over the whole prompt, to
    float32 summation order (rows of 300 and 211 tokens: a short last block, padding), and
    fewer FLOPs."""
    from flaxlm.model import attention

    llm = LLM.load(tiny_hf(family, 0)[1])
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 200, (2, 300)).astype(np.int32)
    tokens[1, 211:] = 0
    tokens, lengths = jnp.asarray(tokens), jnp.array([300, 211], jnp.int32)
    blocked, args = _prefill(llm, 320, True, tokens, lengths)
    (c1, l1) = blocked(*args)
    blocked_flops = blocked.lower(*args).compile().cost_analysis()["flops"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention, "query_blocks", lambda t: ((0, t),))
        whole, _ = _prefill(llm, 320, True, tokens, lengths)
        (c2, l2) = whole(*args)
        whole_flops = whole.lower(*args).compile().cost_analysis()["flops"]
    scale = float(jnp.abs(l2).max())
    np.testing.assert_allclose(l1, l2, rtol=1e-5, atol=1e-5 * scale)
    held = (c1.positions >= 0)[:, None, :, None]
    for a, b in zip(c1.layers, c2.layers):
        for x, y in ((a.k, b.k), (a.v, b.v)):
            x, y = jnp.where(held, x, 0), jnp.where(held, y, 0)
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5 * float(jnp.abs(y).max()))
    assert blocked_flops < whole_flops
