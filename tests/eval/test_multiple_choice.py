"""Multiple choice: MMLU prompt format byte for byte, accuracies computed by hand, bad data."""

import csv
import json

import numpy as np
import pytest

from flaxlm.eval.multiple_choice import Question, prompt
from flaxlm.eval.task import EvalError, Settings
from flaxlm.eval.tasks import make_task


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def test_mmlu_prompt_is_the_standard_format():
    dev = Question("What is 1 + 1?", ("1", "2", "3", "4"), 1, "high_school_math", "dev:1")
    test = Question("Which is prime?", ("4", "6", "7", "8"), 2, "high_school_math", "test:1")
    assert prompt(test, [dev]) == (
        "The following are multiple choice questions (with answers) about high school math.\n\n"
        "What is 1 + 1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "Which is prime?\nA. 4\nB. 6\nC. 7\nD. 8\nAnswer:")


class ScriptedScores:
    """Stands in for an LLM whose log-likelihoods are given per continuation text."""

    def __init__(self, table):
        self.table, self.seen = table, []

    def loglikelihood(self, pairs, progress=None):
        self.seen += pairs
        return [type("R", (), {"logprob": self.table[cont]})() for _, cont in pairs]


def test_accuracies_equal_hand_computed_values(tmp_path):
    path = tmp_path / "mc.jsonl"
    rows = [{"question": "q1", "choices": ["aa", "bbbbbbbb"], "answer": 1},
            {"question": "q2", "choices": ["cc", "dddd", "e"], "answer": "A"},
            {"question": "q3", "choices": ["ff", "gg"], "answer": 0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = {" A": -1.0, " B": -2.0, " C": -3.0,
             " aa": -4.0, " bbbbbbbb": -6.0,          # acc picks aa (wrong); per char bbbbbbbb
             " cc": -1.0, " dddd": -3.0, " e": -2.0,  # acc picks cc (right); per char e: -2
             " ff": -5.0, " gg": -1.0}                # acc picks gg (wrong), norm gg (wrong)
    task = make_task(f"mc:{path}", Settings())
    result = task.run(ScriptedScores(table), lambda n: None)
    # letters: A always best -> right for q2 and q3
    # acc: aa(x) cc(v) gg(x) -> 1/3; acc_norm: -4/2=-2 vs -6/8=-0.75 -> b (v); -1/2, -3/4, -2/1
    # -> cc (v); -5/2, -1/2 -> gg (x) -> 2/3
    assert result.metrics["letter_acc"].value == pytest.approx(2 / 3)
    assert result.metrics["acc"].value == pytest.approx(1 / 3)
    assert result.metrics["acc_norm"].value == pytest.approx(2 / 3)
    assert result.metrics["acc"].stderr == pytest.approx(np.std([0, 1, 0], ddof=1) / np.sqrt(3))
    assert result.num_examples == 3


def test_mmlu_directory_per_subject_and_shots(tmp_path, tiny_llm):
    data = {"astronomy": "ABCA", "virology": "DCB"}
    questions = {}
    for subject, answers in data.items():
        rows = [(f"{subject} question {i}?", "w", "x", "yy", "z z", a)
                for i, a in enumerate(answers)]
        _write_csv(tmp_path / f"{subject}_dev.csv", rows[:2])
        _write_csv(tmp_path / f"{subject}_test.csv", rows)
        questions[subject] = [Question(r[0], r[1:5], "ABCD".index(r[5]), subject, "")
                              for r in rows]
    task = make_task(f"mmlu:{tmp_path}", Settings(shots=2, limit=3, log_samples=True))
    result = task.run(tiny_llm, lambda n: None)
    assert result.group_sizes == {"astronomy": 3, "virology": 3} and result.num_examples == 6
    hand = {"letter_acc": [], "acc": [], "acc_norm": []}
    for subject, qs in questions.items():
        for q in qs[:3]:
            text = prompt(q, qs[:2])
            letters = [r.logprob for r in tiny_llm.loglikelihood(
                [(text, f" {x}") for x in "ABCD"])]
            texts = np.array([r.logprob for r in tiny_llm.loglikelihood(
                [(text, f" {c}") for c in q.choices])])
            norm = texts / np.array([len(c) for c in q.choices])
            for metric, values in (("letter_acc", letters), ("acc", texts), ("acc_norm", norm)):
                hand[metric].append(float(np.argmax(values) == q.answer))
    for metric, values in hand.items():
        assert result.metrics[metric].value == pytest.approx(np.mean(values))
        assert result.groups["virology"][metric].value == pytest.approx(np.mean(values[3:]))
    assert result.samples[3]["prompt"].startswith(
        "The following are multiple choice questions (with answers) about virology.\n\n"
        "virology question 0?\nA. w\nB. x\nC. yy\nD. z z\nAnswer: D\n\n")


@pytest.mark.parametrize("rows, message", [
    ([("q", "a", "b", "c", "d", "A"), ("q", "a", "b", "c", "A")], "_test.csv:2: expected 6 fields"),
    ([("q", "a", "b", "c", "d", "E")], "_test.csv:1: answer 'E' is not one of A, B, C, D"),
])
def test_malformed_csv_names_file_and_line(tmp_path, rows, message):
    _write_csv(tmp_path / "law_test.csv", rows)
    with pytest.raises(EvalError, match=message):
        make_task(f"mmlu:{tmp_path}", Settings())


@pytest.mark.parametrize("line, message", [
    ('{"question": "q", "choices": [], "answer": 0}', "mc.jsonl:2: the example has no choices"),
    ('{"question": "q", "choices": ["a", "b"], "answer": "C"}', "mc.jsonl:2: answer 'C' is not one"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 2}', "mc.jsonl:2: answer 2 is not one"),
    ('{"question": "q", "choices": ["a"], "answer": 0', "mc.jsonl:2: not valid JSON"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "mc.jsonl"
    path.write_text('{"question": "ok", "choices": ["a", "b"], "answer": 1}\n' + line + "\n")
    with pytest.raises(EvalError, match=message):
        make_task(f"mc:{path}", Settings())


def test_shots_beyond_the_dev_split(tmp_path):
    _write_csv(tmp_path / "law_dev.csv", [("q", "a", "b", "c", "d", "A")] * 2)
    _write_csv(tmp_path / "law_test.csv", [("q", "a", "b", "c", "d", "A")])
    with pytest.raises(EvalError, match="--shots 3 is more than the 2 dev examples of law"):
        make_task(f"mmlu:{tmp_path}", Settings(shots=3))


def test_unknown_kind_lists_the_known_ones():
    with pytest.raises(EvalError, match="unknown task kind 'mmul'; known kinds: perplexity, "
                                        "mmlu, mc, gen, docstrings"):
        make_task("mmul:/tmp", Settings())
