"""SentencePiece tokenizers from GGUF (`tokenizer.ggml.model` = "llama") against SentencePiece
itself and transformers, on small models trained here and written as llama.cpp's converter does."""

from __future__ import annotations

import types

import gguf
import numpy as np
import pytest
import sentencepiece as spm
import transformers
from tokenizers import AddedToken
from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

from flaxlm.model.errors import CheckpointError
from flaxlm.model.gguf_io import read_gguf_metadata
from flaxlm.model.tokenizer import Tokenizer
from tests.model.test_tokenizer import TEXTS as BYTE_LEVEL_TEXTS

CORPUS = ("The quick brown fox jumps over the lazy dog. Hello, world! I'm sure we'll see. " * 20
          + "def main():\n    return 42\n\tx = [1, 2, 3]  # list\n" * 10
          + "café naïve résumé façade 12345 67890 3.14 日本語のテキスト 中文 한국어 русский Ελληνικά\n" * 5)
TEXTS = [t for t in BYTE_LEVEL_TEXTS if "<|" not in t] + [
    " leading space", "   three leading spaces", "trailing spaces   ", " ", "  ", "\n", "x",
    "two  spaces,   three,    four", "tabs\tand\nnew\r\nlines", "digits 0 1 22 333 4444 2024-11-30",
    "unseen characters: ✓ ∑ ß ø ĳ 🦙 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",  # not in the training text: byte fallback
]
SPECIAL_TEXTS = ["<s>hi</s> there", "a</s>b", "</s> x<s>", "<unk> y", "think: <think>a  b</think> done"]


def train(prefix, add_dummy_prefix: bool, user_defined=()) -> spm.SentencePieceProcessor:
    """A small SentencePiece BPE with byte fallback, as Llama 2 / Mistral (dummy prefix) or Gemma (none)."""
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()), model_prefix=str(prefix), vocab_size=420, model_type="bpe",
        byte_fallback=True, add_dummy_prefix=add_dummy_prefix, character_coverage=1.0, split_digits=True,
        user_defined_symbols=list(user_defined), remove_extra_whitespaces=False,
        normalization_rule_name="identity", num_threads=1, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=f"{prefix}.model")


def write_vocab(path, sp: spm.SentencePieceProcessor, arch: str, add_space_prefix: bool | None, user_defined=()):
    """The tokenizer metadata llama.cpp's _set_vocab_sentencepiece writes (no tensors).

    Gemma's converter lists its whitespace and tag tokens (tokenizer_config's added tokens) as
    USER_DEFINED, spaces written as spaces; so are this model's user-defined symbols here.
    """
    tokens, scores, kinds = [], [], []
    for i in range(sp.get_piece_size()):
        kind = (gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
                else gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.NORMAL)
        piece = sp.id_to_piece(i)
        if piece in user_defined:
            piece, kind = piece.replace("\u2581", " "), gguf.TokenType.USER_DEFINED
        tokens.append(piece)
        scores.append(sp.get_score(i))
        kinds.append(kind)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(kinds)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    if add_space_prefix is not None:
        writer.add_add_space_prefix(add_space_prefix)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def spm_case(request, tmp_path_factory):
    """(arch, SentencePiece processor, model file, GGUF path, flaxlm tokenizer)."""
    folder = tmp_path_factory.mktemp(f"spm_{request.param}")
    gemma = request.param == "gemma2"
    user_defined = ("\u2581\u2581", "\u2581\u2581\u2581", "<think>", "</think>") if gemma else ()
    sp = train(folder / "spm", add_dummy_prefix=not gemma, user_defined=user_defined)
    path = write_vocab(folder / "vocab.gguf", sp, request.param, False if gemma else None, user_defined)
    return request.param, sp, folder / "spm.model", path, Tokenizer.from_gguf(path)


def segments_reference(sp: spm.SentencePieceProcessor, text: str, specials: list[str]) -> list[int]:
    """llama.cpp's SPM tokenization: special tokens cut out first, SentencePiece on each piece between."""
    ids, rest = [sp.bos_id()], text
    while rest:
        found = [(rest.find(s), s) for s in specials if s in rest]
        if not found:
            return ids + sp.encode(rest)
        at, special = min(found)
        ids += (sp.encode(rest[:at]) if at else []) + [sp.piece_to_id(special)]
        rest = rest[at + len(special):]
    return ids


