"""A chat whose KV cache lives from turn to turn.

Each turn's prompt is the whole conversation through the chat template. It
starts with what the cache already holds (the earlier prompt and the reply's
tokens), so a turn feeds only the tokens after the longest shared start, in
chunks of `CHUNK` tokens, into a cache of fixed capacity. The programs are one
`feed` (a chunk), one `begin` (the first token) and the `run` loop, whatever
the prompt's length: after the first turn a conversation compiles nothing,
and a turn's first token waits only for its new tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Mapping

import jax
import numpy as np

from flaxlm.infer.engine import LoopState
from flaxlm.infer.generate import StreamEnd, bucket, make_batch, stream_loop
from flaxlm.infer.sampling import SamplingParams
from flaxlm.model.errors import ConfigError

if TYPE_CHECKING:
    from flaxlm.infer.llm import LLM

CHUNK = 128             # prompt tokens per `feed` call
DEFAULT_CAPACITY = 2048  # cache slots: prompt + reply of the longest turn, plus a chunk


class Conversation:
    """Messages so far and the cache that holds them; `send` streams the next reply.

    The cache grows (to the next power of two, compiling the programs of that
    size once) only when a turn would not fit `capacity` slots. A reply is added
    to the messages when its stream has been read to the end.
    """

    def __init__(self, llm: LLM, params: SamplingParams | None = None, *,
                 system: str | None = None, capacity: int = DEFAULT_CAPACITY):
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams) or params.n != 1:
            raise ConfigError("a conversation streams one sampled reply per turn: "
                              f"SamplingParams with n=1, got {params!r:.80}")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ConfigError(f"capacity must be an int >= 1, got {capacity!r}")
        self.llm, self.params = llm, params
        self.messages: list[Mapping[str, Any]] = (
            [{"role": "system", "content": system}] if system else [])
        self.capacity = bucket(capacity, CHUNK)
        self._cache = None           # KVCache [1, ...] of `capacity` slots
        self._held: list[int] = []   # the tokens whose keys and values the cache holds
        self.fed_tokens = 0          # prompt tokens the last turn fed (the rest were held)

    def send(self, message: str):
        """Add a user message; returns a TextStreamer of the reply (see LLM.stream)."""
        from flaxlm.infer.llm import TextStreamer

        if not isinstance(message, str) or not message.strip():
            raise ConfigError("the message is empty")
        messages = [*self.messages, {"role": "user", "content": message}]
        ids = self.llm._prompt_ids(self.llm.chat_prompt_ids(messages), 0, self.params, False)
        self.messages = messages
        return TextStreamer(self._reply(ids))

    def _reply(self, ids: list[int]) -> Iterator[tuple[str, StreamEnd | None]]:
        row = self.llm._rows([ids], self.params)[0]
        max_new = make_batch([row], self.llm.config.vocab_size).max_new
        self._fit(len(ids) + self.llm.programs.virtual_tokens + max(CHUNK, max_new))
        b = make_batch([row], self.llm.config.vocab_size, prompt_len=self.capacity)
        loop = self._start(ids, b)
        pieces = []
        for piece, end in stream_loop(self.llm.programs, self.llm.tokenizer, loop, b):
            pieces.append(piece)
            if end is not None:
                self._finish(ids, "".join(pieces), end.loop)
            yield piece, end

    def _fit(self, slots: int) -> None:
        """Grow the capacity (and drop the cache) if a turn needs more slots."""
        if slots > self.capacity:
            self.capacity = bucket(slots, CHUNK)
            self._cache, self._held = None, []

    def _start(self, ids: list[int], b) -> LoopState:
        """Feed what the cache lacks of `ids`, then choose the first token."""
        programs = self.llm.programs
        if self._cache is None:
            self._cache = programs.empty_cache(1, self.capacity)
        keep = min(_shared_start(self._held, ids), len(ids) - 1)
        self.fed_tokens = len(ids) - keep
        virtual = programs.virtual_tokens  # a soft prompt's slots come first
        cache, logits = self._cache, None
        for begin in range(keep, len(ids), CHUNK):
            chunk = ids[begin:begin + CHUNK]
            tokens = np.zeros((1, CHUNK), np.int32)
            tokens[0, :len(chunk)] = chunk
            cache, logits = programs.feed(cache, tokens, np.array([len(chunk)], np.int32),
                                          keep=begin + virtual if begin else 0,
                                          first=begin == 0)
        self._cache, self._held = None, []  # donated: held again once the turn ends
        return programs.begin(cache, logits, b.tokens, b.lengths, b.active, b.sampling,
                              max_new=b.max_new, top_n=b.top_n)

    def _finish(self, ids: list[int], reply: str, loop: LoopState) -> None:
        self.messages = [*self.messages, {"role": "assistant", "content": reply}]
        fed, generated = jax.device_get((loop.cache.lengths, loop.tokens))
        self._cache = loop.cache
        fed = int(fed[0]) - self.llm.programs.virtual_tokens
        self._held = ids + [int(t) for t in generated[0, :fed - len(ids)]]


def _shared_start(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
