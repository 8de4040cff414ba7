"""Tokenizer backends rebuilt from GGUF metadata, as llama.cpp tokenizes.

A GGUF stores its vocabulary as `tokenizer.ggml.*` lists, not a tokenizer.json.
Two kinds are rebuilt here as `tokenizers` backends:

- `gpt2`: byte-level BPE from tokens and merges, text split first with the
  regex llama.cpp uses for `tokenizer.ggml.pre`;
- `llama`: SentencePiece BPE with byte fallback (Llama 2, Mistral v0.1,
  Gemma, Phi-3) from tokens, scores and token types. The file has no merges;
  they are recovered from the vocabulary, best score first, as transformers'
  GGUF converter does. Spaces become "▁"; with `tokenizer.ggml.add_space_prefix`
  (default true) a "▁" goes before the text and after every special token,
  as llama.cpp and SentencePiece itself do (transformers' GGUF converter adds
  it at the very start only).

Control and unknown tokens become special added tokens and user-defined
tokens plain added tokens, so each matches whole in the text as in llama.cpp.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Mapping

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

from flaxlm.model.errors import CheckpointError

logger = logging.getLogger(__name__)

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
GGUF_NORMAL, GGUF_UNKNOWN, GGUF_CONTROL, GGUF_USER_DEFINED, GGUF_UNUSED, GGUF_BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # SentencePiece's visible space, "▁"
GEMMA_ARCHS = frozenset(("gemma", "gemma2", "gemma3"))

# The splits llama.cpp (llama-vocab.cpp) applies before byte-level BPE, keyed by `tokenizer.ggml.pre`.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
         "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "stablelm2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}
# These split off every number character on its own (`\p{N}`), then apply the GPT-2 regex.
_DIGIT_SPLIT_PRES = frozenset(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"))
_GPT2_PRES = frozenset(("default", "gpt-2", "mpt", "olmo", "jais", "trillion", "granite-docling"))


def byte_level_pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer for a GGUF `tokenizer.ggml.pre` name (unknown names get GPT-2's, as in transformers)."""
    if pre in _SPLITS:
        split = pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated")
        return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre in _DIGIT_SPLIT_PRES:
        digits = pre_tokenizers.Digits(individual_digits=True)
        return pre_tokenizers.Sequence([digits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre not in _GPT2_PRES:
        logger.warning("unknown tokenizer.ggml.pre %r: splitting text with the GPT-2 regex", pre)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (`bytes_to_unicode`)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    extra = (byte for byte in range(256) if byte not in table)
    table.update({byte: chr(256 + index) for index, byte in enumerate(extra)})
    return table


def _byte_level_spelling(token: str) -> str:
    """`token` in the byte alphabet; tokens already spelled in it are returned unchanged."""
    alphabet = _byte_alphabet()
    if set(token) <= set(alphabet.values()):
        return token
    return "".join(alphabet[byte] for byte in token.encode("utf-8"))


def _require(fields: Mapping[str, Any], key: str, source: str) -> Any:
    if key not in fields:
        raise CheckpointError(f"{source}: GGUF metadata has no {key!r}")
    return fields[key]


def _byte_level_backend(fields: Mapping[str, Any], source: str) -> Backend:
    """A byte-level BPE backend from GGUF metadata; control and user-defined tokens stay whole."""
    tokens = list(_require(fields, "tokenizer.ggml.tokens", source))
    merges = [tuple(merge.split(" ", 1)) for merge in _require(fields, "tokenizer.ggml.merges", source)]
    types = fields.get("tokenizer.ggml.token_type")
    types = [] if types is None else list(types)
    added = {index: kind for index, kind in enumerate(types) if kind in (GGUF_CONTROL, GGUF_USER_DEFINED)}
    vocab = {(token if index in added else _byte_level_spelling(token)): index for index, token in enumerate(tokens)}
    backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, continuing_subword_prefix="",
                                 end_of_word_suffix=""))
    backend.pre_tokenizer = byte_level_pre_tokenizer(fields.get("tokenizer.ggml.pre"))
    backend.decoder = decoders.ByteLevel()
    backend.add_tokens([AddedToken(tokens[i], normalized=False, special=False)
                        for i, kind in added.items() if kind == GGUF_USER_DEFINED])
    backend.add_special_tokens([AddedToken(tokens[i], normalized=False, special=True)
                                for i, kind in added.items() if kind == GGUF_CONTROL])
    return backend


