"""The OpenAI-compatible HTTP API over a `Scheduler` (FastAPI).

`create_app(llm, scheduler, ...)` serves /v1/models, /v1/completions,
/v1/chat/completions (server-sent events when `stream`), /v1/embeddings,
/health and /metrics. Errors are OpenAI error objects: 400 naming the field
(`context_length_exceeded` for a prompt that does not fit), 401 without the API
key, 404 for another model's name, 429 when the queue is full, 408 when a
request runs past its timeout, 500 when generating it failed (that request
alone). A client that goes away cancels its request and frees its slots.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from typing import Any, AsyncIterator

import numpy as np
from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from flaxlm.infer.serve.metrics import Metrics
from flaxlm.infer.serve.protocol import (BadRequest, ChatBody, CompletionBody, EmbeddingBody,
                                         chat_logprobs, chat_messages, completion_logprobs,
                                         error_body, new_id, now, sampling_params, usage)
from flaxlm.infer.serve.scheduler import Event, QueueFull, Request, Scheduler
from flaxlm.model.errors import ConfigError, FlaxlmError

log = logging.getLogger("flaxlm.serve")


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str, param=None, code=None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code


def create_app(llm, scheduler: Scheduler, *, model_name: str, defaults: dict[str, Any],
               api_key: str | None = None, request_timeout_s: float | None = 600.0) -> FastAPI:
    metrics = Metrics(scheduler)
    server = _Server(llm, scheduler, metrics, model_name, defaults, request_timeout_s)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(scheduler.stop)

    app = FastAPI(title="flaxlm", lifespan=lifespan)
    app.state.server = server

    @app.middleware("http")
    async def authorize(request: HttpRequest, call_next):
        if api_key is not None and request.url.path.startswith("/v1"):
            if request.headers.get("authorization") != f"Bearer {api_key}":
                return _error(ApiError(401, "a valid API key is needed "
                                       "(Authorization: Bearer KEY)", "authentication_error",
                                       code="invalid_api_key"))
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: HttpRequest, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        metrics.requests.labels(endpoint=request.url.path, status="400").inc()
        return _error(ApiError(400, f"{param or 'body'}: {first.get('msg', 'invalid')}",
                               "invalid_request_error", param=param))

    @app.exception_handler(ApiError)
    async def api_error(request: HttpRequest, exc: ApiError):
        if not getattr(exc, "counted", False):
            metrics.requests.labels(endpoint=request.url.path, status=str(exc.status)).inc()
        return _error(exc)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": server.created, "owned_by": "flaxlm"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HttpRequest):
        return await server.completions(body, http)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, http: HttpRequest):
        return await server.chat(body, http)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingBody):
        return await server.embeddings(body)

    return app


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(error_body(str(exc), exc.kind, exc.param, exc.code),
                        status_code=exc.status)


class _Server:
    """The endpoints' work: requests into the scheduler, events into OpenAI objects."""

    def __init__(self, llm, scheduler, metrics, model_name, defaults, timeout_s):
        self.llm, self.scheduler, self.metrics = llm, scheduler, metrics
        self.model_name, self.defaults, self.timeout_s = model_name, defaults, timeout_s
        self.tokenizer = llm.tokenizer
        self.created = now()

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves "
                           f"{self.model_name!r}", "invalid_request_error", "model",
                           "model_not_found")

    # ------------------------------------------------------------------ completions

    async def completions(self, body: CompletionBody, http: HttpRequest):
        self._check_model(body.model)
        for name in ("echo", "suffix"):
            if getattr(body, name):
                raise ApiError(400, f"{name} is not supported", "invalid_request_error", name)
        prompts = self._prompt_ids(body.prompt)
        params = self._params(body, body.max_tokens or 16, body.logprobs)
        submitted = []
        try:
            for ids in prompts:
                submitted.append(self._submit(ids, params))
        except ApiError:  # the prompts queued before a refused one do not run
            for listener in submitted:
                listener.request.cancel()
            raise
        id_, created = new_id("cmpl"), now()

        def shape(p: int, e: Event, offset: int) -> dict[str, Any]:
            logprobs = (completion_logprobs(self.tokenizer, e.token_ids, e.logprobs,
                                            e.top_logprobs, offset)
                        if body.logprobs is not None else None)
            return {"index": p * params.n + e.index, "text": e.text, "logprobs": logprobs,
                    "finish_reason": e.finish_reason}

        base = {"id": id_, "object": "text_completion", "created": created,
                "model": self.model_name}
        if body.stream:
            return self._sse(submitted, http, base, shape, body, role=False)
        choices = await self._collect(submitted, http)
        out = [shape(p, e, 0) for p, e in choices]
        return {**base, "choices": sorted(out, key=lambda c: c["index"]),
                "usage": self._usage(submitted, choices)}

    def _prompt_ids(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            prompts = [prompt]
        elif prompt and all(isinstance(t, int) for t in prompt):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts:
            raise ApiError(400, "prompt is empty", "invalid_request_error", "prompt")
        out = []
        for item in prompts:
            ids = self.tokenizer.encode(item) if isinstance(item, str) else [int(t) for t in item]
            vocab = self.llm.config.vocab_size
            if not ids or not all(0 <= t < vocab for t in ids):
                raise ApiError(400, f"prompt must be non-empty text or token ids in [0, {vocab})",
                               "invalid_request_error", "prompt")
            out.append(ids)
        return out

    # ------------------------------------------------------------------ chat

    async def chat(self, body: ChatBody, http: HttpRequest):
        self._check_model(body.model)
        if body.tools:
            raise ApiError(400, "tools are not supported", "invalid_request_error", "tools")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise ApiError(400, "only response_format {\"type\": \"text\"} is supported",
                           "invalid_request_error", "response_format")
        try:
            messages = chat_messages(body.messages)
            ids = self.llm.chat_prompt_ids(messages)
        except BadRequest as e:
            raise ApiError(400, str(e), "invalid_request_error", e.param) from None
        except FlaxlmError as e:
            raise ApiError(400, str(e), "invalid_request_error", "messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:
            max_tokens = max(1, self.scheduler.context - len(ids))
        want = (body.top_logprobs or 0) if body.logprobs else None
        params = self._params(body, max_tokens, want)
        submitted = [self._submit(ids, params, prompt_param="messages")]
        id_, created = new_id("chatcmpl"), now()

        def shape(p: int, e: Event, offset: int) -> dict[str, Any]:
            logprobs = (chat_logprobs(self.tokenizer, e.token_ids, e.logprobs, e.top_logprobs)
                        if want is not None else None)
            return {"index": e.index, "delta": {"content": e.text}, "logprobs": logprobs,
                    "finish_reason": e.finish_reason}

        base = {"id": id_, "object": "chat.completion.chunk", "created": created,
                "model": self.model_name}
        if body.stream:
            return self._sse(submitted, http, base, shape, body, role=True)
        choices = await self._collect(submitted, http)
        out = []
        for p, e in choices:
            c = shape(p, e, 0)
            out.append({"index": c["index"], "logprobs": c["logprobs"],
                        "finish_reason": c["finish_reason"],
                        "message": {"role": "assistant", "content": e.text}})
        return {**base, "object": "chat.completion",
                "choices": sorted(out, key=lambda c: c["index"]),
                "usage": self._usage(submitted, choices)}

    # ------------------------------------------------------------------ shared

    def _params(self, body, max_tokens: int, logprobs):
        try:
            params = sampling_params(body, self.defaults, max_tokens=max_tokens,
                                     logprobs=logprobs)
            params.check_vocab(self.llm.config.vocab_size)
        except BadRequest as e:
            raise ApiError(400, str(e), "invalid_request_error", e.param) from None
        except ConfigError as e:
            param = str(e).split(" ")[0]
            raise ApiError(400, str(e), "invalid_request_error", param) from None
        return params

    def _submit(self, ids: list[int], params, prompt_param: str = "prompt") -> _Listener:
        listener = _Listener(asyncio.get_running_loop(), params.n, len(ids))
        request = Request(prompt_ids=ids, params=params, emit=listener.emit,
                          timeout_s=self.timeout_s)
        listener.request = request
        try:
            self.scheduler.submit(request)
        except QueueFull as e:
            raise ApiError(429, str(e), "rate_limit_exceeded", code="queue_full") from None
        except ConfigError as e:
            param = "n" if str(e).startswith("n=") else prompt_param
            code = None if param == "n" else "context_length_exceeded"
            raise ApiError(400, str(e), "invalid_request_error", param, code) from None
        self.metrics.prompt_tokens.inc(len(ids))
        return listener

    async def _collect(self, listeners: list[_Listener], http: HttpRequest
                       ) -> list[tuple[int, Event]]:
        """Every choice's whole text: (prompt index, one merged Event per choice)."""
        merged: dict[tuple[int, int], Event] = {}
        async with contextlib.aclosing(self._events(listeners, http)) as events:
            async for p, event in events:
                whole = merged.setdefault((p, event.index), Event(index=event.index))
                whole.text += event.text
                whole.token_ids += event.token_ids
                whole.logprobs += event.logprobs
                whole.top_logprobs += event.top_logprobs
                whole.finish_reason = event.finish_reason or whole.finish_reason
        return [(p, e) for (p, _), e in merged.items()]

    async def _events(self, listeners: list[_Listener], http: HttpRequest
                      ) -> AsyncIterator[tuple[int, Event]]:
        """Events of all listeners in arrival order; cancels them all if the client leaves or
        this iterator is closed early."""
        status = "499"  # unless it ends otherwise: the client went away
        pending: dict[asyncio.Future, tuple[int, _Listener]] = {
            asyncio.ensure_future(l.queue.get()): (p, l) for p, l in enumerate(listeners)}
        try:
            while pending:
                done, _ = await asyncio.wait(pending, timeout=0.5,
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done and await http.is_disconnected():
                    return
                for future in done:
                    p, listener = pending.pop(future)
                    event = future.result()
                    self._observe(listener, event)
                    if event.error is not None or event.finish_reason in ("timeout", "cancelled"):
                        error = _failure(event)
                        status = str(error.status)
                        raise error
                    yield p, event
                    if event.finish_reason is not None:
                        listener.open -= 1
                    if listener.open > 0:
                        pending[asyncio.ensure_future(listener.queue.get())] = (p, listener)
            status = "200"
        finally:
            for future in pending:
                future.cancel()
            for listener in listeners:
                listener.request.cancel()
            self.metrics.requests.labels(endpoint=http.url.path, status=status).inc()

    def _observe(self, listener: _Listener, event: Event) -> None:
        t = time.monotonic()
        if event.token_ids:
            if listener.first is None:
                listener.first = t
                self.metrics.ttft.observe(t - listener.start)
            else:
                self.metrics.tpot.observe((t - listener.last) / len(event.token_ids))
            listener.last = t
            listener.generated += len(event.token_ids)
            self.metrics.generation_tokens.inc(len(event.token_ids))

    def _usage(self, listeners: list[_Listener], choices) -> dict[str, int]:
        return usage(sum(l.prompt_tokens for l in listeners),
                     sum(len(e.token_ids) for _, e in choices))

    def _sse(self, listeners, http, base, shape, body, *, role: bool) -> StreamingResponse:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        n = body.n

        async def stream():
            offsets: dict[tuple[int, int], int] = {}
            if role:
                first = [{"index": k, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None} for k in range(n)]
                yield _sse_line({**base, "choices": first})
            try:
                async with contextlib.aclosing(self._events(listeners, http)) as events:
                    async for p, event in events:
                        key = (p, event.index)
                        choice = shape(p, event, offsets.get(key, 0))
                        offsets[key] = offsets.get(key, 0) + len(event.text)
                        yield _sse_line({**base, "choices": [choice]})
            except ApiError as e:
                yield _sse_line(error_body(str(e), e.kind, e.param, e.code))
                yield "data: [DONE]\n\n"
                return
            if include_usage:
                total = sum(l.generated for l in listeners)
                yield _sse_line({**base, "choices": [], "usage": usage(
                    sum(l.prompt_tokens for l in listeners), total)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    # ------------------------------------------------------------------ embeddings

    async def embeddings(self, body: EmbeddingBody):
        self._check_model(body.model)
        texts = [body.input] if isinstance(body.input, str) or (
            body.input and isinstance(body.input[0], int)) else list(body.input)
        if not texts:
            raise ApiError(400, "input is empty", "invalid_request_error", "input")
        if body.dimensions is not None and body.dimensions != self.llm.config.embed_dim:
            raise ApiError(400, f"dimensions: this model's embeddings have "
                           f"{self.llm.config.embed_dim}", "invalid_request_error", "dimensions")
        try:
            ids = [self.tokenizer.encode(t) if isinstance(t, str) else list(t) for t in texts]
            vectors = await run_in_threadpool(self.llm.embed, ids)
        except ConfigError as e:
            code = "context_length_exceeded" if "context" in str(e) else None
            raise ApiError(400, str(e), "invalid_request_error", "input", code) from None
        data = [{"object": "embedding", "index": i,
                 "embedding": (base64.b64encode(np.asarray(v, "<f4").tobytes()).decode()
                               if body.encoding_format == "base64" else v.tolist())}
                for i, v in enumerate(vectors)]
        tokens = sum(len(i) for i in ids)
        self.metrics.requests.labels(endpoint="/v1/embeddings", status="200").inc()
        return {"object": "list", "data": data, "model": self.model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


class _Listener:
    """One request's events, moved from the scheduler thread onto the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, n: int, prompt_tokens: int):
        self.loop, self.queue = loop, asyncio.Queue()
        self.open, self.prompt_tokens = n, prompt_tokens  # open: choices not yet finished
        self.request: Request | None = None
        self.start = time.monotonic()
        self.first: float | None = None
        self.last = self.start
        self.generated = 0

    def emit(self, event: Event) -> None:  # on the scheduler thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


def _failure(event: Event) -> ApiError:
    """The error a failed, timed-out or cancelled (server stopping) request answers."""
    if event.error is not None:
        error = ApiError(500, f"generating this request failed: {event.error}", "server_error")
    elif event.finish_reason == "timeout":
        error = ApiError(408, "the request ran past the server's timeout", "timeout",
                         code="timeout")
    else:
        error = ApiError(503, "the server is shutting down", "server_error")
    error.counted = True  # the request's own status is counted where it ended
    return error


def _sse_line(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
