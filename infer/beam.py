"""Beam search with Hugging Face transformers' semantics, as two jit-compiled programs.

`beam_start` prefills each prompt once and copies its cache to K beams (beams
are flattened into the batch: row b * K + k); `beam_run` runs the whole search
in one `lax.while_loop`, reordering the KV cache by beam with a `tree_map`
gather, up to a step limit given as an array (`beam_steps` calls it one step
further each time to inspect the search). Per-request settings (length penalty,
early-stopping mode, min/max new tokens, eos ids) are arrays, so only the number
of beams and the buckets compile.

The rules are those of transformers' `GenerationMixin._beam_search`:

- each step takes log_softmax of the logits (then bans eos before
  `min_new_tokens`), adds each beam's running sum, and looks at the K * V
  continuations of a prompt;
- the K best continuations that do not end (eos, or the last allowed token)
  become the running beams; among the K best continuations overall, those that
  end are candidate hypotheses, scored `sum_logprobs / generated_len **
  length_penalty` (prompt excluded), and the K best of the finished set plus the
  candidates are kept, best first;
- a prompt is done when its finished set cannot change any more: with
  `early_stopping=True` once K hypotheses finished; otherwise once HF's
  heuristic says the best running beam cannot beat the worst finished one
  (scored at the current length, or at `max_new_tokens` for "never" with a
  positive length penalty); and at `max_new_tokens`, where the K best
  continuations finish whether or not they end in eos.

Scores are float32 and the masks are HF's additive -1e9, so the same float
operations make the same choices.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from flaxlm.infer.engine import Programs, decode_step, prefill, virtual_tokens
from flaxlm.infer.generate import BatchTiming, Completion, Row, make_batch
from flaxlm.infer.sampling import (MAX_LOGPROBS, _check_float, _check_ids, _check_int,
                                   check_early_stopping, eos_table)
from flaxlm.infer.text import TextStream
from flaxlm.model.cache import KVCache, LayerCache
from flaxlm.model.decoder import Decoder
from flaxlm.model.errors import ConfigError
from flaxlm.model.tokenizer import Tokenizer

NEG = -1.0e9  # HF's additive mask for continuations that may not be chosen
EARLY_STOPPING = {False: 0, True: 1, "never": 2}


# ------------------------------------------------------------------ settings


@dataclasses.dataclass(frozen=True)
class BeamParams:
    """The settings of a beam search (HF `generate(num_beams=K, do_sample=False)`).

    Deterministic: hypotheses are ranked by the model's log-probabilities, nothing is
    drawn. `num_return_sequences` best hypotheses are returned, each scored
    `sum_logprobs / generated_len ** length_penalty`; eos (unless `ignore_eos`) and
    `stop_token_ids` end a hypothesis.
    """

    num_beams: int = 4
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never", as in HF
    num_return_sequences: int = 1
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    prompt_logprobs: int | None = None  # None: none; k >= 0: each prompt token's, plus top-k

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("num_beams", _check_int("num_beams", self.num_beams, low=1))
        set_("max_new_tokens", _check_int("max_new_tokens", self.max_new_tokens, low=1))
        set_("min_new_tokens", _check_int("min_new_tokens", self.min_new_tokens, 0,
                                          self.max_new_tokens))
        set_("length_penalty", _check_float("length_penalty", self.length_penalty,
                                            np.isfinite, "finite"))
        set_("early_stopping", check_early_stopping(self.early_stopping))
        returned = _check_int("num_return_sequences", self.num_return_sequences, low=1)
        if returned > self.num_beams:
            raise ConfigError(f"num_return_sequences={returned} must be <= "
                              f"num_beams={self.num_beams}")
        set_("stop_token_ids", _check_ids("stop_token_ids", self.stop_token_ids))
        if not isinstance(self.ignore_eos, (bool, np.bool_)):
            raise ConfigError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        set_("ignore_eos", bool(self.ignore_eos))
        if self.prompt_logprobs is not None:
            set_("prompt_logprobs", _check_int("prompt_logprobs", self.prompt_logprobs, 0,
                                               MAX_LOGPROBS))

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ConfigError if a stop token id is outside the vocabulary."""
        for i in self.stop_token_ids:
            if i >= vocab_size:
                raise ConfigError(f"stop_token_ids has token id {i}, outside the vocabulary "
                                  f"({vocab_size})")


