"""Preference data (JSONL pairs through the chat template, identical pairs counted and dropped,
pair batches), the shipped docstring preferences (their exact rule) and the arithmetic task
(seeded, held out, exact-number reward)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flaxlm.model.arithmetic import (ArithmeticProblem, arithmetic_answer_reward,
                                    arithmetic_problems, arithmetic_reward,
                                    parse_problem)
from flaxlm.model.errors import ConfigError
from flaxlm.model.sources import DataError
from flaxlm.model.tokenizer import Tokenizer
from flaxlm.train import preference

from tests.train.test_finetune import save_chat_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("chat-tokenizer")
    save_chat_tokenizer(directory)
    return Tokenizer.from_hf_dir(directory)


def write_jsonl(path, records) -> str:
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in records))
    return path


def test_pairs_are_rendered_masked_and_identical_ones_dropped(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "red cat", "chosen": "red", "rejected": "blue dog"},
        {"messages": [{"role": "system", "content": "one"}, {"role": "user", "content": "two"}],
         "chosen": "small", "rejected": "big"},
        {"prompt": "x", "chosen": "same", "rejected": "same"},
        {"prompt": "red " * 40, "chosen": "cat", "rejected": "dog"}])
    pairs = preference.read_pairs([path])
    assert [p.where for p in pairs] == [f"{path}:{i}" for i in (1, 2, 3, 4)]
    encoded = preference.encode_pairs(pairs, tokenizer, seq_len=24)
    assert (len(encoded.examples), encoded.identical, encoded.truncated, encoded.dropped) == \
        (2, 1, 1, 1)  # the long prompt is cut before its reply: dropped
    first = encoded.examples[0]
    for row, reply in enumerate(("red", "blue dog")):
        n = first["lengths"][row]
        text = tokenizer.decode(first["tokens"][row, :n].tolist())
        assert text == f"<|im_start|>user\nred cat<|im_end|>\n<|im_start|>assistant\n{reply}<|im_end|>\n"
        trained = first["tokens"][row][first["loss_mask"][row] == 1].tolist()
        assert tokenizer.decode(trained) == f"{reply}<|im_end|>"   # the reply and its end
        assert not first["tokens"][row, n:].any() and not first["loss_mask"][row, n:].any()
    assert "1 dropped as identical (chosen == rejected), 1 truncated" in encoded.summary("x")


def test_pair_batches_alternate_chosen_and_rejected(tokenizer):
    pairs = [preference.Pair(({"role": "user", "content": f"{w} cat"},), w, "dog", f"t:{i}")
             for i, w in enumerate(["red", "blue", "green"])]
    examples = preference.encode_pairs(pairs, tokenizer, seq_len=16).examples
    train = iter(preference.pair_train_dataset(examples, grad_accum=2, micro_batch=1, seed=0))
    batch = next(train)
    assert batch.tokens.shape == (2, 2, 17)
    rows = batch.tokens.reshape(4, 17)
    for chosen, rejected in zip(rows[0::2], rows[1::2]):
        assert any(np.array_equal(chosen, e["tokens"][0]) and np.array_equal(rejected, e["tokens"][1])
                   for e in examples)
    evals = preference.pair_eval_batches(examples, batch_size=2, max_batches=5)
    assert [b.tokens.shape for b in evals] == [(4, 17), (4, 17)]
    assert not evals[1].segment_ids[2:].any()          # the padding pair
    assert np.array_equal(evals[0].segment_ids[0] != 0,
                          np.arange(17) < examples[0]["lengths"][0])


@pytest.mark.parametrize("line, message", [
    ("{not json", r"p.jsonl:1: not valid JSON"),
    ('{"prompt": "a", "chosen": "b"}', r"p.jsonl:1: 'chosen' and 'rejected' must be strings"),
    ('{"chosen": "b", "rejected": "c"}', r"p.jsonl:1: needs 'prompt' .* or 'messages'"),
    ('{"messages": [{"role": 1}], "chosen": "b", "rejected": "c"}', r"p.jsonl:1: 'messages'"),
])
def test_bad_pair_records_are_named(tmp_path, line, message):
    with pytest.raises(DataError, match=message):
        preference.read_pairs([write_jsonl(tmp_path / "p.jsonl", [line + "\n"])])


def test_docstring_preferences_follow_the_stated_rule():
    """chosen: the function's own sentence; rejected: the sentence of the next function by
    qualified name, cyclically, in the same module and split, with a different sentence."""
    from flaxlm.model.docstrings import docstring_examples

    for split in ("train", "test"):
        examples = docstring_examples(split)
        by_name = {e.name: e for e in examples}
        pairs = preference.docstring_pairs(split)
        assert len(pairs) > (1000 if split == "train" else 100)
        for pair in pairs[::7]:
            own = by_name[pair.where.removeprefix("docstrings:")]
            assert pair.chosen == own.reference and pair.messages[0]["content"] == own.prompt
            module = [e for e in examples if e.module == own.module]
            start = module.index(own)
            candidates = module[start + 1:] + module[:start]
            assert pair.rejected == next(e.reference for e in candidates
                                         if e.reference != own.reference)
        covered = {p.where.removeprefix("docstrings:") for p in pairs}
        for e in examples:  # a function is left out only when no partner exists
            if e.name not in covered:
                assert all(o.reference == e.reference for o in examples if o.module == e.module)


def test_arithmetic_problems_are_seeded_held_out_and_rewarded_exactly():
    train = arithmetic_problems("train", 200, seed=3, max_operand=50)
    assert train == arithmetic_problems("train", 200, seed=3, max_operand=50)
    assert train != arithmetic_problems("train", 200, seed=4, max_operand=50)
    test = arithmetic_problems("test", 100, seed=3, max_operand=50)
    assert len(set(train)) == 200 and not set(train) & set(test)
    assert {p.split for p in train} == {"train"} and {p.split for p in test} == {"test"}
    assert {p.op for p in train} == {"+", "*"} and max(max(p.a, p.b) for p in train) <= 50
    problem = ArithmeticProblem(37, "+", 48)
    assert problem.prompt == "What is 37 + 48? Answer with the number only."
    assert parse_problem("Hi. " + problem.prompt) == problem
    completions = ["85", " 85.\n", "85 ", "85!", "The answer is 85", "86", "8 5", ""]
    assert arithmetic_reward([problem.prompt] * 8, completions) == [1, 1, 1, 0, 0, 0, 0, 0]
    assert arithmetic_reward([ArithmeticProblem(12, "*", 11).prompt], ["132"]) == [1.0]
    lenient = completions + ["37 + 48 = 85", "37 + 48 = 85\n\nThis is", "85 or 86", "-85"]
    assert arithmetic_answer_reward([problem.prompt] * 12, lenient) == \
        [1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 0, 0]
    with pytest.raises(ConfigError, match="at most"):
        arithmetic_problems("test", 10_000, max_operand=9)
    with pytest.raises(ConfigError, match="operations"):
        arithmetic_problems("train", 1, operations="-")
