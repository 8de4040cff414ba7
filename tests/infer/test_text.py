"""Incremental detokenization and stop strings on the real SmolLM2 tokenizer."""

import random

import pytest

from flaxlm.infer.text import TextStream, check_stop, truncate_at_stop
from flaxlm.model.embedded import smollm2_gguf_path
from flaxlm.model.tokenizer import Tokenizer

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "def f(x):\n\treturn x ** 2  # square\n\n\nclass A:\n        pass\n    \t  \n",
    "🙂👍🏽 emoji 🎉🇫🇷 mixed🙂text 👨‍👩‍👧‍👦",
    "日本語のテキスト、中文字符 한국어 漢字",
    "café naïve résumé Ångström façade Ελληνικά русский",
    "The answer is 42. Observation: done",
]
CHUNKS = [1, 2, 3, 7, 1000]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_gguf(smollm2_gguf_path())


def stream_pieces(stream, ids, chunk):
    """Every piece `stream` returns for `ids` pushed `chunk` at a time, then the `finish()` piece."""
    pieces = [stream.push(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    return pieces + [stream.finish()]


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("text", TEXTS)
def test_pieces_concatenate_to_full_decode(tok, text, chunk):
    ids = tok.encode(text, add_special_tokens=False)
    pieces = stream_pieces(TextStream(tok), ids, chunk)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_multi_token_characters_are_held_until_complete(tok):
    ids = tok.encode("🙂🎉", add_special_tokens=False)
    assert len(ids) > 2  # each emoji spans several byte-level tokens
    stream = TextStream(tok)
    pieces = [stream.push([token]) for token in ids]
    assert "" in pieces and pieces[-1] == "🎉"
    assert "".join(pieces) == "🙂🎉"


def test_decodes_a_bounded_window(tok):
    """Each token decodes a few recent tokens, not the whole sequence."""
    windows = []

    class Counting:
        def decode(self, ids, skip_special_tokens=False):
            windows.append(len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tok.encode(" ".join(TEXTS) * 5, add_special_tokens=False)
    stream = TextStream(Counting())
    text = "".join(stream_pieces(stream, ids, 1))
    assert text == tok.decode(ids)
    assert len(ids) > 300 and max(windows) <= 4


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tok, skip):
    ids = tok.encode("<|im_start|>assistant\nHi there 🙂<|im_end|>\n<|im_start|>user")
    assert tok.eos_token_ids[0] in ids
    text = "".join(stream_pieces(TextStream(tok, skip_special_tokens=skip), ids, 1))
    assert text == tok.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in text) is not skip


def test_stop_string_spanning_two_tokens(tok):
    text = "The answer is 42. Observation: done"
    ids = tok.encode(text, add_special_tokens=False)
    token_texts = [tok.decode([token]) for token in ids]
    k = token_texts.index(" Observation")
    stop = token_texts[k][-3:] + token_texts[k + 1]  # "ion:"
    assert not any(stop in piece for piece in token_texts)  # really spans a boundary
    stream = TextStream(tok, stop=(stop,))
    pieces = [stream.push([token]) for token in ids]
    assert stream.stopped and stream.finish_reason == "stop"
    assert stream.num_tokens == k + 2 and stream.token_ids == ids[:k + 2]
    assert "".join(pieces) == stream.text == "The answer is 42. Observat"
    assert (stream.text, True) == truncate_at_stop(text, (stop,))
    assert stream.push(ids) == "" and stream.finish() == "" and stream.num_tokens == k + 2


def test_held_text_is_released_when_it_cannot_match(tok):
    ids = tok.encode("See the Observation deck", add_special_tokens=False)
    stream = TextStream(tok, stop=("Observation:",))
    pieces = [stream.push([token]) for token in ids]
    assert pieces[-2] == " " and "Obs" not in "".join(pieces[:-1])  # held while it could still match
    assert pieces[-1] == "Observation deck"
    assert not stream.stopped and stream.finish() == "" and stream.finish_reason == "length"
    assert stream.text == "See the Observation deck"


def test_finish_releases_held_text(tok):
    ids = tok.encode("Thought: I know. Observation", add_special_tokens=False)
    stream = TextStream(tok, stop=("Observation:",))
    text = stream.push(ids)
    assert text == "Thought: I know. "
    assert stream.finish("stop") == "Observation"
    assert stream.text == "Thought: I know. Observation" and stream.finish_reason == "stop"


@pytest.mark.parametrize("stop", [("world", "lo"), ("lo", "world")])
def test_earliest_stop_string_wins(tok, stop):
    ids = tok.encode("hello world", add_special_tokens=False)
    stream = TextStream(tok, stop=stop)
    assert "".join(stream_pieces(stream, ids, 1)) == "hel" == stream.text
    assert truncate_at_stop("hello world", stop) == ("hel", True)


def test_the_stop_string_completed_first_wins():
    """Read left to right, "own" is complete before "brown fox" is."""
    assert truncate_at_stop("the quick brown fox", ("brown fox", "own")) == ("the quick br", True)
    assert truncate_at_stop("the quick brown fox", ("quick", "qu")) == ("the ", True)
    assert truncate_at_stop("no stop here", ("xyz",)) == ("no stop here", False)


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("text", TEXTS)
def test_stream_agrees_with_truncate_at_stop(tok, text, chunk):
    """Random stop strings cut from the text: same result as truncating the full decode."""
    rng = random.Random(text)
    ids = tok.encode(text, add_special_tokens=False)
    for _ in range(20):
        starts = [rng.randrange(len(text)) for _ in range(rng.randint(1, 3))]
        stop = tuple(text[s:s + rng.randint(1, 6)] for s in starts)
        expected, found = truncate_at_stop(text, stop)
        stream = TextStream(tok, stop=stop)
        shown = ""
        for i in range(0, len(ids), chunk):
            shown += stream.push(ids[i:i + chunk])
            assert expected.startswith(shown)  # nothing shown is later cut
        shown += stream.finish()
        assert shown == stream.text == expected and stream.stopped == found
        if found:  # the stop string is complete at the last consumed token, not before
            assert truncate_at_stop(tok.decode(ids[:stream.num_tokens]), stop) == (expected, True)
            assert not truncate_at_stop(tok.decode(ids[:stream.num_tokens - 1]), stop)[1]


@pytest.mark.parametrize("stop", [("",), "stop", ("ok", 3)])
def test_bad_stop_is_a_value_error(stop):
    with pytest.raises(ValueError, match="stop"):
        check_stop(stop)