# ------------------------------------------------------------------ beam helpers

def flatten_beam_dim(x: jax.Array) -> jax.Array:
    """[batch, beams, ...] -> [batch * beams, ...]"""
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def unflatten_beam_dim(x: jax.Array, num_beams: int) -> jax.Array:
    """[batch * beams, ...] -> [batch, beams, ...]"""
    return x.reshape((x.shape[0] // num_beams, num_beams) + x.shape[1:])


def gather_beams(x: jax.Array, indices: jax.Array) -> jax.Array:
    """x [batch, beams, ...], indices [batch, k] -> [batch, k, ...]: each prompt's chosen beams."""
    return jax.vmap(lambda row, index: row[index])(x, indices)


def gather_cache(cache: KVCache, indices: jax.Array, start: jax.Array, window: int) -> KVCache:
    """The cache with flat beam row r holding row `indices[r]`'s keys and values.

    A prompt's beams share their prompt slots, so only the generated slots
    [start, start + window) of every row (where all rows write, see
    flaxlm.model.cache) are gathered and written back in place (a quarter of the
    cache at 64 new tokens after a 128-token prompt, and 5x faster on XLA:CPU
    than whole rows). `indices` must pick beams of the row's own prompt.
    """
    def reorder(x: jax.Array) -> jax.Array:  # [rows, kv_heads, slots, head_dim]
        generated = jax.lax.dynamic_slice_in_dim(x, start, window, axis=2)
        return jax.lax.dynamic_update_slice_in_dim(x, generated[indices], start, axis=2)

    layers = tuple(LayerCache(k=reorder(c.k), v=reorder(c.v)) for c in cache.layers)
    return cache.replace(layers=layers, lengths=cache.lengths[indices],
                         positions=cache.positions[indices])


def repeat_beams(tree, num_beams: int):
    """Every array [batch, ...] -> [batch * beams, ...], each row repeated for its beams."""
    return jax.tree.map(lambda x: jnp.repeat(x, num_beams, axis=0), tree)


# ------------------------------------------------------------------ settings and state

@struct.dataclass
class BeamArrays:
    """Per-prompt beam settings as arrays (B prompts, E eos ids)."""

    length_penalty: jax.Array  # f32[B]
    early_stopping: jax.Array  # i32[B]: 0 False, 1 True, 2 "never"
    min_new_tokens: jax.Array  # i32[B]
    max_new_tokens: jax.Array  # i32[B]
    eos_ids: jax.Array         # i32[B, E], padded with -1

    @classmethod
    def build(cls, rows: list[Row], vocab_size: int, batch_size: int) -> BeamArrays:
        """Arrays for `rows`, padded to `batch_size` with one-token rows."""
        pad = batch_size - len(rows)

        def column(values, fill, dtype):
            return jnp.asarray(np.array(list(values) + [fill] * pad, dtype))

        params = [r.params for r in rows]
        return cls(
            length_penalty=column((p.length_penalty for p in params), 1.0, np.float32),
            early_stopping=column((EARLY_STOPPING[p.early_stopping] for p in params), 0, np.int32),
            min_new_tokens=column((p.min_new_tokens for p in params), 0, np.int32),
            max_new_tokens=column((p.max_new_tokens for p in params), 1, np.int32),
            eos_ids=jnp.asarray(eos_table([r.eos_ids for r in rows], vocab_size, batch_size)))


@struct.dataclass
class Hypotheses:
    """Up to K finished hypotheses per prompt, best first (HF's `sequences`, `beam_scores`)."""

    scores: jax.Array      # [batch, beams] sum_logprobs / num_tokens ** penalty; NEG: empty
    logprobs: jax.Array    # [batch, beams] sum of the tokens' logprobs
    tokens: jax.Array      # [batch, beams, max_new] generated tokens
    num_tokens: jax.Array  # [batch, beams]
    finished: jax.Array    # [batch, beams] bool: the slot holds a hypothesis


@struct.dataclass
class BeamState:
    """Everything the search loop carries."""

    cache: KVCache          # [batch * beams, ...]
    logits: jax.Array       # [batch * beams, vocab] of the tokens to choose next
    step: jax.Array         # [] tokens generated so far (all prompts step together)
    running_scores: jax.Array  # [batch, beams] running sums of logprobs (HF's running_beam_scores)
    running_tokens: jax.Array  # [batch, beams, max_new]
    hyps: Hypotheses
    improvable: jax.Array   # [batch] bool: HF's is_early_stop_heuristic_unsatisfied
    done: jax.Array         # [batch] bool: the prompt's hypotheses can no longer change
    generated_from: jax.Array  # [] the cache slot where every row's generated tokens start


def _init_state(cache: KVCache, logits: jax.Array, active: jax.Array, num_beams: int,
                max_new: int) -> BeamState:
    batch = active.shape[0]
    shape = (batch, num_beams)
    tokens = jnp.zeros(shape + (max_new,), jnp.int32)
    # Only the first beam is live at the start, so the K beams do not repeat one token.
    running = jnp.zeros(shape, jnp.float32).at[:, 1:].set(NEG)
    hyps = Hypotheses(scores=jnp.full(shape, NEG, jnp.float32),
                      logprobs=jnp.zeros(shape, jnp.float32), tokens=tokens,
                      num_tokens=jnp.zeros(shape, jnp.int32), finished=jnp.zeros(shape, bool))
    return BeamState(cache=cache, logits=logits, step=jnp.zeros((), jnp.int32),
                     running_scores=running, running_tokens=tokens, hyps=hyps,
                     improvable=jnp.ones((batch,), bool), done=~active,
                     generated_from=cache.end)


# ------------------------------------------------------------------ one search step

def _is_eos(tokens: jax.Array, eos_ids: jax.Array) -> jax.Array:
    """tokens [batch, n], eos_ids [batch, E] -> bool [batch, n]."""
    return jnp.any(tokens[:, :, None] == eos_ids[:, None, :], axis=-1)


def _split(index: jax.Array, vocab: int) -> tuple[jax.Array, jax.Array]:
    """Flat continuation index over beams * vocab -> (beam, token)."""
    return index // vocab, index % vocab


def _extend(running_tokens: jax.Array, beam: jax.Array, token: jax.Array, step) -> jax.Array:
    """The chosen beams' tokens [batch, k, max_new] with `token` [batch, k] appended at `step`."""
    return gather_beams(running_tokens, beam).at[:, :, step].set(token)


def _merge(hyps: Hypotheses, new: Hypotheses, keep: jax.Array) -> Hypotheses:
    """The K best of the finished set and the candidates; prompts where `keep` stay as they were."""
    num_beams = hyps.scores.shape[1]
    merged = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=1), hyps, new)
    best = jax.lax.top_k(merged.scores, num_beams)[1]  # [batch, beams]
    chosen = jax.tree.map(lambda x: gather_beams(x, best), merged)
    return jax.tree.map(lambda old, x: jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), old, x),
                        hyps, chosen)


