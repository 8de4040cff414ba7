"""OpenAI request bodies (pydantic), their sampling settings, and the response objects.

Field names, ranges and defaults follow the OpenAI API; flaxlm's other
settings (`top_k`, `min_p`, `repetition_penalty`, `min_tokens`, `ignore_eos`,
`stop_token_ids`) are accepted as extra body fields, as vLLM accepts them.
Settings a request leaves out come from the server's defaults (the model's
generation_config.json, else llama.cpp's chat defaults: flaxlm.infer.defaults).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from flaxlm.infer.sampling import MAX_LOGPROBS, SamplingParams
from flaxlm.model.errors import ConfigError


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """The settings completions and chat share."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    user: str | None = None
    # vLLM's extra body fields
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, lt=1)
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None


class CompletionBody(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ChatBody(_Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


class EmbeddingBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class BadRequest(ConfigError):
    """A request the server refuses: 400 with the OpenAI error object naming `param`."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


# The flaxlm setting each OpenAI field becomes (for naming the field in errors).
_FIELD = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


def sampling_params(body: _Sampling, defaults: dict[str, Any], *, max_tokens: int,
                    logprobs: int | None) -> SamplingParams:
    """The request's SamplingParams: its fields over the server's defaults."""
    if body.logit_bias is not None:
        try:
            bias = {int(k): v for k, v in body.logit_bias.items()}
        except ValueError:
            raise BadRequest("logit_bias keys must be token ids", "logit_bias") from None
    else:
        bias = None
    given = dict(temperature=body.temperature, top_p=body.top_p, min_p=body.min_p,
                 top_k=None if body.top_k is None else max(body.top_k, 0),
                 repetition_penalty=body.repetition_penalty)
    settings = {**defaults, **{k: v for k, v in given.items() if v is not None}}
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    try:
        return SamplingParams(
            **settings, max_new_tokens=max_tokens, min_new_tokens=min(body.min_tokens, max_tokens),
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            logit_bias=bias, stop=tuple(stop), stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=body.ignore_eos, seed=body.seed, n=body.n, logprobs=logprobs)
    except ConfigError as error:
        name = str(error).split(" ")[0].split("[")[0]
        raise BadRequest(str(error), _FIELD.get(name, name)) from None


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(tokenizer, token_ids, logprobs, top_logprobs, offset: int):
    """The legacy completions `logprobs` object for some tokens; `offset`: text before them."""
    tokens = [tokenizer.decode([t]) for t in token_ids]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    top = ([{tokenizer.decode([t]): lp for t, lp in alt.items()} for alt in top_logprobs]
           if top_logprobs else None)
    return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": top,
            "text_offset": offsets}


def _token_entry(tokenizer, token_id: int, logprob: float) -> dict[str, Any]:
    text = tokenizer.decode([token_id])
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(tokenizer, token_ids, logprobs, top_logprobs) -> dict[str, Any]:
    """The chat `logprobs` object: {"content": [token, logprob, bytes, top_logprobs]}."""
    content = []
    for k, (token, logprob) in enumerate(zip(token_ids, logprobs)):
        entry = _token_entry(tokenizer, token, logprob)
        alternatives = top_logprobs[k] if top_logprobs else {}
        entry["top_logprobs"] = [_token_entry(tokenizer, t, lp) for t, lp in alternatives.items()]
        content.append(entry)
    return {"content": content}


def message_text(content: Any, index: int) -> str:
    """A message's content: a string, or a list of parts whose text parts are joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise BadRequest(f"messages[{index}].content: only text parts are supported",
                                 f"messages[{index}].content")
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    if content is None:
        return ""
    raise BadRequest(f"messages[{index}].content must be a string or a list of text parts",
                     f"messages[{index}].content")


def chat_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """{role, content} pairs for the chat template, checked."""
    out = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise BadRequest(f"messages[{i}].role must be system, user, assistant or tool, "
                             f"got {role!r}", f"messages[{i}].role")
        out.append({"role": "system" if role == "developer" else role,
                    "content": message_text(message.get("content"), i)})
    return out
