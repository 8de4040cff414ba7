"""Batched generation on top of the compiled programs: buckets, rows, results.

A request becomes `n` rows; rows are grouped into batches of at most
`max_batch`, padded to power-of-two batch sizes and prompt lengths so a
long-running process compiles a bounded number of programs.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Iterator

import jax
import numpy as np

from flaxlm.infer.engine import LoopState, Programs
from flaxlm.infer.sampling import RowSpec, SamplingArrays, SamplingParams
from flaxlm.infer.text import TextStream
from flaxlm.model.errors import ConfigError
from flaxlm.model.tokenizer import Tokenizer

MIN_PROMPT_BUCKET = 16
MIN_NEW_BUCKET = 16
STOP_CHECK_EVERY = 8  # decode steps between host checks for stop strings
TOP_LOGPROBS = 20     # width of the top-alternatives arrays when any row asks for them


def bucket(n: int, minimum: int) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return 1 << (max(n, minimum) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class Row:
    """One sequence to generate: a prompt, its settings and which sample it is."""

    prompt_ids: tuple[int, ...]
    params: SamplingParams | Any  # or flaxlm.infer.beam.BeamParams
    eos_ids: tuple[int, ...]
    sample_index: int = 0


@dataclasses.dataclass
class Completion:
    """One generated sequence."""

    text: str
    token_ids: list[int]
    finish_reason: str                   # "stop" (eos, stop token or stop string) or "length"
    cumulative_logprob: float            # sum of the chosen tokens' logprobs (ranks samples)
    logprobs: list[float] | None = None  # of each chosen token, when asked for
    top_logprobs: list[dict[int, float]] | None = None
    score: float | None = None           # beam search: sum_logprobs / len(token_ids) ** length_penalty


@dataclasses.dataclass(frozen=True)
class BatchTiming:
    ttft_s: float          # prefill + first token of the batch
    total_s: float
    max_new_tokens: int    # steps run by the longest row


@dataclasses.dataclass(frozen=True)
class Batch:
    """Rows as arrays: prompts padded to buckets, settings checked (sampling and beams)."""

    rows: list[Row]
    tokens: np.ndarray   # [batch, prompt_bucket]
    lengths: np.ndarray  # [batch]
    active: np.ndarray   # [batch] bool, False for padding rows
    max_new: int         # new-token bucket
    sampling: SamplingArrays | None  # sampled rows' settings (None for beam search)
    top_n: int           # width of the top-alternatives arrays

    @property
    def cache_len(self) -> int:
        return self.tokens.shape[1] + self.max_new


def make_batch(rows: list[Row], vocab_size: int, prompt_len: int | None = None) -> Batch:
    """The one batch builder: rows padded to a power-of-two count, prompts right-padded to
    `prompt_len` (default: a power-of-two bucket), new tokens to a bucket, prompts, settings
    and eos ids checked against the vocabulary."""
    batch = bucket(len(rows), 1)
    if prompt_len is None:
        prompt_len = bucket(max(len(r.prompt_ids) for r in rows), MIN_PROMPT_BUCKET)
    tokens = np.zeros((batch, prompt_len), np.int32)
    lengths = np.ones((batch,), np.int32)
    for i, row in enumerate(rows):
        if not row.prompt_ids or max(row.prompt_ids) >= vocab_size or min(row.prompt_ids) < 0:
            raise ConfigError(f"row {i}: a prompt of token ids in [0, {vocab_size}) is needed")
        row.params.check_vocab(vocab_size)
        tokens[i, :len(row.prompt_ids)] = row.prompt_ids
        lengths[i] = len(row.prompt_ids)
    sampling, top_n = None, 0
    if all(isinstance(r.params, SamplingParams) for r in rows):
        specs = [RowSpec(params=r.params, eos_ids=r.eos_ids, sample_index=r.sample_index)
                 for r in rows]
        sampling = SamplingArrays.build(specs, vocab_size, batch)
        top_n = TOP_LOGPROBS if any((r.params.logprobs or 0) > 0 for r in rows) else 0
    return Batch(rows=rows, tokens=tokens, lengths=lengths, active=np.arange(batch) < len(rows),
                 max_new=bucket(max(r.params.max_new_tokens for r in rows), MIN_NEW_BUCKET),
                 sampling=sampling, top_n=top_n)


def _start(programs: Programs, b: Batch) -> LoopState:
    return programs.start(b.tokens, b.lengths, b.active, b.sampling,
                          cache_len=b.cache_len, max_new=b.max_new, top_n=b.top_n)


def run_batch(programs: Programs, tokenizer: Tokenizer, rows: list[Row]
              ) -> tuple[list[Completion], BatchTiming]:
    """Generate every row of one batch with the while_loop program."""
    b = make_batch(rows, programs.config.vocab_size)
    t0 = time.perf_counter()
    loop = jax.block_until_ready(_start(programs, b))
    ttft = time.perf_counter() - t0
    streams = [TextStream(tokenizer, r.params.stop) for r in rows]
    if any(r.params.stop for r in rows):
        loop = _run_with_stop_strings(programs, b, loop, streams)
    else:
        loop = programs.run(loop, b.sampling, b.max_new, top_n=b.top_n)
    host = jax.device_get(loop)
    total = time.perf_counter() - t0
    done = [_completion(host, i, row, streams[i]) for i, row in enumerate(rows)]
    return done, BatchTiming(ttft_s=ttft, total_s=total, max_new_tokens=int(host.step))


def _run_with_stop_strings(programs: Programs, b: Batch, loop: LoopState,
                           streams: list[TextStream]) -> LoopState:
    """while_loop chunks of STOP_CHECK_EVERY steps; between them the host looks for stop strings."""
    seen = 0
    while True:
        tokens, num_tokens, done = jax.device_get((loop.tokens, loop.num_tokens, loop.done))
        host_done = done.copy()
        for i, stream in enumerate(streams):
            if b.rows[i].params.stop and not stream.finished:
                stream.push(t for t in tokens[i, seen:num_tokens[i]])
                host_done[i] |= stream.stopped
        if host_done.all() or int(loop.step) >= b.max_new:
            return loop.replace(done=jax.numpy.asarray(host_done))
        if (host_done != done).any():
            loop = loop.replace(done=jax.numpy.asarray(host_done))
        seen = int(loop.step)
        loop = programs.run(loop, b.sampling, seen + STOP_CHECK_EVERY, top_n=b.top_n)


def _completion(host: LoopState, i: int, row: Row, stream: TextStream) -> Completion:
    n = int(host.num_tokens[i])
    if stream.stopped:
        n = stream.num_tokens
        text, reason = stream.text, "stop"
    else:
        stream.push(host.tokens[i, stream.num_tokens:n])
        stream.finish("stop" if host.stopped[i] else "length")
        text, reason = stream.text, stream.finish_reason
    ids = [int(t) for t in host.tokens[i, :n]]
    want = row.params.logprobs
    logprobs = None if want is None else [float(x) for x in host.logprobs[i, :n]]
    top = None
    if want:
        top = [{int(t): float(lp) for t, lp in zip(host.top_ids[i, k, :want],
                                                   host.top_logprobs[i, k, :want])}
               for k in range(n)]
    return Completion(text=text, token_ids=ids, finish_reason=reason,
                      cumulative_logprob=float(host.logprobs[i, :n].sum()),
                      logprobs=logprobs, top_logprobs=top)


@dataclasses.dataclass(frozen=True)
class StreamEnd:
    token_ids: list[int]  # the tokens generated, up to the one that completed a stop string
    finish_reason: str
    loop: LoopState | None = None  # the final loop state (its cache holds the tokens fed)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def stream_row(programs: Programs, tokenizer: Tokenizer, row: Row
               ) -> Iterator[tuple[str, StreamEnd | None]]:
    """Yield (text piece, None) as tokens come; the last item is ("", StreamEnd)."""
    b = make_batch([row], programs.config.vocab_size)
    return stream_loop(programs, tokenizer, _start(programs, b), b)


def stream_loop(programs: Programs, tokenizer: Tokenizer, loop: LoopState, b: Batch
                ) -> Iterator[tuple[str, StreamEnd | None]]:
    """Stream the one row of batch `b` from `loop`, the state after its first token.

    Each token is one call of the `run` program with a limit one token further.
    The row's last token is read whole (no slicing op, which would compile per
    step index) before that call donates the state; the call is dispatched
    before the token is detokenized, so the host's work overlaps the device's.
    """
    stream = TextStream(tokenizer, b.rows[0].params.stop)
    step = 1
    while True:
        last, finished = jax.device_get((loop.last_tokens, loop.done))
        token, done = int(last[0]), bool(finished[0])
        if step < b.max_new and not done:
            loop = programs.run(loop, b.sampling, step + 1, top_n=b.top_n)
        piece = stream.push([token])
        if piece:
            yield piece, None
        if done or stream.stopped or step >= b.max_new:
            break
        step += 1
    tail = stream.finish("stop" if jax.device_get(loop.stopped)[0] else "length")
    if tail:
        yield tail, None
    yield "", StreamEnd(token_ids=stream.token_ids, finish_reason=stream.finish_reason, loop=loop)