def gguf_backend(fields: Mapping[str, Any], source: str) -> Backend:
    """The backend of the tokenizer that `tokenizer.ggml.model` names."""
    kind = fields.get("tokenizer.ggml.model")
    if kind == "gpt2":
        return _byte_level_backend(fields, source)
    if kind == "llama":
        return _sentencepiece_backend(fields, source)
    raise CheckpointError(f"{source}: tokenizer.ggml.model is {kind!r}; flaxlm reads 'gpt2' (byte-level BPE) "
                          "and 'llama' (SentencePiece) tokenizers")


def _token_types(fields: Mapping[str, Any], count: int, source: str) -> list[int]:
    types = fields.get("tokenizer.ggml.token_type")
    types = [GGUF_NORMAL] * count if types is None else [int(kind) for kind in types]
    if len(types) != count:
        raise CheckpointError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries for {count} tokens")
    return types


def _sentencepiece_backend(fields: Mapping[str, Any], source: str) -> Backend:
    """SentencePiece BPE with byte fallback, as llama.cpp's SPM tokenizer runs it."""
    tokens = [str(token) for token in _require(fields, "tokenizer.ggml.tokens", source)]
    scores = [float(score) for score in _require(fields, "tokenizer.ggml.scores", source)]
    if len(scores) != len(tokens):
        raise CheckpointError(f"{source}: tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
    types = _token_types(fields, len(tokens), source)
    vocab = {token: index for index, token in enumerate(tokens)}  # a repeated token keeps its last id
    if fields.get("general.architecture") in GEMMA_ARCHS:  # Gemma's merge order is its token order
        scores = [-float(index) for index in range(len(tokens))]
    unknown = next((tokens[i] for i, kind in enumerate(types) if kind == GGUF_UNKNOWN), None)
    backend = Backend(models.BPE(vocab=vocab, merges=sentencepiece_merges(tokens, scores), unk_token=unknown,
                                 fuse_unk=True, byte_fallback=True, dropout=None))
    prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend(SPACE)] * prefix + [normalizers.Replace(" ", SPACE)]
    backend.normalizer = normalizers.Sequence(steps)
    backend.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + [decoders.Strip(content=" ", left=1, right=0)] * prefix)
    backend.add_tokens([AddedToken(tokens[i], normalized=False, special=False)
                        for i, kind in enumerate(types) if kind == GGUF_USER_DEFINED])
    backend.add_special_tokens([AddedToken(tokens[i], normalized=False, special=True)
                                for i, kind in enumerate(types) if kind in (GGUF_CONTROL, GGUF_UNKNOWN)])
    return backend


def sentencepiece_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges that replay SentencePiece's "merge the best-scoring piece" rule.

    Every way to cut a token into two tokens is a merge ranked by the whole
    token's score (ties: longer left piece, then longer right piece), as
    transformers' `generate_merges` ranks them.
    """
    index = {token: position for position, token in enumerate(tokens)}  # as llama.cpp: the last id wins
    merges = []
    for token, position in index.items():
        cuts = [(token[:cut], token[cut:]) for cut in range(1, len(token))
                if token[:cut] in index and token[cut:] in index]
        cuts.sort(key=lambda pair: (index[pair[0]], index[pair[1]]))
        merges += [(left, right, scores[position]) for left, right in cuts]
    merges.sort(key=lambda merge: (merge[2], len(merge[0]), len(merge[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]
