"""Per-sequence sampling: settings, their array form, logits processors, sampling.

`SamplingParams` is what a user asks for (validated on construction).
`SamplingArrays.build` turns one `SamplingParams` per row into arrays with one
row per sequence, so a compiled step never depends on the settings' values:
changing them between calls compiles nothing new. Everything below
`SamplingArrays` is a pure function that runs under `jax.jit` and inside a
`lax.while_loop` body.

Semantics follow the references: repetition penalty, temperature, top-k,
top-p, min-p and `min_new_tokens` are Hugging Face's logits processors (in
HF's order); presence and frequency penalties are OpenAI's, counted over
generated tokens only, as vLLM does. Returned logprobs are those of the raw
model distribution, as vLLM returns them by default.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import secrets
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from flaxlm.model.errors import ConfigError

EOS_WIDTH = 8  # E: how many eos/stop token ids one row may have
MAX_LOGPROBS = 20  # the most top alternatives a request may ask for
_SEED_LIMIT = 2**63


def _check_int(name, value, low=None, high=None):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be an int, got {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"{name} must be {bounds}, got {value}")
    return value


def _check_float(name, value, allowed, describe):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if math.isnan(value) or not allowed(value):
        raise ConfigError(f"{name} must be {describe}, got {value}")
    return value


def _check_ids(name, ids):
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise ConfigError(f"{name} must be a sequence of token ids, got {ids!r}")
    return tuple(_check_int(f"{name} entry", i, low=0) for i in ids)


def _check_logit_bias(bias):
    if bias is None:
        return None
    pairs = bias.items() if isinstance(bias, Mapping) else bias
    try:
        pairs = dict(pairs)
    except (TypeError, ValueError):
        raise ConfigError(f"logit_bias must map token ids to biases, got {bias!r}") from None
    checked = {
        _check_int("logit_bias token id", k, low=0): _check_float(
            f"logit_bias[{k}]", v, lambda b: -100.0 <= b <= 100.0, "in [-100, 100]"
        )
        for k, v in pairs.items()
    }
    return tuple(sorted(checked.items())) or None


def _check_stop(stop):
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, Sequence):
        raise ConfigError(f"stop must be a string or a list of strings, got {stop!r}")
    for s in stop:
        if not isinstance(s, str) or not s:
            raise ConfigError(f"stop must hold non-empty strings, got {s!r}")
    return tuple(stop)


_FLOAT_RULES = {  # setting: (allowed, how the message describes it)
    "temperature": (lambda t: 0 <= t < math.inf, ">= 0 and finite"),
    "top_p": (lambda p: 0 < p <= 1, "in (0, 1]"),
    "min_p": (lambda p: 0 <= p < 1, "in [0, 1)"),
    "repetition_penalty": (lambda r: 0 < r < math.inf, "> 0 and finite"),
    "presence_penalty": (lambda x: -2 <= x <= 2, "in [-2, 2]"),
    "frequency_penalty": (lambda x: -2 <= x <= 2, "in [-2, 2]"),
}


def check_early_stopping(mode) -> bool | str:
    """Beam search's early_stopping: True, False or "never", as in HF."""
    if isinstance(mode, (bool, np.bool_)):
        return bool(mode)
    if not isinstance(mode, str) or mode != "never":
        raise ConfigError(f'early_stopping must be True, False or "never", got {mode!r}')
    return mode


_BEAM_ONLY = ("num_beams", "length_penalty", "early_stopping", "num_return_sequences")


