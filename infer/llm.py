"""The public inference API: `LLM.load(...)`, `generate`, `chat`, `stream`."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from jax.sharding import Mesh

from flaxlm.infer.beam import BeamParams, run_beam_batch
from flaxlm.infer.conversation import DEFAULT_CAPACITY, Conversation
from flaxlm.infer.embedding import POOLINGS, embed_ids
from flaxlm.infer.engine import Programs, virtual_tokens
from flaxlm.infer.generate import TOP_LOGPROBS, Completion, Row, StreamEnd, run_batch, stream_row
from flaxlm.infer.sampling import SamplingParams
from flaxlm.infer.scoring import (Item, Loglikelihood, RollingLoglikelihood, encode_pair,
                                  harness_encode, prefix_token_id, rolling_items, score_items)
from flaxlm.infer.trace import TraceResult, trace_ids
from flaxlm.model.decoder import Decoder
from flaxlm.model.compile_cache import enable_compile_cache
from flaxlm.model.errors import ConfigError
from flaxlm.model.loading import load
from flaxlm.model.lora import merge_lora
from flaxlm.model.peft_io import load_adapter, read_adapter
from flaxlm.model.sharding import make_mesh
from flaxlm.model.tokenizer import Tokenizer

log = logging.getLogger("flaxlm.infer")

Prompt = str | Sequence[int]
Messages = Sequence[Mapping[str, Any]]
Request = tuple[str, str] | tuple[Sequence[int], Sequence[int]]
Progress = Callable[[int], None] | None  # called with how many requests a step finished
Params = SamplingParams | BeamParams


@dataclasses.dataclass
class GenerationResult:
    """The completions of one prompt, best first, with timings."""

    prompt_token_ids: list[int]
    outputs: list[Completion]
    ttft_s: float                   # time to first token (prefill of the prompt's batch)
    time_per_output_token_s: float  # decode time per token after the first
    # With SamplingParams(prompt_logprobs=k): per prompt token, None for the first, then
    # {token id: logprob} of the prompt token and its k best alternatives (as vLLM).
    prompt_logprobs: list[dict[int, float] | None] | None = None

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str:
        return self.outputs[0].finish_reason


class LLM:
    """A model, its tokenizer and its compiled programs.

    >>> llm = LLM.load("smollm2-135m-instruct")
    >>> llm.generate("The capital of France is", SamplingParams(temperature=0))[0].text
    """

    def __init__(self, model: Decoder, tokenizer: Tokenizer, *, max_batch: int = 64,
                 verbose: bool = False, mesh: Mesh | str | Mapping[str, int] | None = None):
        if tokenizer is None:
            raise ConfigError("LLM needs a tokenizer (the model directory has no tokenizer.json)")
        if max_batch < 1 or max_batch & (max_batch - 1):
            raise ConfigError(f"max_batch must be a power of two >= 1, got {max_batch}")
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.max_batch = max_batch
        self.verbose = verbose
        self.mesh = make_mesh(mesh) if mesh is not None else None
        self.programs = Programs(model, on_compile=self._log_compile, mesh=self.mesh)

    @classmethod
    def load(cls, name_or_path: str | os.PathLike, *, dtype: str = "float32",
             max_batch: int = 64, verbose: bool = False, quantize: str | None = None,
             mesh: Mesh | str | Mapping[str, int] | None = None,
             adapter: str | os.PathLike | None = None, merge: bool = False) -> LLM:
        """Any name or path `flaxlm.model.load` accepts; quantize="int8" for int8 weights;
        mesh: a `jax.sharding.Mesh` with axes data/fsdp/tensor, or their sizes
        ({"data": 2, "tensor": 4} or "data=2,tensor=4") to shard the model over.
        adapter: a PEFT adapter directory (LoRA or prompt tuning, flaxlm.model.peft_io) put
        on the base; served unmerged, or with merge=True a LoRA adapter folded into the
        float weights (an int8 base is served unmerged only)."""
        mesh = make_mesh(mesh) if mesh is not None else None  # checked before loading
        if merge and adapter is None:
            raise ConfigError("merge=True folds an adapter into the model; no adapter given")
        if adapter is not None:
            read_adapter(adapter)  # a bad directory is named before the model loads
        enable_compile_cache()  # before loading compiles anything
        model, tokenizer = load(name_or_path, dtype=dtype, quantize=quantize)
        if adapter is not None:
            kind = load_adapter(model, adapter)
            if merge and kind != "lora":
                raise ConfigError(f"{adapter}: a {kind} adapter has no weights to merge; "
                                  "serve it with merge=False")
            if merge:
                merge_lora(model)
        return cls(model, tokenizer, max_batch=max_batch, verbose=verbose, mesh=mesh)

    @property
    def num_compiled(self) -> int:
        """How many programs (prefill, step, loop) this LLM has compiled so far."""
        return self.programs.num_compiled

    def _log_compile(self, name: str, signature: str) -> None:
        message = f"compiling {name} program #{self.num_compiled} ({signature})"
        log.info(message)
        if self.verbose:
            print(f"[flaxlm] {message}", flush=True)

    # ------------------------------------------------------------------ generate

    def generate(self, prompts: Prompt | Sequence[Prompt], params: Params | None = None,
                 *, truncate: bool = False) -> list[GenerationResult]:
        """One result per prompt (a string or a list of token ids); `SamplingParams` sample,
        `BeamParams` run a beam search."""
        params = params or SamplingParams()
        prompt_ids = [self._prompt_ids(p, i, params, truncate)
                      for i, p in enumerate(_as_list(prompts))]
        return self._generate(prompt_ids, params)

    def chat(self, messages: Messages | Sequence[Messages], params: Params | None = None,
             *, truncate: bool = False) -> GenerationResult | list[GenerationResult]:
        """Reply to one conversation (a list of {role, content}) or to a list of them."""
        params = params or SamplingParams()
        single = bool(messages) and isinstance(messages[0], Mapping)
        conversations = [messages] if single else list(messages)
        prompt_ids = [self._prompt_ids(self.chat_prompt_ids(c), i, params, truncate)
                      for i, c in enumerate(conversations)]
        results = self._generate(prompt_ids, params)
        return results[0] if single else results

    def chat_prompt_ids(self, messages: Messages) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def stream(self, prompt: Prompt | Messages, params: SamplingParams | None = None,
               *, truncate: bool = False) -> TextStreamer:
        """An iterator of text pieces as they are generated (one prompt, or one chat
        conversation); after it ends it also holds token counts and timings."""
        params = params or SamplingParams()
        if isinstance(params, BeamParams):
            raise ConfigError(f"stream cannot show beam search (num_beams={params.num_beams}): "
                              "no token is final before the search ends; use generate")
        if params.n != 1:
            raise ConfigError(f"stream generates one sequence; got n={params.n}")
        if isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], Mapping):
            prompt = self.chat_prompt_ids(prompt)
        ids = self._prompt_ids(prompt, 0, params, truncate)
        row = self._rows([ids], params)[0]
        return TextStreamer(stream_row(self.programs, self.tokenizer, row))

    def conversation(self, params: SamplingParams | None = None, *, system: str | None = None,
                     capacity: int = DEFAULT_CAPACITY) -> Conversation:
        """A chat that keeps its KV cache between turns: `conversation.send(message)` streams
        each reply (a TextStreamer) and feeds the model only the turn's new tokens."""
        return Conversation(self, params, system=system, capacity=capacity)

    def _generate(self, prompt_ids: list[list[int]], params: Params) -> list[GenerationResult]:
        results = (self._generate_beams(prompt_ids, params) if isinstance(params, BeamParams)
                   else self._generate_samples(prompt_ids, params))
        if params.prompt_logprobs is not None:
            for result, logprobs in zip(results, self._prompt_logprobs(prompt_ids, params)):
                result.prompt_logprobs = logprobs
        return results

    def _prompt_logprobs(self, prompt_ids: list[list[int]], params: Params
                         ) -> list[list[dict[int, float] | None]]:
        """Every prompt token's logprob given the tokens before it, with the k best others."""
        k = params.prompt_logprobs
        items = [(tuple(ids[:1]), tuple(ids[1:])) for ids in prompt_ids if len(ids) > 1]
        scores = iter(score_items(self.programs, items, max_rows=self.max_batch,
                                  top_n=TOP_LOGPROBS if k else 0)) if items else iter(())
        out = []
        for ids in prompt_ids:
            row: list[dict[int, float] | None] = [None]
            if len(ids) > 1:
                s = next(scores)
                for j, token in enumerate(ids[1:]):
                    top = dict(list(s.top[j].items())[:k]) if k else {}
                    row.append({**top, token: s.logprobs[j]})
            out.append(row)
        return out

    def _generate_samples(self, prompt_ids: list[list[int]], params: SamplingParams
                          ) -> list[GenerationResult]:
        rows = self._rows(prompt_ids, params)
        completions: list[Completion] = []
        timings = []
        for i in range(0, len(rows), self.max_batch):
            done, timing = run_batch(self.programs, self.tokenizer, rows[i:i + self.max_batch])
            completions += done
            timings += [timing] * len(done)
        n = params.n
        results = []
        for k, ids in enumerate(prompt_ids):
            outs = sorted(completions[k * n:(k + 1) * n], key=lambda c: -c.cumulative_logprob)
            t = timings[k * n]
            steps = max(t.max_new_tokens - 1, 1)
            results.append(GenerationResult(prompt_token_ids=ids, outputs=outs, ttft_s=t.ttft_s,
                                            time_per_output_token_s=(t.total_s - t.ttft_s) / steps))
        return results

    def _generate_beams(self, prompt_ids: list[list[int]], params: BeamParams
                        ) -> list[GenerationResult]:
        """Beam search, max_batch // num_beams prompts per batch; outputs: the best hypotheses."""
        rows = self._rows(prompt_ids, params)
        per_batch = max(1, self.max_batch // params.num_beams)
        results = []
        for i in range(0, len(rows), per_batch):
            outputs, t = run_beam_batch(self.programs, self.tokenizer, rows[i:i + per_batch])
            per_token = t.total_s / max(t.max_new_tokens, 1)
            results += [GenerationResult(prompt_token_ids=list(row.prompt_ids), outputs=outs,
                                         ttft_s=t.ttft_s, time_per_output_token_s=per_token)
                        for row, outs in zip(rows[i:i + per_batch], outputs)]
        return results

    def _rows(self, prompt_ids: list[list[int]], params: Params) -> list[Row]:
        eos = () if params.ignore_eos else tuple(self.tokenizer.eos_token_ids)
        eos = tuple(dict.fromkeys(eos + tuple(params.stop_token_ids)))
        samples = params.n if isinstance(params, SamplingParams) else 1
        return [Row(prompt_ids=tuple(ids), params=params, eos_ids=eos, sample_index=s)
                for ids in prompt_ids for s in range(samples)]

    def _prompt_ids(self, prompt: Prompt, index: int, params: Params,
                    truncate: bool) -> list[int]:
        """Token ids of one prompt, checked against the vocabulary and the context."""
        if isinstance(prompt, str):
            if not prompt:
                raise ConfigError(f"prompt {index} is empty")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ConfigError(f"prompt {index} is empty")
        vocab = self.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ConfigError(f"prompt {index} has token ids outside the vocabulary "
                              f"[0, {vocab}): {bad[:5]}")
        params.check_vocab(vocab)
        virtual = virtual_tokens(self.model)  # a soft prompt's virtual tokens come first
        room = self.config.max_seq_len - params.max_new_tokens - virtual
        if len(ids) > room:
            if not truncate or room < 1:
                prompt = f" and {virtual} virtual tokens" if virtual else ""
                raise ConfigError(
                    f"prompt {index} has {len(ids)} tokens; with max_new_tokens="
                    f"{params.max_new_tokens}{prompt} the model's context of "
                    f"{self.config.max_seq_len} leaves room for {max(room, 0)} "
                    "(pass truncate=True to keep the last ones)")
            ids = ids[-room:]
        return ids


    # ------------------------------------------------------------------ scoring

    def loglikelihood(self, requests: Sequence[Request], *, progress: Progress = None
                      ) -> list[Loglikelihood]:
        """Score each `(context, continuation)` request (two strings, or two token-id lists):
        the summed log-probability of the continuation given the context, whether it
        is the greedy continuation, its token count and per-token logprobs.

        Strings are tokenized as lm-evaluation-harness does for causal models:
        trailing whitespace of the context moves to the start of the continuation;
        the context and context + continuation are encoded (with the tokenizer's
        own special tokens, unless the text starts with the prefix token) and the
        continuation is the tail of the whole past the context's length; an empty
        context is the prefix token (BOS, else EOS). When context + continuation
        exceed the model's window by more than the one unneeded last token, the
        context is cut from the left.

        Requests are packed into power-of-two buckets (see flaxlm.infer.scoring):
        requests with the same context share its forward pass, and the result of
        a request does not depend on what else is in the call.
        """
        items = [self._score_item(request, i) for i, request in enumerate(requests)]
        if not items:
            raise ConfigError("no requests given")
        scores = score_items(self.programs, items, max_rows=self.max_batch, progress=progress)
        return [Loglikelihood(logprob=float(np.sum(s.logprobs, dtype=np.float64)),
                              is_greedy=all(s.greedy), num_tokens=len(s.logprobs),
                              token_logprobs=s.logprobs) for s in scores]

    def loglikelihood_rolling(self, texts: Sequence[Prompt], window: int | None = None,
                              stride: int | None = None, *, progress: Progress = None
                              ) -> list[RollingLoglikelihood]:
        """The total log-probability and token count of each text (a string or token ids).

        Every token is scored once, the first given the prefix token (BOS, else EOS),
        strings encoded as lm-evaluation-harness's HFLM does. Windows of at most
        `window` input tokens (default: the model's context) each score `stride`
        tokens (default: `window`, which are lm-evaluation-harness's disjoint
        windows) with as much left context as the window allows: the strided
        perplexity method, exact for texts longer than the context.
        """
        context = self.config.max_seq_len
        window = context if window is None else _check_setting("window", window, 1, context)
        stride = window if stride is None else _check_setting("stride", stride, 1, window)
        prefix = prefix_token_id(self.tokenizer)
        if prefix is None:
            raise ConfigError("the tokenizer has neither a BOS nor an EOS token to condition "
                              "a text's first token on")
        windows = [rolling_items(self._text_ids(t, i), prefix, window, stride)
                   for i, t in enumerate(_as_list(texts))]
        flat = [item for items in windows for item in items]
        scores = iter(score_items(self.programs, flat, max_rows=self.max_batch, progress=progress))
        out = []
        for items in windows:
            parts = [next(scores) for _ in items]
            out.append(RollingLoglikelihood(
                logprob=float(sum(np.sum(p.logprobs, dtype=np.float64) for p in parts)),
                num_tokens=sum(len(p.logprobs) for p in parts)))
        return out

    def embed(self, texts: Sequence[Prompt], pooling: str = "mean", normalize: bool = True, *,
              truncate: bool = False) -> np.ndarray:
        """float32 [n, hidden] sentence embeddings from the final (normed) hidden states:
        the mean over real tokens ("mean") or the last token ("last"), L2-normalized
        unless normalize=False. Padding changes nothing."""
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        limit = self.config.max_seq_len
        ids = []
        for i, text in enumerate(_as_list(texts)):
            row = self._text_ids(text, i, add_special_tokens=True)
            if len(row) > limit and not truncate:
                raise ConfigError(f"text {i} has {len(row)} tokens, more than the model's context "
                                  f"of {limit} (pass truncate=True to keep the first ones)")
            ids.append(row[:limit])
        return embed_ids(self.programs, ids, pooling=pooling, normalize=normalize,
                         max_rows=self.max_batch)

    def trace(self, texts: Sequence[Prompt], *, logit_lens: int = 0,
              add_special_tokens: bool = True) -> list[TraceResult]:
        """A look inside, per text (a string or token ids, within the context): every layer's
        residual-stream output and attention probabilities, the logits, and with
        logit_lens=k each layer's top-k next tokens read through the final norm and LM head
        (see TraceResult). The probabilities are HF's `output_attentions`."""
        if isinstance(logit_lens, bool) or not isinstance(logit_lens, int) or logit_lens < 0:
            raise ConfigError(f"logit_lens must be an int >= 0, got {logit_lens!r}")
        if logit_lens > self.config.vocab_size:
            raise ConfigError(f"logit_lens={logit_lens} is more than the vocabulary "
                              f"({self.config.vocab_size})")
        limit = self.config.max_seq_len
        ids = []
        for i, text in enumerate(_as_list(texts)):
            row = self._text_ids(text, i, add_special_tokens=add_special_tokens)
            if len(row) > limit:
                raise ConfigError(f"text {i} has {len(row)} tokens, more than the model's "
                                  f"context of {limit}")
            ids.append(row)
        return trace_ids(self.programs, ids, logit_lens=logit_lens, max_rows=self.max_batch,
                         token_text=lambda t: self.tokenizer.decode([int(t)]))

    def _text_ids(self, text: Prompt, index: int, add_special_tokens: bool | None = None
                  ) -> list[int]:
        if isinstance(text, str):
            ids = (harness_encode(self.tokenizer, text) if add_special_tokens is None
                   else self.tokenizer.encode(text, add_special_tokens=add_special_tokens))
        else:
            ids = [int(t) for t in text]
        if not ids:
            raise ConfigError(f"text {index} is empty")
        self._check_ids(ids, f"text {index}")
        return ids

    def _check_ids(self, ids: Sequence[int], what: str) -> None:
        vocab = self.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ConfigError(f"{what} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")

    def _score_item(self, request: Request, index: int) -> Item:
        """(context, continuation) ids of one request, the context cut to the window."""
        if isinstance(request, (str, bytes)) or not isinstance(request, Sequence) \
                or len(request) != 2:
            raise ConfigError(f"request {index} must be a (context, continuation) pair, "
                              f"got {request!r:.80}")
        context, continuation = request
        if isinstance(context, str) and isinstance(continuation, str):
            if not continuation:
                raise ConfigError(f"request {index}: the continuation is empty")
            context, continuation = encode_pair(self.tokenizer, context, continuation)
        elif isinstance(context, str) or isinstance(continuation, str):
            raise ConfigError(f"request {index}: context and continuation must both be strings "
                              "or both token-id lists")
        context, continuation = [int(t) for t in context], [int(t) for t in continuation]
        if not context or not continuation:
            part = "context" if not context else "continuation"
            raise ConfigError(f"request {index}: the {part} has no tokens")
        self._check_ids(context + continuation, f"request {index}")
        window = self.config.max_seq_len
        if len(continuation) > window:
            raise ConfigError(f"request {index}: the continuation has {len(continuation)} tokens, "
                              f"more than the model's context of {window}")
        whole = context + continuation
        if len(whole) - 1 > window:
            context = whole[-(window + 1):-len(continuation)]
        return tuple(context), tuple(continuation)


def _check_setting(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} must be an int in [{low}, {high}], got {value!r}")
    return value


class TextStreamer:
    """Iterates over text pieces; when exhausted, `token_ids` (the generated tokens, as
    `generate` returns them), `num_tokens`, `finish_reason`, `ttft_s` (first token,
    compilation included) and `decode_tokens_per_s` are set."""

    def __init__(self, pieces: Iterator[tuple[str, StreamEnd | None]]):
        self._pieces = pieces
        self._start = time.perf_counter()
        self._first: float | None = None
        self.token_ids: list[int] = []
        self.num_tokens = 0
        self.finish_reason: str | None = None
        self.ttft_s: float | None = None
        self.decode_tokens_per_s: float | None = None

    def __iter__(self) -> TextStreamer:
        return self

    def __next__(self) -> str:
        for piece, final in self._pieces:
            if final is not None:
                self._finish(final)
                break
            if self._first is None:
                self._first = time.perf_counter()
                self.ttft_s = self._first - self._start
            return piece
        raise StopIteration

    def _finish(self, final: StreamEnd) -> None:
        end = time.perf_counter()
        self.token_ids = list(final.token_ids)
        self.num_tokens = final.num_tokens
        self.finish_reason = final.finish_reason
        if self._first is not None and self.num_tokens > 1:
            self.decode_tokens_per_s = (self.num_tokens - 1) / max(end - self._first, 1e-9)


def _as_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], int):
        return [prompts]  # one prompt given as token ids
    if not prompts:
        raise ConfigError("no prompts given")
    return prompts


def majority_vote(llm: LLM, prompt: Prompt | Messages, extract, params: SamplingParams
                  ) -> tuple[Any, float]:
    """Self-consistency: draw `params.n` samples, map each text through `extract`
    (returning None for "no answer"), return the most common answer and its vote
    share among all samples."""
    if isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], Mapping):
        result = llm.chat(prompt, params)
    else:
        result = llm.generate(prompt, params)[0]
    answers = [extract(c.text) for c in result.outputs]
    counts: dict[Any, int] = {}
    for answer in answers:
        if answer is not None:
            counts[answer] = counts.get(answer, 0) + 1
    if not counts:
        return None, 0.0
    best = max(counts, key=counts.get)
    return best, counts[best] / len(answers)
