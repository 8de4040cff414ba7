"""SFT data: the assistant-only loss mask against hand-labelled token sequences (ChatML and a
Llama-3-style template, with and without a tokenizer that merges across the turn boundary),
reading JSONL chats, truncation and dropping, and first-fit packing."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from tokenizers import AddedToken, models
from tokenizers import Tokenizer as Backend

from flaxlm.model.sources import DataError
from flaxlm.model.tokenizer import Tokenizer
from flaxlm.train import sft

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + "
          "message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + "
          "'<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
SPECIALS = {"chatml": ("<|im_start|>", "<|im_end|>"),
            "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                       "<|eot_id|>")}
CHAT = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"}, {"role": "user", "content": "ok?"},
        {"role": "assistant", "content": "no"})
# Merges that join the text before a reply with the reply's first character: "\ny" and "\nn"
# (ChatML: "assistant\n" + "yo"), "\n\ny" and "\n\nn" (Llama 3: "<|end_header_id|>\n\n" + ...).
MERGES = {"chatml": [("\n", "y"), ("\n", "n")],
          "llama3": [("\n", "\n"), ("\n\n", "y"), ("\n\n", "n")]}


def make_tokenizer(template: str, merging: bool) -> Tokenizer:
    """A character-level BPE (no pre-tokenizer: a merge may join any two characters) with
    the template's special tokens; `merging` adds MERGES."""
    chars = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,?!\n"))
    merges = MERGES[template] if merging else []
    vocab = {c: i for i, c in enumerate(chars + [a + b for a, b in merges])}
    backend = Backend(models.BPE(vocab=vocab, merges=merges))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in SPECIALS[template]])
    if template == "chatml":
        special = {"bos_token": None, "eos_token": "<|im_end|>"}
        return Tokenizer(backend, special=special, chat_template=CHATML)
    special = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    return Tokenizer(backend, special=special, chat_template=LLAMA3)


def labelled(*parts: tuple[str, int]) -> list[tuple[str, int]]:
    """Hand-labelled (token, trained) pairs: each part's text split into its tokens by
    hand (special tokens whole, "\\n\\n" + a letter and "\\n" + a letter where the text
    marks them with "|" as merged, every other character alone)."""
    out = []
    for text, label in parts:
        for token in re.findall(r"<\|[a-z_]+\|>|\|[^|]+\||.", text, re.S):
            out.append((token.strip("|") if len(token) > 1 and token[0] == "|" else token,
                        label))
    return out


EXPECTED = {
    ("chatml", False): labelled(
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
         "<|im_start|>assistant\n", 0), ("yo<|im_end|>", 1),
        ("\n<|im_start|>user\nok?<|im_end|>\n<|im_start|>assistant\n", 0),
        ("no<|im_end|>", 1), ("\n", 0)),
    # "\ny" / "\nn" straddle the boundary: they carry reply characters, so they are trained.
    ("chatml", True): labelled(
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
         "<|im_start|>assistant", 0), ("|\ny|o<|im_end|>", 1),
        ("\n<|im_start|>user\nok?<|im_end|>\n<|im_start|>assistant", 0),
        ("|\nn|o<|im_end|>", 1), ("\n", 0)),
    ("llama3", False): labelled(
        ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", 0), ("yo<|eot_id|>", 1),
        ("<|start_header_id|>user<|end_header_id|>\n\nok?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", 0), ("no<|eot_id|>", 1)),
    ("llama3", True): labelled(
        ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>|\n\n|Be brief.<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>|\n\n|hi<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>", 0), ("|\n\ny|o<|eot_id|>", 1),
        ("<|start_header_id|>user<|end_header_id|>|\n\n|ok?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>", 0), ("|\n\nn|o<|eot_id|>", 1)),
}


def _tokens(tokenizer: Tokenizer, chat, train_on="all") -> list[tuple[str, int]]:
    ids, mask = sft.encode_chat(tokenizer, sft.Chat(tuple(chat), "test"), train_on)
    return [(tokenizer.id_to_token(i), int(m)) for i, m in zip(ids, mask)]


@pytest.mark.parametrize("template, merging", sorted(EXPECTED))
def test_assistant_mask_equals_hand_labels(template, merging):
    assert _tokens(make_tokenizer(template, merging), CHAT) == EXPECTED[template, merging]


def test_train_on_last_masks_earlier_replies():
    tokenizer = make_tokenizer("chatml", True)
    last = _tokens(tokenizer, CHAT, "last")
    everything = EXPECTED["chatml", True]
    assert [t for t, _ in last] == [t for t, _ in everything]
    trained = [t for t, m in last if m]
    assert trained == ["\nn", "o", "<|im_end|>"]