def _refuse_beam_settings(given: dict) -> None:
    """SamplingParams(num_beams=...) of earlier versions: name the type that takes them."""
    given = {k: v for k, v in given.items() if v is not None and not (k == "num_beams" and v == 1)}
    if given:
        settings = ", ".join(f"{k}={v!r}" for k, v in given.items())
        raise ConfigError(f"{settings}: beam-search settings are a type of their own; use "
                          f"flaxlm.infer.BeamParams({settings}, max_new_tokens=...) instead of "
                          "SamplingParams (beam search samples nothing, so it takes no "
                          "temperature, top-k/p, penalties, seed, n, logprobs or stop strings)")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """The sampling settings of one request (vLLM-like names and defaults)."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF semantics
    presence_penalty: float = 0.0  # OpenAI semantics
    frequency_penalty: float = 0.0  # OpenAI semantics
    logit_bias: Mapping[int, float] | None = None  # stored as sorted ((id, bias), ...)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    n: int = 1
    logprobs: int | None = None  # None: none; 0: chosen token only; k: plus top-k
    prompt_logprobs: int | None = None  # None: none; k >= 0: each prompt token's, plus top-k
    # Beam search takes flaxlm.infer.BeamParams; these are accepted only to say so.
    num_beams: dataclasses.InitVar[int | None] = None
    length_penalty: dataclasses.InitVar[float | None] = None
    early_stopping: dataclasses.InitVar[bool | str | None] = None
    num_return_sequences: dataclasses.InitVar[int | None] = None

    def __post_init__(self, num_beams, length_penalty, early_stopping, num_return_sequences):
        _refuse_beam_settings(dict(zip(_BEAM_ONLY, (num_beams, length_penalty, early_stopping,
                                                    num_return_sequences))))
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("max_new_tokens", _check_int("max_new_tokens", self.max_new_tokens, low=1))
        set_("min_new_tokens", _check_int("min_new_tokens", self.min_new_tokens, 0, self.max_new_tokens))
        set_("top_k", _check_int("top_k", self.top_k, low=0))
        for name, (allowed, describe) in _FLOAT_RULES.items():
            set_(name, _check_float(name, getattr(self, name), allowed, describe))
        set_("logit_bias", _check_logit_bias(self.logit_bias))
        set_("stop", _check_stop(self.stop))
        set_("stop_token_ids", _check_ids("stop_token_ids", self.stop_token_ids))
        if not isinstance(self.ignore_eos, (bool, np.bool_)):
            raise ConfigError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        set_("ignore_eos", bool(self.ignore_eos))
        if self.seed is not None:
            set_("seed", _check_int("seed", self.seed, 0, _SEED_LIMIT - 1))
        set_("n", _check_int("n", self.n, low=1))
        if self.logprobs is not None:
            set_("logprobs", _check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS))
        if self.prompt_logprobs is not None:
            set_("prompt_logprobs", _check_int("prompt_logprobs", self.prompt_logprobs, 0,
                                               MAX_LOGPROBS))

    @property
    def is_greedy(self) -> bool:
        """Temperature 0: the argmax, no random draw."""
        return self.temperature == 0.0

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ConfigError if a token id in these settings is outside the vocabulary."""
        for name, ids in (("logit_bias", [i for i, _ in self.logit_bias or ()]),
                          ("stop_token_ids", self.stop_token_ids)):
            for i in ids:
                if i >= vocab_size:
                    raise ConfigError(f"{name} has token id {i}, outside the vocabulary ({vocab_size})")


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """One sequence of a batch: its settings, its eos ids and which of the `n` samples it is."""

    params: SamplingParams
    eos_ids: tuple[int, ...] = ()  # tokenizer eos ids (unless ignore_eos) plus stop_token_ids
    sample_index: int = 0


_PADDING_ROW = RowSpec(SamplingParams(max_new_tokens=1, temperature=0.0, seed=0))


def eos_table(eos_ids: Sequence[Sequence[int]], vocab_size: int, batch_size: int) -> np.ndarray:
    """Each row's eos/stop token ids, checked, as int32 [batch_size, EOS_WIDTH] padded with -1
    (sampling and beam search alike)."""
    table = np.full((batch_size, EOS_WIDTH), -1, np.int32)
    for b, row in enumerate(eos_ids):
        ids = sorted(set(_check_ids("eos_ids", row)))
        if len(ids) > EOS_WIDTH or (ids and ids[-1] >= vocab_size):
            raise ConfigError(f"eos_ids {ids} must be at most {EOS_WIDTH} ids below {vocab_size}")
        table[b, :len(ids)] = ids
    return table