def _finish_candidates(state: BeamState, scores: jax.Array, arrays: BeamArrays,
                       at_limit: jax.Array) -> Hypotheses:
    """Among the K best continuations overall, those that end (eos, or the last token
    allowed) are candidate hypotheses; the others score NEG too. scores [batch, beams, vocab]."""
    batch, num_beams, vocab = scores.shape
    sums, index = jax.lax.top_k(scores.reshape(batch, -1), num_beams)  # [batch, beams]
    beam, token = _split(index, vocab)
    finished = _is_eos(token, arrays.eos_ids) | at_limit[:, None]
    num_tokens = state.step + 1
    penalized = sums / jnp.power(num_tokens.astype(jnp.float32), arrays.length_penalty)[:, None]
    penalized = penalized + (~finished).astype(jnp.float32) * NEG
    return Hypotheses(scores=penalized, logprobs=sums,
                      tokens=_extend(state.running_tokens, beam, token, state.step),
                      num_tokens=jnp.broadcast_to(num_tokens, beam.shape), finished=finished)


def _still_improvable(state: BeamState, arrays: BeamArrays, best_running: jax.Array
                      ) -> jax.Array:
    """HF's early-stop heuristic [batch]: can the best running beam still beat the worst
    finished hypothesis (an empty slot counts as -1e9)?"""
    never_longer = (arrays.early_stopping == EARLY_STOPPING["never"]) & (arrays.length_penalty > 0)
    length = jnp.where(never_longer, arrays.max_new_tokens, state.step).astype(jnp.float32)
    best = best_running / jnp.power(length, arrays.length_penalty)  # [batch]
    hyps = state.hyps
    worst = jnp.where(hyps.finished, hyps.scores.min(axis=1, keepdims=True), NEG)  # [batch, beams]
    return state.improvable & jnp.any(best[:, None] > worst, axis=1)


