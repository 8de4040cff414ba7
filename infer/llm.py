"""The public inference API: `LLM.load(...)`, `generate`, `chat`, `stream`."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Iterator, Mapping, Sequence

from jax.sharding import Mesh

from flaxlm.infer.beam import run_beam_batch
from flaxlm.infer.engine import Programs
from flaxlm.infer.generate import Completion, Row, StreamEnd, run_batch, stream_row
from flaxlm.infer.sampling import SamplingParams
from flaxlm.model.decoder import Decoder
from flaxlm.model.errors import ConfigError
from flaxlm.model.loading import load
from flaxlm.model.sharding import make_mesh
from flaxlm.model.tokenizer import Tokenizer

log = logging.getLogger("flaxlm.infer")

Prompt = str | Sequence[int]
Messages = Sequence[Mapping[str, Any]]


@dataclasses.dataclass
class GenerationResult:
    """The completions of one prompt, best first, with timings."""

    prompt_token_ids: list[int]
    outputs: list[Completion]
    ttft_s: float                   # time to first token (prefill of the prompt's batch)
    time_per_output_token_s: float  # decode time per token after the first

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
             mesh: Mesh | str | Mapping[str, int] | None = None) -> LLM:
        """Any name or path `flaxlm.model.load` accepts; quantize="int8" for int8 weights;
        mesh: a `jax.sharding.Mesh` with axes data/fsdp/tensor, or their sizes
        ({"data": 2, "tensor": 4} or "data=2,tensor=4") to shard the model over."""
        mesh = make_mesh(mesh) if mesh is not None else None  # checked before loading
        model, tokenizer = load(name_or_path, dtype=dtype, quantize=quantize)
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

    def generate(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | None = None,
                 *, truncate: bool = False) -> list[GenerationResult]:
        """One result per prompt (a string or a list of token ids)."""
        params = params or SamplingParams()
        prompt_ids = [self._prompt_ids(p, i, params, truncate)
                      for i, p in enumerate(_as_list(prompts))]
        return self._generate(prompt_ids, params)

    def chat(self, messages: Messages | Sequence[Messages], params: SamplingParams | None = None,
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
        if params.n != 1:
            raise ConfigError(f"stream generates one sequence; got n={params.n}")
        if params.num_beams > 1:
            raise ConfigError(f"stream cannot show beam search (num_beams={params.num_beams}): "
                              "no token is final before the search ends; use generate")
        if isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], Mapping):
            prompt = self.chat_prompt_ids(prompt)
        ids = self._prompt_ids(prompt, 0, params, truncate)
        row = self._rows([ids], params)[0]
        return TextStreamer(stream_row(self.programs, self.tokenizer, row))

    def _generate(self, prompt_ids: list[list[int]], params: SamplingParams
                  ) -> list[GenerationResult]:
        if params.num_beams > 1:
            return self._generate_beams(prompt_ids, params)
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

    def _generate_beams(self, prompt_ids: list[list[int]], params: SamplingParams
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

    def _rows(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[Row]:
        eos = () if params.ignore_eos else tuple(self.tokenizer.eos_token_ids)
        eos = tuple(dict.fromkeys(eos + tuple(params.stop_token_ids)))
        return [Row(prompt_ids=tuple(ids), params=params, eos_ids=eos, sample_index=s)
                for ids in prompt_ids for s in range(params.n)]

    def _prompt_ids(self, prompt: Prompt, index: int, params: SamplingParams,
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
        room = self.config.max_seq_len - params.max_new_tokens
        if len(ids) > room:
            if not truncate or room < 1:
                raise ConfigError(
                    f"prompt {index} has {len(ids)} tokens; with max_new_tokens="
                    f"{params.max_new_tokens} the model's context of {self.config.max_seq_len} "
                    f"leaves room for {max(room, 0)} (pass truncate=True to keep the last ones)")
            ids = ids[-room:]
        return ids


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