def transformers_spm(model_file) -> transformers.PreTrainedTokenizerBase:
    """transformers' own tokenizer for a SentencePiece model (legacy: every chunk between special tokens
    gets the dummy prefix, as the Llama 2 and Mistral v0.1 tokenizer.json files do)."""
    proto = import_protobuf().ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, {p.piece: i for i, p in enumerate(proto.pieces)},
                                                          legacy=True)
    backend.add_special_tokens([AddedToken(p.piece, normalized=False, special=True)
                                for p in proto.pieces if p.type in (2, 3)])  # unknown and control pieces
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", add_bos_token=True)


def test_ids_equal_sentencepiece(spm_case):
    _, sp, _, _, tok = spm_case
    for text in TEXTS:
        assert tok.encode(text) == [sp.bos_id()] + sp.encode(text), text
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == sp.decode(sp.encode(text)) == text, text
    byte_ids = [i for i in tok.encode(TEXTS[-1]) if sp.is_byte(i)]
    assert len(byte_ids) >= 8  # the unseen characters really went through byte fallback


def test_special_tokens_split_first_as_llama_cpp(spm_case):
    _, sp, _, _, tok = spm_case
    specials = ["<s>", "</s>", "<unk>"]
    for text in SPECIAL_TEXTS:
        assert tok.encode(text) == segments_reference(sp, text, specials), text


def test_ids_equal_transformers_spm_tokenizer(spm_case):
    arch, _, model_file, _, tok = spm_case
    if arch != "llama":  # transformers builds Gemma's from its repository's tokenizer.json, not the .model
        assert arch == "gemma2"
        return
    theirs = transformers_spm(model_file)
    for text in TEXTS + SPECIAL_TEXTS:
        assert tok.encode(text) == theirs(text)["input_ids"], text


def test_transformers_gguf_loader_differs_only_where_documented(spm_case):
    """transformers' GGUF converter prepends "▁" with Metaspace(prepend_scheme="first"): not after a special
    token, and not before text that starts with a space. SentencePiece and llama.cpp do both (tested above)."""
    arch, sp, _, path, tok = spm_case
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    differing = [t for t in TEXTS + SPECIAL_TEXTS if tok.encode(t) != theirs(t)["input_ids"]]
    if arch == "llama":
        assert differing == [t for t in TEXTS + SPECIAL_TEXTS if t.startswith(" ") or t in SPECIAL_TEXTS[:4]]
    else:  # no prefix space at all: only Gemma's user-defined whitespace tokens, which it merges as BPE pieces
        assert all("  " in t for t in differing)


def test_properties_and_flags(spm_case, tmp_path):
    arch, sp, _, path, tok = spm_case
    assert tok.vocab_size == sp.get_piece_size()
    assert tok.special_tokens["bos_token"] == ("<s>", sp.bos_id())
    assert tok.add_bos_token  # llama.cpp's default for SentencePiece when the file has no add_bos_token
    fields = read_gguf_metadata(path)
    plain = Tokenizer.from_gguf_metadata({**fields, "tokenizer.ggml.add_bos_token": False,
                                          "tokenizer.ggml.add_eos_token": True})
    assert plain.encode("hi") == [*sp.encode("hi"), sp.eos_id()]


def test_bad_sentencepiece_metadata(spm_case):
    _, _, _, path, _ = spm_case
    fields = read_gguf_metadata(path)
    without_scores = {k: v for k, v in fields.items() if k != "tokenizer.ggml.scores"}
    with pytest.raises(CheckpointError, match="v.gguf.*tokenizer.ggml.scores"):
        Tokenizer.from_gguf_metadata(without_scores, source="v.gguf")
    with pytest.raises(CheckpointError, match="v.gguf.*token_type has 3 entries"):
        Tokenizer.from_gguf_metadata({**fields, "tokenizer.ggml.token_type": [1, 1, 1]}, source="v.gguf")


def test_merges_follow_scores():
    """The recovered merges rank each pair by its merged token's score, as SentencePiece merges."""
    from flaxlm.model.gguf_tokenizer import sentencepiece_merges
    tokens = ["a", "b", "c", "ab", "bc", "abc"]
    scores = [0.0, 0.0, 0.0, -2.0, -1.0, -3.0]
    assert sentencepiece_merges(tokens, scores) == [("b", "c"), ("a", "b"), ("ab", "c"), ("a", "bc")]
    assert np.isfinite(scores).all()