def search_step(state: BeamState, arrays: BeamArrays, eos_mask: jax.Array) -> BeamState:
    """Choose the next running beams from `state.logits` and update the finished set.

    eos_mask [batch, vocab] bool marks each prompt's eos ids. The cache is reordered
    to the new beams; the caller feeds `state.running_tokens[:, :, step - 1]` to the
    model next.
    """
    batch, num_beams = state.running_scores.shape
    logprobs = jax.nn.log_softmax(state.logits.astype(jnp.float32), axis=-1)
    logprobs = unflatten_beam_dim(logprobs, num_beams)  # [batch, beams, vocab]
    too_short = (state.step < arrays.min_new_tokens)[:, None, None]
    logprobs = jnp.where(too_short & eos_mask[:, None, :], -jnp.inf, logprobs)
    scores = logprobs + state.running_scores[:, :, None]  # [batch, beams, vocab]
    at_limit = state.step + 1 >= arrays.max_new_tokens  # [batch]
    ends = eos_mask[:, None, :] | at_limit[:, None, None]  # [batch, 1, vocab]

    candidates = _finish_candidates(state, scores, arrays, at_limit)
    hyps = _merge(state.hyps, candidates, keep=state.done)

    masked = scores + ends.astype(jnp.float32) * NEG
    running, index = jax.lax.top_k(masked.reshape(batch, -1), num_beams)  # [batch, beams]
    beam, token = _split(index, logprobs.shape[-1])
    rows = (jnp.arange(batch)[:, None] * num_beams + beam).reshape(-1)  # [batch * beams]
    state = state.replace(
        cache=gather_cache(state.cache, rows, state.generated_from,
                           state.running_tokens.shape[2]),
        step=state.step + 1, running_scores=running,
        running_tokens=_extend(state.running_tokens, beam, token, state.step), hyps=hyps)
    # running.max(1) is running[:, 0]; slicing a top_k output makes XLA:CPU sort all K * V.
    improvable = _still_improvable(state, arrays, running.max(axis=1))
    full = (arrays.early_stopping == EARLY_STOPPING[True]) & jnp.all(hyps.finished, axis=1)
    return state.replace(improvable=improvable,
                         done=state.done | ~improvable | full | at_limit)


# ------------------------------------------------------------------ the programs

def beam_start(model: Decoder, tokens: jax.Array, lengths: jax.Array, active: jax.Array, *,
               num_beams: int, cache_len: int, max_new: int) -> BeamState:
    """tokens [batch, seq] right-padded, lengths [batch], active [batch] bool -> the search
    state before its first step: each prompt prefilled once, its cache copied to K beams."""
    batch = tokens.shape[0]
    virtual = virtual_tokens(model)  # soft-prompt slots before each prompt
    cache, logits = prefill(model, tokens, lengths,
                            KVCache.init(model.config, batch, cache_len + virtual).constrained(),
                            empty_cache=True)
    beams = repeat_beams(cache.replace(end=None), num_beams).replace(end=cache.end)
    return _init_state(beams, repeat_beams(logits, num_beams), active, num_beams, max_new)


