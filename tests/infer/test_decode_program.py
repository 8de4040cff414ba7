"""The KV cache is written in place: the compiled decode loop holds no copy of a
cache-sized buffer (read from the optimized HLO, so no timing is involved)."""

import re

import jax
import jax.numpy as jnp
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