def test_prompt_completion_is_a_one_turn_chat(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "hi", "completion": "yo"}) + "\n\n"
                    + json.dumps({"messages": list(CHAT)}) + "\n")
    chats = sft.read_chats([path])
    assert [c.where for c in chats] == [f"{path}:1", f"{path}:3"]
    tokens = _tokens(make_tokenizer("chatml", False), chats[0].messages)
    assert "".join(t for t, m in tokens if m) == "yo<|im_end|>"


@pytest.mark.parametrize("line, message", [
    ('{"text": "plain"}', ":2: needs 'messages' (a chat) or 'prompt' and 'completion'"),
    ('{"prompt": "x"}', ":2: needs 'messages' (a chat) or 'prompt' and 'completion'"),
    ('{"messages": [{"role": "user"}]}', ":2: messages[0] is not a"),
    ('{"messages": []}', ":2: 'messages' must be a non-empty list"),
    ('[1, 2]', ":2: expected a JSON object"),
    ('{"messages": ', ":2: not valid JSON"),
])
def test_bad_records_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=re.escape(f"{path}{message}")):
        sft.read_chats([path])


def test_conversation_without_assistant_turn_is_named():
    chat = sft.Chat(({"role": "user", "content": "hi"},), "data.jsonl:7")
    with pytest.raises(DataError, match=r"data.jsonl:7: the conversation has no assistant "
                                        r"turn \(roles: user\)"):
        sft.encode_chat(make_tokenizer("chatml", False), chat)


def test_template_that_is_not_prefix_stable_is_refused():
    tokenizer = make_tokenizer("chatml", False)
    odd = Tokenizer(tokenizer.backend, special={"eos_token": "<|im_end|>"},
                    chat_template=CHATML.replace("'<|im_start|>assistant\n'", "'Bot: '"))
    with pytest.raises(DataError, match="does not render this conversation prefix by prefix"):
        sft.encode_chat(odd, sft.Chat(CHAT, "x:1"))


def test_truncated_and_dropped_are_counted():
    tokenizer = make_tokenizer("chatml", False)
    short = sft.Chat(CHAT[1:3], "a")      # 25 tokens: "yo<|im_end|>" at 21..23, then "\n"
    long_reply = sft.Chat((CHAT[1], {"role": "assistant", "content": "no " * 20}), "b")
    long_prompt = sft.Chat(({"role": "user", "content": "hi " * 20}, CHAT[2]), "c")
    encoded = sft.encode_chats([short, long_reply, long_prompt], tokenizer, seq_len=24)
    assert (encoded.truncated, encoded.dropped) == (2, 1)   # c loses its whole reply
    assert [len(e["tokens"]) for e in encoded.examples] == [25, 25]
    np.testing.assert_array_equal(encoded.examples[0]["loss_mask"], [0] * 21 + [1, 1, 1, 0])
    np.testing.assert_array_equal(encoded.examples[1]["loss_mask"], [0] * 21 + [1] * 4)
    assert "2 truncated" in encoded.summary("training data")


def test_packing_keeps_examples_whole():
    rng = np.random.default_rng(0)
    examples = [{"tokens": rng.integers(1, 100, n).astype(np.int32),
                 "loss_mask": (rng.random(n) < 0.5).astype(np.int32)}
                for n in rng.integers(3, 17, 40)]
    batch = next(iter(sft.sft_train_dataset(examples, seq_len=16, grad_accum=2, micro_batch=3,
                                            seed=0)))
    assert batch.tokens.shape == batch.loss_mask.shape == (2, 3, 17)
    whole = {tuple(e["tokens"]): tuple(e["loss_mask"]) for e in examples}
    rows = 0
    for tokens, segments, positions, mask in zip(*(x.reshape(6, 17) for x in (
            batch.tokens, batch.segment_ids, batch.positions, batch.loss_mask))):
        for segment in set(segments.tolist()) - {0}:
            at = segments == segment
            assert tuple(tokens[at]) in whole                      # a whole example
            assert tuple(mask[at]) == whole[tuple(tokens[at])]     # with its own mask
            np.testing.assert_array_equal(positions[at], np.arange(at.sum()))
        rows += 1
    assert rows == 6
    held_out = sft.sft_eval_batches(examples[:3], seq_len=16, batch_size=4, max_batches=8)
    assert len(held_out) == 1 and held_out[0].tokens.shape == (4, 17)
    kept = held_out[0].segment_ids != 0
    assert kept.sum() == sum(len(e["tokens"]) for e in examples[:3])