def _row_keys(seeds: list[int], sample_indices: list[int]) -> jax.Array:
    """fold_in(PRNGKey(seed), sample_index) per row: uint32 [B, 2].

    The key data is built from the seed's 64 bits (as `PRNGKey` does with x64
    enabled, and identically for seeds < 2**32 without it), so large seeds do
    not collide.
    """
    seeds_u64 = np.array(seeds, dtype=np.uint64)
    key_data = np.stack([seeds_u64 >> np.uint64(32), seeds_u64 & np.uint64(0xFFFFFFFF)], axis=-1)
    indices = np.array(sample_indices, np.uint32)
    return jax.vmap(jax.random.fold_in)(key_data.astype(np.uint32), indices)


@struct.dataclass
class SamplingArrays:
    """Sampling settings as arrays, one row per sequence (B rows, V vocabulary)."""

    temperature: jax.Array  # f32[B]; 0 = greedy
    top_k: jax.Array  # i32[B]; 0 = off
    top_p: jax.Array  # f32[B]; 1 = off
    min_p: jax.Array  # f32[B]; 0 = off
    repetition_penalty: jax.Array  # f32[B]
    presence_penalty: jax.Array  # f32[B]
    frequency_penalty: jax.Array  # f32[B]
    logit_bias: jax.Array  # f32[B, V]
    min_new_tokens: jax.Array  # i32[B]
    max_new_tokens: jax.Array  # i32[B]
    eos_ids: jax.Array  # i32[B, E], padded with -1
    keys: jax.Array  # u32[B, 2], legacy PRNG key data

    @classmethod
    def build(cls, rows: Sequence[RowSpec], vocab_size: int, batch_size: int) -> SamplingArrays:
        """Arrays for `rows`, padded to `batch_size` with greedy one-token rows.

        Greedy rows get top-k, top-p and min-p off: they cannot change the
        argmax, and a batch of greedy rows then skips the filters entirely.
        A row whose seed is None gets a fresh random seed on each call.
        """
        if batch_size < len(rows):
            raise ConfigError(f"batch_size {batch_size} is smaller than the {len(rows)} rows")
        rows = list(rows) + [_PADDING_ROW] * (batch_size - len(rows))
        params = [r.params for r in rows]
        column = lambda name, dtype: np.array([getattr(p, name) for p in params], dtype)  # noqa: E731
        sampled = np.array([not p.is_greedy for p in params])
        logit_bias = np.zeros((batch_size, vocab_size), np.float32)  # [B, V]
        for b, row in enumerate(rows):
            row.params.check_vocab(vocab_size)
            for token, bias in row.params.logit_bias or ():
                logit_bias[b, token] = bias
        eos_ids = eos_table([r.eos_ids for r in rows], vocab_size, batch_size)
        seeds = [secrets.randbits(31) if p.seed is None else p.seed for p in params]
        indices = [_check_int("sample_index", r.sample_index, 0, 2**32 - 1) for r in rows]
        return cls(
            temperature=jnp.asarray(column("temperature", np.float32)),
            top_k=jnp.asarray(np.where(sampled, column("top_k", np.int32), 0)),
            top_p=jnp.asarray(np.where(sampled, column("top_p", np.float32), 1.0).astype(np.float32)),
            min_p=jnp.asarray(np.where(sampled, column("min_p", np.float32), 0.0).astype(np.float32)),
            repetition_penalty=jnp.asarray(column("repetition_penalty", np.float32)),
            presence_penalty=jnp.asarray(column("presence_penalty", np.float32)),
            frequency_penalty=jnp.asarray(column("frequency_penalty", np.float32)),
            logit_bias=jnp.asarray(logit_bias),
            min_new_tokens=jnp.asarray(column("min_new_tokens", np.int32)),
            max_new_tokens=jnp.asarray(column("max_new_tokens", np.int32)),
            eos_ids=jnp.asarray(eos_ids),
            keys=_row_keys(seeds, indices),
        )


