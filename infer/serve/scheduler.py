"""Continuous batching: requests join and leave a running decode batch between steps.

One thread owns the device state (`SlotState`, flaxlm.infer.serve.slots). Each
round it (1) frees the slots of finished, cancelled or timed-out requests,
(2) prefills chunks of the oldest waiting requests, up to `prefill_tokens`
prompt tokens (so streams keep flowing while a long prompt goes in), and
inserts each request into its `n` reserved slots once its prompt is in,
(3) runs the decode program: one step while a request waits or is being
prefilled, else up to `steps_per_round` steps in one call, and (4) hands every
request the tokens it got, as text through its own `TextStream` (stop
strings), via the request's `emit` callback.

Programs: `feed` per chunk size, `insert` per top-logprobs width (0 or
TOP_LOGPROBS), `decode` per width and number of rows computed (powers of two up
to max_slots: the busy slots are kept low, so few requests cost few rows), the
slot state once: `warmup()` compiles them all, so no request compiles anything
whatever its settings.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import Callable

import jax
import numpy as np

from flaxlm.infer.generate import TOP_LOGPROBS
from flaxlm.infer.sampling import RowSpec, SamplingArrays, SamplingParams
from flaxlm.infer.serve.slots import Chosen, decode, empty_slots, insert
from flaxlm.infer.text import TextStream
from flaxlm.model.errors import ConfigError, FlaxlmError

log = logging.getLogger("flaxlm.serve")

CHUNKS = (16, 32, 64, 128, 256)  # prefill chunks: the smallest that holds the rest, else the largest
STEPS_PER_ROUND = 8     # decode steps per host round trip when nobody waits
PREFILL_TOKENS = 512    # prompt tokens (whole chunks, at least one) fed between decode calls


class QueueFull(FlaxlmError):
    """The waiting queue holds --max-queue requests."""


@dataclasses.dataclass
class Event:
    """What a request hears: new text of choice `index`, its end, or a failure."""

    index: int
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None   # "stop", "length", "cancelled", "timeout"
    error: BaseException | None = None


@dataclasses.dataclass(eq=False)
class Request:
    """A prompt to continue `params.n` times; `emit(Event)` runs on the scheduler thread."""

    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    timeout_s: float | None = None
    submitted: float = dataclasses.field(default_factory=time.monotonic)
    cancelled: bool = False          # set by the caller (a client disconnect)
    sampling: list = dataclasses.field(default_factory=list)  # per choice, set by submit

    def cancel(self) -> None:
        self.cancelled = True


@dataclasses.dataclass(eq=False)
class _Choice:
    request: Request
    index: int
    slot: int
    stream: TextStream
    finished: bool = False


@dataclasses.dataclass(eq=False)
class _Prefill:
    request: Request
    slots: list[int]
    done: int = 0          # prompt tokens fed
    logits: object = None


class Scheduler:
    """`max_slots` decode slots over an `LLM`'s model; `submit` from any thread."""

    def __init__(self, llm, *, max_slots: int = 16, max_queue: int = 256,
                 context: int | None = None, steps_per_round: int = STEPS_PER_ROUND,
                 chunks: tuple[int, ...] = CHUNKS, prefill_tokens: int = PREFILL_TOKENS):
        for name, value in (("max_slots", max_slots), ("max_queue", max_queue),
                            ("steps_per_round", steps_per_round),
                            ("prefill_tokens", prefill_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        if llm.programs.virtual_tokens:
            raise ConfigError("serving a prompt-tuning adapter (soft prompt) is not supported "
                              "yet; serve it with `flaxlm chat`/`generate --adapter`, or a "
                              "LoRA adapter here")
        limit, big = llm.config.max_seq_len, max(chunks)
        context = min(limit, 2048) if context is None else context
        if isinstance(context, bool) or not isinstance(context, int) or \
                not big <= context <= max(limit, big) or context % big:
            raise ConfigError(f"context must be a multiple of {big} in [{big}, "
                              f"{max(limit, big)}], got {context!r}")
        self.chunks = tuple(sorted(chunks))
        self.llm, self.programs, self.tokenizer = llm, llm.programs, llm.tokenizer
        self.max_slots, self.max_queue, self.steps = max_slots, max_queue, steps_per_round
        self.prefill_tokens = prefill_tokens
        # decode computes the first `rows` slots: powers of two below max_slots, and all
        self.row_buckets = tuple(1 << k for k in range(max_slots.bit_length())
                                 if 1 << k < max_slots) + (max_slots,)
        self.cache_len = context
        self.context = min(context, limit)  # prompt + max_tokens of one request
        self._lock = threading.Condition()
        self._queue: collections.deque[Request] = collections.deque()
        self._free = list(range(max_slots))
        self._choices: dict[int, _Choice] = {}
        self._prefill: _Prefill | None = None    # the request whose prompt is being fed
        self._inserting: _Prefill | None = None  # the request going into its slots
        self._cancel = np.zeros((max_slots,), bool)
        self._stopping = self._closed = False
        self._thread: threading.Thread | None = None
        self._state = self._empty_state()
        self._row_cache = self.programs.empty_cache(1, self.cache_len)

    # ------------------------------------------------------------------ public

    @property
    def num_compiled(self) -> int:
        return self.programs.num_compiled

    @property
    def queue_depth(self) -> int:
        return len(self._queue) + (self._prefill is not None)

    @property
    def busy_slots(self) -> int:
        return self.max_slots - len(self._free)

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """A ConfigError naming the problem if this request can never run."""
        if params.n > self.max_slots:
            raise ConfigError(f"n={params.n} is more than the server's {self.max_slots} slots")
        if len(prompt_ids) + params.max_new_tokens > self.context:
            raise ConfigError(
                f"the prompt has {len(prompt_ids)} tokens and max_tokens is "
                f"{params.max_new_tokens}: together more than the context of {self.context}")

    def submit(self, request: Request) -> None:
        """Queue a request (checked); QueueFull when `max_queue` wait already."""
        self.check(request.prompt_ids, request.params)
        vocab = self.llm.config.vocab_size
        eos = self._eos_ids(request.params)
        request.sampling = [SamplingArrays.build([RowSpec(params=request.params, eos_ids=eos,
                                                          sample_index=k)], vocab, 1)
                            for k in range(request.params.n)]  # settings checked here
        with self._lock:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting (--max-queue)")
            self._queue.append(request)
            self._lock.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="flaxlm-scheduler", daemon=True)
        self._thread.start()

    def stop(self, drain_s: float = 30.0) -> None:
        """Take no more requests; let those in flight finish for up to `drain_s`, then cancel
        the rest; stop the thread."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        deadline = time.monotonic() + drain_s
        while (self._queue or self._choices or self._prefill) and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._lock:
            for request in list(self._queue) + [c.request for c in self._choices.values()]:
                request.cancel()
            self._closed = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def warmup(self) -> None:
        """Compile every program a request can need (runs before `start`)."""
        vocab = self.llm.config.vocab_size
        for chunk in self.chunks:
            cache, logits = self.programs.feed(self._row_cache, np.ones((1, chunk), np.int32),
                                               np.ones((1,), np.int32), keep=0)
            self._row_cache = cache
        cancel = np.zeros((self.max_slots,), bool)
        for top_n in (0, TOP_LOGPROBS):
            sampling = SamplingArrays.build([RowSpec(SamplingParams(max_new_tokens=1))], vocab, 1)
            self._state, _ = self._insert(top_n)(self.programs.state, self._state, self._row_cache,
                                                 logits, np.zeros((1, vocab), bool), sampling,
                                                 np.int32(0), top_n=top_n)
            for rows in self.row_buckets:
                self._state, chosen = self._decode(top_n)(
                    self.programs.state, self._state, cancel, np.int32(1), steps=self.steps,
                    top_n=top_n, rows=rows)
        jax.block_until_ready(chosen)

    # ------------------------------------------------------------------ the loop

    def _empty_state(self):
        init = self._program("slots", empty_slots, static_argnames=("slots", "cache_len"))
        return init(self.programs.state,
                    SamplingArrays.build([], self.llm.config.vocab_size, self.max_slots),
                    slots=self.max_slots, cache_len=self.cache_len)

    def _program(self, name, fn, **jit_kwargs):
        return self.programs.program(name, fn, **jit_kwargs)

    def _insert(self, top_n: int):
        return self._program(f"insert{top_n}", insert, donate_argnums=(1,),
                             static_argnames=("top_n",))

    def _decode(self, top_n: int):
        return self._program(f"decode{top_n}", decode, donate_argnums=(1,),
                             static_argnames=("steps", "top_n", "rows"))

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._has_work() and not self._closed:
                    self._lock.wait(timeout=0.05)
                if self._closed and not self._choices and self._prefill is None:
                    for request in self._queue:
                        self._fail(request, "cancelled")
                    self._queue.clear()
                    return
            try:
                self._round()
            except Exception as error:  # noqa: BLE001 - the server goes on
                log.exception("scheduler round failed")
                self._fail_all(error)

    def _has_work(self) -> bool:
        return bool(self._queue or self._choices or self._prefill)

    def _round(self) -> None:
        self._expire()
        self._release()
        budget = self.prefill_tokens  # prompt tokens fed between two decode calls
        while budget > 0:
            self._admit()
            if self._prefill is None:
                break
            budget -= self._feed_chunk()
        if self._choices:
            waiting = self._prefill is not None or (self._queue and self._free)
            self._decode_round(1 if waiting else self.steps)

    def _expire(self) -> None:
        """Finish the choices of cancelled or timed-out requests, waiting ones too."""
        now = time.monotonic()
        for choice in list(self._choices.values()):
            reason = _ended(choice.request, now)
            if reason is not None:
                self._finish(choice, reason)
        with self._lock:
            for request in [r for r in self._queue if _ended(r, now)]:
                self._queue.remove(request)
                self._fail(request, _ended(request, now))

    def _release(self) -> None:
        for slot, choice in list(self._choices.items()):
            if choice.finished:
                del self._choices[slot]
                self._free.append(slot)
                self._cancel[slot] = True

    def _admit(self) -> None:
        with self._lock:
            if self._prefill is not None or not self._queue:
                return
            request = self._queue[0]
            if request.params.n > len(self._free):
                return
            self._queue.popleft()
        self._free.sort()
        slots, self._free = self._free[:request.params.n], self._free[request.params.n:]
        self._prefill = _Prefill(request=request, slots=slots)

    def _feed_chunk(self) -> int:
        """Feed the next chunk of the request being prefilled; the chunk's size."""
        p = self._prefill
        request = p.request
        if _ended(request, time.monotonic()):
            self._free += p.slots
            self._prefill = None
            self._fail(request, _ended(request, time.monotonic()))
            return 0
        ids = request.prompt_ids
        rest = len(ids) - p.done
        size = next((c for c in self.chunks if c >= rest), self.chunks[-1])
        chunk = ids[p.done:p.done + size]
        tokens = np.zeros((1, size), np.int32)
        tokens[0, :len(chunk)] = chunk
        self._row_cache, p.logits = self.programs.feed(
            self._row_cache, tokens, np.array([len(chunk)], np.int32), keep=p.done)
        p.done += len(chunk)
        if p.done == len(ids):
            self._prefill, self._inserting = None, p
            self._insert_choices(p)
            self._inserting = None
        return size

    def _insert_choices(self, p: _Prefill) -> None:
        request, vocab = p.request, self.llm.config.vocab_size
        seen = np.zeros((1, vocab), bool)
        seen[0, request.prompt_ids] = True
        top_n = TOP_LOGPROBS if request.params.logprobs else 0
        run = self._insert(top_n)
        for index, slot in enumerate(p.slots):
            self._state, chosen = run(self.programs.state, self._state, self._row_cache,
                                      p.logits, seen, request.sampling[index], np.int32(slot),
                                      top_n=top_n)
            self._cancel[slot] = False
            choice = _Choice(request=request, index=index, slot=slot,
                             stream=TextStream(self.tokenizer, request.params.stop))
            self._choices[slot] = choice
            self._guarded(choice, jax.device_get(chosen), 0)

    def _eos_ids(self, params: SamplingParams) -> tuple[int, ...]:
        """As LLM.generate: the tokenizer's eos ids unless ignore_eos, plus stop_token_ids."""
        eos = () if params.ignore_eos else tuple(self.tokenizer.eos_token_ids)
        return tuple(dict.fromkeys(eos + tuple(params.stop_token_ids)))

    def _decode_round(self, limit: int) -> None:
        top_n = TOP_LOGPROBS if any(c.request.params.logprobs for c in self._choices.values()) \
            else 0
        cancel, self._cancel = self._cancel, np.zeros((self.max_slots,), bool)
        highest = max(self._choices) + 1  # busy slots are the lowest free ones when taken
        rows = next(r for r in self.row_buckets if r >= highest)
        self._state, chosen = self._decode(top_n)(self.programs.state, self._state, cancel,
                                                  np.int32(limit), steps=self.steps,
                                                  top_n=top_n, rows=rows)
        chosen = jax.device_get(chosen)
        for slot, choice in list(self._choices.items()):
            if not choice.finished:
                self._guarded(choice, chosen, slot)

    def _guarded(self, choice: _Choice, chosen: Chosen, row: int) -> None:
        """Deliver; a host-side fault (detokenizing, a listener) fails this request alone."""
        try:
            self._deliver(choice, chosen, row)
        except Exception as error:  # noqa: BLE001
            log.exception("request failed")
            for other in self._choices.values():
                if other.request is choice.request:
                    other.finished = True
            self._emit(choice.request, Event(index=-1, error=error))

    def _deliver(self, choice: _Choice, chosen: Chosen, row: int) -> None:
        """Pass the tokens row `row` of `chosen` holds to the request, through its TextStream."""
        want = choice.request.params.logprobs
        event = Event(index=choice.index)
        for k in range(int(chosen.steps)):
            token = int(chosen.tokens[row, k])
            before = choice.stream.num_tokens
            if token < 0 or choice.stream.stopped:
                break
            event.text += choice.stream.push([token])
            if choice.stream.num_tokens == before:
                break
            event.token_ids.append(token)
            if want is not None:
                event.logprobs.append(float(chosen.logprobs[row, k]))
            if want:
                event.top_logprobs.append(
                    {int(t): float(lp) for t, lp in zip(chosen.top_ids[row, k, :want],
                                                        chosen.top_logprobs[row, k, :want])})
        if choice.stream.stopped or bool(chosen.done[row]):
            reason = "stop" if choice.stream.stopped or bool(chosen.stopped[row]) else "length"
            event.text += choice.stream.finish(reason)
            event.finish_reason = reason
            choice.finished = True
        if event.token_ids or event.text or event.finish_reason:
            self._emit(choice.request, event)

    def _finish(self, choice: _Choice, reason: str) -> None:
        if not choice.finished:
            choice.finished = True
            self._emit(choice.request, Event(index=choice.index, finish_reason=reason))

    def _fail(self, request: Request, reason: str) -> None:
        for index in range(request.params.n):
            self._emit(request, Event(index=index, finish_reason=reason))

    def _fail_all(self, error: Exception) -> None:
        """A failed program: every request in flight fails; the slots start again empty."""
        requests = {id(c.request): c.request for c in self._choices.values()}
        for p in (self._prefill, self._inserting):
            if p is not None:
                requests[id(p.request)] = p.request
        for request in requests.values():
            self._emit(request, Event(index=-1, error=error))
        self._choices.clear()
        self._prefill = self._inserting = None
        self._free = list(range(self.max_slots))
        self._cancel[:] = False
        self._state = self._empty_state()  # a failed call may have consumed the donated state
        self._row_cache = self.programs.empty_cache(1, self.cache_len)

    def _emit(self, request: Request, event: Event) -> None:
        try:
            request.emit(event)
        except Exception:  # noqa: BLE001 - a listener's fault must not stop the loop
            log.exception("a request's listener failed")


def _ended(request: Request, now: float) -> str | None:
    """"cancelled" or "timeout" when the request should stop now, else None."""
    if request.cancelled:
        return "cancelled"
    if request.timeout_s is not None and now - request.submitted > request.timeout_s:
        return "timeout"
    return None
