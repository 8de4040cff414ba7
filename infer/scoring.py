"""Scoring given tokens: log-probabilities of continuations, one compiled program per bucket.

A scoring item is `(context, continuation)` token ids; its result is the
log-probability of each continuation token given everything before it, whether
it is the argmax, and optionally the top alternatives.

Items are packed into rows. A row holds one or more *groups*: a context
followed by the tokens of every continuation that shares it (all but their last
token, whose own logits are never needed). An explicit attention mask lets a
token see the earlier tokens of its own continuation and of its group's
context, nothing else, and positions restart at each group (a continuation
starts at `len(context)`). So the context of a multiple-choice question runs
once for all its choices, one-token continuations (answer letters) add no
tokens at all, and rows carry padding only at their tail. Logits are computed
only where a token is scored (the LM head on the scored hidden states, in
chunks of `LOGIT_ROWS`), never over whole rows.

Shapes are buckets: rows of a power-of-two length (at least `MIN_ROW`),
a power-of-two number of rows per call and of scored entries per row. For one
set of items the row length and the entries are fixed, so a job compiles one
program per (rows, length, entries, top_n), counted in `Programs.num_compiled`.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from flaxlm.infer.engine import Programs
from flaxlm.infer.generate import bucket
from flaxlm.model.decoder import Decoder
from flaxlm.model.tokenizer import Tokenizer

MIN_ROW = 256           # shortest packed row, tokens
MIN_ENTRIES = 16        # fewest scored entries per row
TOKENS_PER_CALL = 4096  # rows x row length of one call (more rows when rows are short)
LOGIT_ROWS = 512        # scored hidden states turned into logits at a time

Item = tuple[tuple[int, ...], tuple[int, ...]]  # (context, continuation), both non-empty


@struct.dataclass
class ScoreBatch:
    """One call's packed rows."""

    tokens: jax.Array     # [rows, seq] int32
    positions: jax.Array  # [rows, seq] position within the token's group
    segments: jax.Array   # [rows, seq] 0 = padding; a context and each continuation own one id
    parents: jax.Array    # [rows, seq] the segment a token may also see (its group's context)
    score_at: jax.Array   # [rows, entries] index in the row whose logits predict the target
    targets: jax.Array    # [rows, entries] the scored token ids


@struct.dataclass
class ScoreOutput:
    logprobs: jax.Array      # [rows, entries] float32
    greedy: jax.Array        # [rows, entries] bool: the target is the argmax
    top_ids: jax.Array       # [rows, entries, top_n]
    top_logprobs: jax.Array  # [rows, entries, top_n]


def tree_mask(segments: jax.Array, parents: jax.Array) -> jax.Array:
    """[rows, seq, seq] bool: query i sees key j <= i of its own segment or its parent's."""
    index = jnp.arange(segments.shape[1])
    seg_q, seg_k = segments[:, :, None], segments[:, None, :]
    same = (seg_k == seg_q) | (seg_k == parents[:, :, None])
    return (index[None, None, :] <= index[None, :, None]) & (seg_k != 0) & same