@struct.dataclass
class TokenHistory:
    """Which tokens each row has seen, for the penalties."""

    seen: jax.Array  # bool[B, V]: prompt + generated (repetition penalty)
    counts: jax.Array  # i32[B, V]: generated only (presence / frequency penalties)

    @classmethod
    def from_prompts(cls, tokens: jax.Array, mask: jax.Array, vocab_size: int) -> TokenHistory:
        """History of prompts `tokens` i32[B, T] where `mask` [B, T] is nonzero (0 = padding)."""
        batch = tokens.shape[0]
        rows = jnp.arange(batch)[:, None]  # [B, 1]
        tokens = jnp.where(mask != 0, tokens, vocab_size)  # [B, T]; padding: dropped
        seen = jnp.zeros((batch, vocab_size), bool).at[rows, tokens].set(True, mode="drop")
        return cls(seen=seen, counts=jnp.zeros((batch, vocab_size), jnp.int32))

    def add(self, tokens: jax.Array, active: jax.Array) -> TokenHistory:
        """Record `tokens` i32[B] for the rows where `active` bool[B]."""
        rows = jnp.arange(tokens.shape[0])
        tokens = jnp.where(active, tokens, self.seen.shape[1])  # [B]; inactive: dropped
        return TokenHistory(seen=self.seen.at[rows, tokens].set(True, mode="drop"),
                            counts=self.counts.at[rows, tokens].add(1, mode="drop"))


def apply_penalties(logits, arrays: SamplingArrays, history: TokenHistory, num_generated):
    """Repetition, presence/frequency penalties, logit bias, min_new_tokens; f32[B, V]."""
    penalty = arrays.repetition_penalty[:, None]  # [B, 1]
    repeated = jnp.where(logits < 0, logits * penalty, logits / penalty)
    logits = jnp.where(history.seen, repeated, logits)
    counts = history.counts.astype(logits.dtype)  # [B, V]
    logits = logits - arrays.presence_penalty[:, None] * (counts > 0)
    logits = logits - arrays.frequency_penalty[:, None] * counts
    logits = logits + arrays.logit_bias
    too_short = (num_generated < arrays.min_new_tokens)[:, None]  # [B, 1]
    banned = jnp.where(too_short, arrays.eos_ids, -1)  # [B, E]
    rows = jnp.arange(logits.shape[0])[:, None]
    return logits.at[rows, jnp.where(banned >= 0, banned, logits.shape[1])].set(-jnp.inf, mode="drop")


def _largest_passing(predicate, high_bit, shape):
    """Per row, the largest uint32 t (below 2**(high_bit+1)) with predicate(t) true, for a
    predicate true at 0 and monotone (true, then false): bit by bit from the top, no sort."""

    def try_bit(i, t):
        candidate = t | (jnp.uint32(1) << (high_bit - i).astype(jnp.uint32))
        return jnp.where(predicate(candidate), candidate, t)

    return jax.lax.fori_loop(0, high_bit + 1, try_bit, jnp.zeros(shape, jnp.uint32))


def _top_k(logits, top_k):
    """HF TopK per row (ties with the k-th value kept; 0 = off); f32[B, V]."""
    bits = jax.lax.bitcast_convert_type(logits, jnp.uint32)
    keys = jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))  # [B, V], ordered like logits
    k = jnp.clip(top_k, 1, logits.shape[-1])[:, None]  # [B, 1]
    kth = _largest_passing(lambda t: (keys >= t).sum(-1, keepdims=True) >= k, 31, k.shape)  # [B, 1]
    return jnp.where((keys < kth) & (top_k[:, None] > 0), -jnp.inf, logits)


def _top_p(logits, top_p):
    """HF TopP per row (min_tokens_to_keep=1; ties at the cut kept; 1 = off); f32[B, V].

    HF removes the tokens whose ascending cumulative probability is <= 1 - top_p: that is
    every token whose probability p satisfies mass(probabilities <= p) <= 1 - top_p.
    """
    probs = jax.nn.softmax(logits, axis=-1)  # [B, V]
    bits = jax.lax.bitcast_convert_type(probs, jnp.uint32)  # ordered like probs (all >= 0)
    budget = (1 - top_p)[:, None]  # [B, 1]
    mass_up_to = lambda t: jnp.where(bits <= t, probs, 0).sum(-1, keepdims=True)  # noqa: E731
    cut = _largest_passing(lambda t: mass_up_to(t) <= budget, 29, budget.shape)  # 1.0 is 0x3F800000
    remove = (bits <= cut) & (probs < probs.max(-1, keepdims=True)) & (top_p[:, None] < 1)
    return jnp.where(remove, -jnp.inf, logits)