def beam_run(model: Decoder, state: BeamState, arrays: BeamArrays, limit: jax.Array
             ) -> BeamState:
    """Search steps inside one while_loop until every prompt is done or `limit` tokens
    were generated. The finished hypotheses are `state.hyps` [batch, beams, ...], best first."""
    batch, vocab = arrays.eos_ids.shape[0], model.config.vocab_size
    limit = jnp.minimum(limit, state.running_tokens.shape[2])
    ids = jnp.where(arrays.eos_ids >= 0, arrays.eos_ids, vocab)  # [batch, E]; -1: dropped
    eos_mask = jnp.zeros((batch, vocab), bool).at[jnp.arange(batch)[:, None], ids].set(
        True, mode="drop")  # [batch, vocab]

    def cond(state: BeamState):
        return (state.step < limit) & ~jnp.all(state.done)

    def body(state: BeamState):
        state = search_step(state, arrays, eos_mask)
        next_tokens = flatten_beam_dim(state.running_tokens[:, :, state.step - 1])
        cache, logits = decode_step(model, state.cache, next_tokens)
        return state.replace(cache=cache, logits=logits)

    return jax.lax.while_loop(cond, body, state)


def beam_programs(programs: Programs):
    """The compiled `beam_start` and `beam_run` of `programs`' model, counted with its other
    programs; the state passed to `beam_run` is donated (its cache is updated in place)."""
    start = programs.program("beam_start", beam_start,
                             static_argnames=("num_beams", "cache_len", "max_new"))
    run = programs.program("beam_run", beam_run, donate_argnums=(1,))
    return start, run


# ------------------------------------------------------------------ host side

def _start(programs: Programs, rows: list[Row]) -> tuple[BeamState, BeamArrays, int]:
    """The search state of `rows` (one row per prompt) before its first step, its settings
    as arrays, and the new-token bucket."""
    params = rows[0].params
    if any(not isinstance(r.params, BeamParams) or r.params.num_beams != params.num_beams
           for r in rows):
        raise ConfigError("one beam-search batch needs one BeamParams.num_beams")
    b = make_batch(rows, programs.config.vocab_size)
    start, _ = beam_programs(programs)
    state = start(programs.state, b.tokens, b.lengths, b.active, num_beams=params.num_beams,
                  cache_len=b.cache_len, max_new=b.max_new)
    return state, BeamArrays.build(rows, programs.config.vocab_size, len(b.lengths)), b.max_new


def run_beam_batch(programs: Programs, tokenizer: Tokenizer, rows: list[Row]
                   ) -> tuple[list[list[Completion]], BatchTiming]:
    """Beam search for each row's prompt (one row per prompt); the R best hypotheses of each.

    Nothing is final before the search ends, so the batch's first-token time is its total.
    """
    t0 = time.perf_counter()
    state, arrays, max_new = _start(programs, rows)
    state = beam_programs(programs)[1](programs.state, state, arrays,
                                       jnp.asarray(max_new, jnp.int32))
    hyps, steps = jax.device_get((state.hyps, state.step))
    total = time.perf_counter() - t0
    outputs = [[_completion(tokenizer, hyps, b, k, row)
                for k in range(row.params.num_return_sequences)] for b, row in enumerate(rows)]
    return outputs, BatchTiming(ttft_s=total, total_s=total, max_new_tokens=int(steps))


def beam_steps(programs: Programs, rows: list[Row]) -> Iterator[BeamState]:
    """The search of `run_beam_batch` one step at a time, to inspect its decisions.

    The same compiled programs run: `beam_run` with a limit one step further each
    time, so every step computes what it computes inside one call. Yields a host copy
    of the state (without cache and logits) after each step, until every prompt is done.
    """
    state, arrays, max_new = _start(programs, rows)
    run = beam_programs(programs)[1]
    for limit in range(1, max_new + 1):
        state = run(programs.state, state, arrays, jnp.asarray(limit, jnp.int32))
        host = jax.device_get(state.replace(cache=None, logits=None))
        yield host
        if host.done.all():
            return


def _completion(tokenizer: Tokenizer, hyps: Hypotheses, b: int, k: int, row: Row) -> Completion:
    n = int(hyps.num_tokens[b, k])
    ids = [int(t) for t in hyps.tokens[b, k, :n]]
    reason = "stop" if ids and ids[-1] in row.eos_ids else "length"
    stream = TextStream(tokenizer)
    stream.push(ids)
    stream.finish(reason)
    return Completion(text=stream.text, token_ids=ids, finish_reason=reason,
                      cumulative_logprob=float(hyps.logprobs[b, k]),
                      score=float(hyps.scores[b, k]))
