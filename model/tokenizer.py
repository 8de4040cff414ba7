"""The tokenizer and chat template, loaded from a Hugging Face directory or GGUF metadata.

A `Tokenizer` is a `tokenizers.Tokenizer` (the backend) plus the named special
tokens, the end-of-generation ids and the Jinja chat template. A GGUF carries no
`tokenizer.json`: `flaxlm.model.gguf_tokenizer` rebuilds its backend from the
metadata (byte-level BPE or SentencePiece).
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as Backend

from flaxlm.model.errors import CheckpointError
from flaxlm.model.gguf_io import read_gguf_metadata
from flaxlm.model.gguf_tokenizer import gguf_backend

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
def _gguf_special(fields: Mapping[str, Any], backend: Backend, key: str, source: str) -> str | None:
    """The token named by the GGUF id `tokenizer.ggml.<key>`, or None when unset."""
    index = fields.get(f"tokenizer.ggml.{key}")
    if index is None:
        return None
    token = backend.id_to_token(int(index))
    if token is None:
        raise CheckpointError(f"{source}: tokenizer.ggml.{key} = {index} is outside the vocabulary")
    return token


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} when the file is absent."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string, or a dict with "content"."""
    return value.get("content") if isinstance(value, dict) else value


def _pick_template(value: Any) -> str | None:
    """A chat template: a string, or a list of {name, template} where "default" is taken."""
    if isinstance(value, list):
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
        return named.get("default")
    return value


def _id_list(value: Any) -> list[int]:
    """An `eos_token_id` setting (an int, a list of ints or None) as a list."""
    if value is None:
        return []
    return [int(item) for item in value] if isinstance(value, list) else [int(value)]


def _load_backend(path: Path) -> Backend:
    if not path.is_file():
        raise CheckpointError(f"{path}: tokenizer file does not exist")
    try:
        return Backend.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception for every parse failure
        raise CheckpointError(f"{path}: not a valid tokenizer.json ({error})") from error


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    """A chat template compiled in the sandbox transformers uses."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _checked_messages(messages: Any) -> list[dict[str, Any]]:
    """Copies of `messages` without None values; ValueError when they are not chat messages."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{index}] must be a dict with 'role' and 'content', got {message!r}")
        if not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{index}] has no string 'role': {message!r}")
        if "content" not in message and "tool_calls" not in message:
            raise ValueError(f"messages[{index}] has no 'content': {message!r}")
        checked.append({key: value for key, value in message.items() if value is not None})
    return checked