def _min_p(logits, min_p):
    """HF MinP per row (0 = off); f32[B, V]."""
    probs = jax.nn.softmax(logits, axis=-1)  # [B, V]
    return jnp.where(probs < min_p[:, None] * probs.max(axis=-1, keepdims=True), -jnp.inf, logits)


def apply_warpers(logits, arrays: SamplingArrays):
    """Temperature, top-k, top-p, min-p in HF's order; filtered entries -inf. f32[B, V].

    Top-k and top-p cost ~30 passes over the logits each (a radix select, much cheaper
    than sorting the vocabulary on CPU); each filter runs only when some row uses it.
    """
    temperature = arrays.temperature[:, None]  # [B, 1]
    logits = jnp.where(temperature > 0, logits / jnp.where(temperature > 0, temperature, 1), logits)
    skip = lambda x, _: x  # noqa: E731
    logits = jax.lax.cond(jnp.any(arrays.top_k > 0), _top_k, skip, logits, arrays.top_k)
    logits = jax.lax.cond(jnp.any(arrays.top_p < 1), _top_p, skip, logits, arrays.top_p)
    return jax.lax.cond(jnp.any(arrays.min_p > 0), _min_p, skip, logits, arrays.min_p)


def _argmax(x):
    """First index of the row maximum; i32[B] (XLA:CPU's argmax is ~5x slower)."""
    iota = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.where(x == x.max(-1, keepdims=True), iota, x.shape[-1]).min(-1)


def _draw(logits, keys, step):
    """jax.random.categorical (Gumbel-max) per row, keyed by fold_in(row key, step); i32[B].

    `step` is one step for every row ([]) or each row's own ([B]: the server's slots,
    whose requests started at different times)."""

    def gumbel(key, row_step):  # f32[V]
        return jax.random.gumbel(jax.random.fold_in(key, row_step), logits.shape[-1:])

    steps = jnp.broadcast_to(step, keys.shape[:1])
    return _argmax(logits + jax.vmap(gumbel)(keys, steps))


def sample(logits, arrays: SamplingArrays, step):
    """Argmax for greedy rows, else a categorical draw keyed by fold_in(row key, step) (step
    [] or [B]); i32[B].

    An all-greedy batch draws no random numbers.
    """
    sampled = arrays.temperature > 0  # [B]
    nothing = lambda x, *_: jnp.zeros(x.shape[:1], jnp.int32)  # noqa: E731
    drawn = jax.lax.cond(jnp.any(sampled), _draw, nothing, logits, arrays.keys, step)
    return jnp.where(sampled, drawn, _argmax(logits))


@struct.dataclass
class SampleOutput:
    tokens: jax.Array  # i32[B]
    logprob: jax.Array  # f32[B]: of the chosen token, under the raw model distribution
    top_ids: jax.Array  # i32[B, N]
    top_logprobs: jax.Array  # f32[B, N]


def select_tokens(raw_logits, arrays: SamplingArrays, history: TokenHistory, num_generated, step,
                  top_n: int) -> SampleOutput:
    """Penalties, warpers, then sample; logprobs (and the static `top_n` best) of the raw logits."""
    raw_logits = raw_logits.astype(jnp.float32)  # [B, V]
    logits = apply_penalties(raw_logits, arrays, history, num_generated)
    tokens = sample(apply_warpers(logits, arrays), arrays, step)  # [B]
    normalizer = jax.nn.logsumexp(raw_logits, axis=-1, keepdims=True)  # [B, 1]
    chosen = jnp.take_along_axis(raw_logits, tokens[:, None], axis=-1)[:, 0] - normalizer[:, 0]
    if top_n > 0:
        top_logits, top_ids = jax.lax.top_k(raw_logits, top_n)  # [B, N]
        top_logprobs = top_logits - normalizer
    else:
        top_logprobs = jnp.zeros((raw_logits.shape[0], 0), jnp.float32)
        top_ids = jnp.zeros((raw_logits.shape[0], 0), jnp.int32)
    return SampleOutput(tokens=tokens, logprob=chosen, top_ids=top_ids.astype(jnp.int32),
                        top_logprobs=top_logprobs)