def token_scores(model: Decoder, hidden: jax.Array, targets: jax.Array, top_n: int):
    """hidden [n, embed], targets [n] -> (logprobs [n], greedy [n], top ids/logprobs [n, top_n]),
    the logits made LOGIT_ROWS rows at a time."""
    n = hidden.shape[0]
    chunk = min(n, LOGIT_ROWS)

    def one(args):
        h, t = args
        logits = model.logits(h).astype(jnp.float32)  # [chunk, vocab]
        norm = jax.nn.logsumexp(logits, axis=-1)
        chosen = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0] - norm
        greedy = jnp.argmax(logits, axis=-1) == t
        if top_n == 0:
            empty = jnp.zeros((h.shape[0], 0), jnp.float32)
            return chosen, greedy, empty.astype(jnp.int32), empty
        top_logits, top_ids = jax.lax.top_k(logits, top_n)
        return chosen, greedy, top_ids.astype(jnp.int32), top_logits - norm[:, None]

    out = jax.lax.map(one, (hidden.reshape(n // chunk, chunk, -1), targets.reshape(n // chunk, chunk)))
    return jax.tree.map(lambda x: x.reshape((n,) + x.shape[2:]), out)


def score(model: Decoder, batch: ScoreBatch, *, top_n: int) -> ScoreOutput:
    """The compiled scoring program: one forward pass over packed rows."""
    mask = tree_mask(batch.segments, batch.parents)
    hidden, _ = model.hidden(batch.tokens, positions=batch.positions, attention_mask=mask)
    rows, entries = batch.score_at.shape
    picked = jnp.take_along_axis(hidden, batch.score_at[:, :, None], axis=1)  # [rows, entries, embed]
    logprobs, greedy, top_ids, top_lp = token_scores(
        model, picked.reshape(rows * entries, -1), batch.targets.reshape(-1), top_n)
    shape = (rows, entries)
    return ScoreOutput(logprobs=logprobs.reshape(shape), greedy=greedy.reshape(shape),
                       top_ids=top_ids.reshape(shape + (top_n,)),
                       top_logprobs=top_lp.reshape(shape + (top_n,)))


# ------------------------------------------------------------------ host side: packing

@dataclasses.dataclass(frozen=True)
class TokenScores:
    """The scores of one item's continuation tokens."""

    logprobs: list[float]
    greedy: list[bool]
    top: list[dict[int, float]] | None = None  # with top_n > 0: the best alternatives per token


@dataclasses.dataclass
class _Group:
    context: tuple[int, ...]
    items: list[int] = dataclasses.field(default_factory=list)  # indices into the unique items
    size: int = 0     # tokens in a row: the context and every continuation but its last token
    entries: int = 0  # scored tokens


@dataclasses.dataclass
class _Row:
    groups: list[_Group] = dataclasses.field(default_factory=list)
    size: int = 0
    entries: int = 0


def _groups(items: list[Item], row_len: int) -> list[_Group]:
    """Items grouped by context; a group too long for a row is split."""
    by_context: dict[tuple[int, ...], list[_Group]] = {}
    for i, (context, continuation) in enumerate(items):
        groups = by_context.setdefault(context, [])
        size, entries = len(continuation) - 1, len(continuation)
        if (not groups or groups[-1].size + size > row_len
                or groups[-1].entries + entries > row_len):
            groups.append(_Group(context, size=len(context)))
        group = groups[-1]
        group.items.append(i)
        group.size += size
        group.entries += entries
    return [g for groups in by_context.values() for g in groups]


def _pack(groups: list[_Group], row_len: int, open_rows: int = 16) -> list[_Row]:
    """First-fit decreasing over the last `open_rows` rows: few rows, little padding."""
    rows: list[_Row] = []
    for group in sorted(groups, key=lambda g: (-g.size, -g.entries)):
        row = next((r for r in rows[-open_rows:] if r.size + group.size <= row_len
                    and r.entries + group.entries <= row_len), None)
        if row is None:
            row = _Row()
            rows.append(row)
        row.groups.append(group)
        row.size += group.size
        row.entries += group.entries
    return rows


def _fill_row(b: int, row: _Row, items: list[Item], arrays: dict[str, np.ndarray],
              owners: list[tuple[int, int, int]]) -> None:
    """Write one row's groups into the call arrays; owners gets (item, token, entry) triples."""
    at, entry, segment = 0, 0, 0
    for group in row.groups:
        segment += 1
        context_seg, n = segment, len(group.context)
        arrays["tokens"][b, at:at + n] = group.context
        arrays["positions"][b, at:at + n] = np.arange(n)
        arrays["segments"][b, at:at + n] = context_seg
        arrays["parents"][b, at:at + n] = context_seg
        last_context = at + n - 1
        at += n
        for i in group.items:
            continuation = items[i][1]
            inputs = continuation[:-1]
            segment += 1
            k = len(inputs)
            arrays["tokens"][b, at:at + k] = inputs
            arrays["positions"][b, at:at + k] = n + np.arange(k)
            arrays["segments"][b, at:at + k] = segment
            arrays["parents"][b, at:at + k] = context_seg
            sources = [last_context] + list(range(at, at + k))
            for j, (source, target) in enumerate(zip(sources, continuation)):
                arrays["score_at"][b, entry] = source
                arrays["targets"][b, entry] = target
                owners.append((i, j, b * arrays["score_at"].shape[1] + entry))
                entry += 1
            at += k


def _batch(rows: list[_Row], items: list[Item], num_rows: int, row_len: int, entries: int
           ) -> tuple[ScoreBatch, list[tuple[int, int, int]]]:
    arrays = {name: np.zeros((num_rows, row_len), np.int32)
              for name in ("tokens", "positions", "segments", "parents")}
    arrays["score_at"] = np.zeros((num_rows, entries), np.int32)
    arrays["targets"] = np.zeros((num_rows, entries), np.int32)
    owners: list[tuple[int, int, int]] = []
    for b, row in enumerate(rows):
        _fill_row(b, row, items, arrays, owners)
    return ScoreBatch(**arrays), owners


def score_program(programs: Programs):
    return programs.program("score", score, static_argnames=("top_n",))


def score_items(programs: Programs, items: Sequence[Item], *, max_rows: int, top_n: int = 0,
                progress: Callable[[int], None] | None = None) -> list[TokenScores]:
    """Scores of each item (contexts and continuations non-empty, checked by the caller,
    each context + continuation[:-1] within the model's window)."""
    counts = collections.Counter(items)
    unique = list(counts)
    index = {item: i for i, item in enumerate(unique)}
    row_len = bucket(max(len(c) + len(t) - 1 for c, t in unique), MIN_ROW)
    rows = _pack(_groups(unique, row_len), row_len)
    entries = bucket(max(r.entries for r in rows), MIN_ENTRIES)
    per_call = max(1, min(max_rows, TOKENS_PER_CALL // row_len))
    logprobs = [[0.0] * len(t) for _, t in unique]
    greedy = [[False] * len(t) for _, t in unique]
    top = [[{} for _ in t] for _, t in unique] if top_n else None
    program = score_program(programs)
    for start in range(0, len(rows), per_call):
        chunk = rows[start:start + per_call]
        batch, owners = _batch(chunk, unique, bucket(len(chunk), 1), row_len, entries)
        out = jax.device_get(program(programs.state, batch, top_n=top_n))
        flat = jax.tree.map(lambda x: x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:]), out)
        for i, j, e in owners:
            logprobs[i][j] = float(flat.logprobs[e])
            greedy[i][j] = bool(flat.greedy[e])
            if top is not None:
                top[i][j] = {int(t): float(lp) for t, lp in zip(flat.top_ids[e], flat.top_logprobs[e])}
        if progress is not None:
            progress(sum(counts[unique[i]] for r in chunk for g in r.groups for i in g.items))
    results = [TokenScores(logprobs=logprobs[i], greedy=greedy[i],
                           top=None if top is None else top[i]) for i in range(len(unique))]
    return [results[index[item]] for item in items]


# ------------------------------------------------------------------ requests from text

@dataclasses.dataclass(frozen=True)
class Loglikelihood:
    """The score of one continuation given its context."""

    logprob: float             # sum of the continuation tokens' log-probabilities
    is_greedy: bool            # every continuation token is the argmax given what precedes it
    num_tokens: int
    token_logprobs: list[float]


@dataclasses.dataclass(frozen=True)
class RollingLoglikelihood:
    """The log-probability of a whole text, every token scored once."""

    logprob: float
    num_tokens: int


def prefix_token_id(tokenizer: Tokenizer) -> int | None:
    """What conditions a text's first token: BOS, else EOS (lm-evaluation-harness's HFLM)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def harness_encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """`text`'s ids as HFLM's `tok_encode` makes them: the tokenizer's own special tokens
    (BOS where it adds one), none when the text already starts with the prefix token."""
    prefix = prefix_token_id(tokenizer)
    starts = prefix is not None and text.startswith(tokenizer.decode([prefix]))
    return tokenizer.encode(text, add_special_tokens=not starts)


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str
                ) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) by lm-evaluation-harness's rule (TemplateLM/HFLM).

    Whitespace at the end of the context moves to the start of the continuation;
    context + continuation is encoded whole and the context alone, and the
    continuation is the tail of the whole after the context's length (so a merge
    across the boundary is scored as the model would see it). An empty context
    becomes the prefix token (BOS, else EOS), unless the continuation already
    starts with it.
    """
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        ids = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = prefix_token_id(tokenizer)
        if ids[:1] == [prefix] or prefix is None:
            return ids[:1], ids[1:]
        return [prefix], ids
    whole = harness_encode(tokenizer, context + continuation)
    context_ids = harness_encode(tokenizer, context)
    return context_ids, whole[len(context_ids):]


def rolling_items(ids: Sequence[int], prefix: int, window: int, stride: int) -> list[Item]:
    """Windows that score every token of `ids` once, `stride` tokens per window, each
    with up to `window` input tokens ending just before its last scored token; the
    first token is conditioned on `prefix`. stride == window gives lm-evaluation-
    harness's disjoint windows; a smaller stride gives every token more context."""
    tokens = [prefix, *ids]
    items, a = [], 1
    while a < len(tokens):
        b = min(a + stride, len(tokens))
        start = max(0, b - 1 - window)
        items.append((tuple(tokens[start:a]), tuple(tokens[a:b])))
        a = b
    return items