class Tokenizer:
    """A byte-level BPE tokenizer with named special tokens and a chat template."""

    def __init__(
        self,
        backend: Backend,
        *,
        special: Mapping[str, str | None],
        chat_template: str | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        extra_eos_ids: Iterable[int] = (),
        model_max_length: int | None = None,
        source: str = "tokenizer",
    ):
        """`special` maps bos_token/eos_token/unk_token/pad_token to token strings.

        When both add_*_token flags are None the backend's own post-processor is kept.
        """
        self._backend = backend
        self._special = {name: special[name] for name in SPECIAL_NAMES if special.get(name) is not None}
        self._chat_template = chat_template
        self._add_flags = {"add_bos_token": add_bos_token, "add_eos_token": add_eos_token}
        self._model_max_length = model_max_length
        self._source = source
        self._register_named_specials()
        if add_bos_token is not None or add_eos_token is not None:
            self._set_post_processor(bool(add_bos_token), bool(add_eos_token))
        own_eos = [self.eos_token_id] if self.eos_token_id is not None else []
        self._eos_ids = tuple(dict.fromkeys([*own_eos, *(int(i) for i in extra_eos_ids)]))

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json`, `tokenizer_config.json` and the eos ids of generation_config/config.json."""
        folder = Path(path)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: tokenizer directory does not exist")
        backend = _load_backend(folder / "tokenizer.json")
        config = _read_json(folder / "tokenizer_config.json")
        template = _pick_template(config.get("chat_template"))
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        eos_ids = [i for name in ("generation_config.json", "config.json")
                   for i in _id_list(_read_json(folder / name).get("eos_token_id"))]
        return cls(backend, special={name: _token_content(config.get(name)) for name in SPECIAL_NAMES},
                   chat_template=template, add_bos_token=config.get("add_bos_token"),
                   add_eos_token=config.get("add_eos_token"), extra_eos_ids=eos_ids,
                   model_max_length=config.get("model_max_length"), source=str(folder))

    @classmethod
    def from_gguf_metadata(cls, fields: Mapping[str, Any], source: str = "GGUF metadata") -> Tokenizer:
        """Build from GGUF metadata read into python values; `source` names the file in errors."""
        backend = gguf_backend(fields, source)
        # llama.cpp adds BOS to a SentencePiece vocabulary whose file does not say otherwise
        default_bos = fields.get("tokenizer.ggml.model") == "llama"
        keys = ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")
        special = {name: _gguf_special(fields, backend, key, source) for name, key in zip(SPECIAL_NAMES, keys)}
        extra_eos = [fields[key] for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
                     if fields.get(key) is not None]
        return cls(backend, special=special,
                   chat_template=fields.get("tokenizer.chat_template"),
                   add_bos_token=bool(fields.get("tokenizer.ggml.add_bos_token", default_bos)),
                   add_eos_token=bool(fields.get("tokenizer.ggml.add_eos_token", False)),
                   extra_eos_ids=extra_eos, source=source)

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """Read the tokenizer stored in a GGUF file's metadata."""
        return cls.from_gguf_metadata(read_gguf_metadata(path), source=str(path))

    def _register_named_specials(self) -> None:
        """Make bos/eos/unk/pad special added tokens, as transformers does, so they match whole in text."""
        added = {token.content for token in self._backend.get_added_tokens_decoder().values()}
        missing = [token for token in self._special.values() if token not in added]
        self._backend.add_special_tokens([AddedToken(token, normalized=False, special=True)
                                          for token in dict.fromkeys(missing)])

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        """Add BOS/EOS around encodings, the post-processor transformers builds from these flags."""
        bos, eos = (self._special.get(name) for name in ("bos_token", "eos_token"))
        add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
        single = " ".join([f"{bos}:0"] * add_bos + ["$A:0"] + [f"{eos}:0"] * add_eos)
        pair = " ".join([single] + [f"{bos}:1"] * add_bos + ["$B:1"] + [f"{eos}:1"] * add_eos)
        pairs = [(bos, self.bos_token_id)] * add_bos + [(eos, self.eos_token_id)] * add_eos
        self._backend.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=list(dict.fromkeys(pairs)))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings in it map to their ids."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, index: int) -> str | None:
        return self._backend.id_to_token(int(index))

    @property
    def backend(self) -> Backend:
        """The underlying `tokenizers.Tokenizer` (for batch encoding and padding)."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def _special_id(self, name: str) -> int | None:
        token = self._special.get(name)
        return None if token is None else self._backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends generation: the eos token and the config's eos_token_id list."""
        return self._eos_ids

    @property
    def special_tokens(self) -> dict[str, tuple[str, int | None]]:
        """{"bos_token": ("<|im_start|>", 1), ...} for the named special tokens that are set."""
        return {name: (token, self._backend.token_to_id(token)) for name, token in self._special.items()}

    @property
    def add_bos_token(self) -> bool:
        """Whether `encode` puts the BOS token first."""
        bos = self.bos_token_id
        return bos is not None and self._backend.encode("", add_special_tokens=True).ids[:1] == [bos]

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render `messages` with the chat template, passing the special tokens as transformers does."""
        if self._chat_template is None:
            raise CheckpointError(f"{self._source}: the tokenizer has no chat_template")
        chat = _checked_messages(messages)
        variables = {name: token for name, token in self._special.items()}
        variables.update({"tools": None, "documents": None, **kwargs})
        try:
            return _compile_template(self._chat_template).render(
                messages=chat, add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.TemplateError as error:
            raise ValueError(f"chat template of {self._source} rejected the messages: {error}") from error

    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json that transformers loads."""
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(folder / "tokenizer.json"))
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **self._special,
                                  "clean_up_tokenization_spaces": False}
        config.update({flag: value for flag, value in self._add_flags.items() if value is not None})
        if self._model_max_length is not None:
            config["model_max_length"] = self._model_max_length
        if self._chat_template is not None:
            config["chat_template"] = self._chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                      encoding="utf-8")
        (folder / "special_tokens_map.json").write_text(json.dumps(self._special, indent=2, ensure_ascii=False)
                                                        + "\n", encoding="utf-8")
        return folder

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, special_tokens={self.special_tokens}, source={self._source!r})"
