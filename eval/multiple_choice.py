"""Multiple choice: the MMLU release layout and JSONL, scored by log-likelihood.

Prompts follow MMLU's standard format (as lm-evaluation-harness writes it):

    The following are multiple choice questions (with answers) about {subject}.

    {dev question}
    A. {choice}
    ...
    Answer: {letter}

    {question}
    A. {choice}
    ...
    Answer:

(the subject's underscores become spaces; without a subject the header ends
"(with answers)."). Each question is scored two ways, in one batch of requests:
by the log-likelihood of each answer letter (" A", " B", ...: `letter_acc`) and
of each full choice text (" " + text: `acc`, and `acc_norm`, the log-likelihood
divided by the choice's length in characters, as lm-evaluation-harness
normalizes). Results are per subject and over all questions (micro average).
With chat, the prompt is the user message and the continuations lose their
leading space.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np

from flaxlm.eval.metrics import mean
from flaxlm.eval.task import (EvalError, Settings, Task, TaskResult, existing_path,
                              parse_args, read_jsonl)

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MMLU_LETTERS = 4


@dataclasses.dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, ...]
    answer: int          # index into choices
    subject: str | None
    where: str           # "FILE:LINE", for messages


def header(subject: str | None) -> str:
    about = f" about {subject.replace('_', ' ')}" if subject else ""
    return f"The following are multiple choice questions (with answers){about}.\n\n"


def format_question(q: Question, with_answer: bool) -> str:
    text = q.question + "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(q.choices))
    return text + (f"\nAnswer: {LETTERS[q.answer]}\n\n" if with_answer else "\nAnswer:")


def prompt(q: Question, shots: list[Question]) -> str:
    """MMLU's k-shot prompt for `q` with the dev examples `shots`."""
    return header(q.subject) + "".join(format_question(s, True) for s in shots) \
        + format_question(q, False)


def read_mmlu_csv(path: Path, subject: str) -> list[Question]:
    """Rows `question,A,B,C,D,answer`, no header; errors name the file and line."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            out = []
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if len(row) != 2 + MMLU_LETTERS:
                    raise EvalError(f"{where}: expected 6 fields (question, A, B, C, D, answer), "
                                    f"got {len(row)}")
                answer = row[-1].strip()
                if answer not in LETTERS[:MMLU_LETTERS] or not answer:
                    raise EvalError(f"{where}: answer {answer!r} is not one of A, B, C, D")
                out.append(Question(row[0], tuple(row[1:-1]), LETTERS.index(answer), subject,
                                    where))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise EvalError(f"{path}: cannot read as CSV ({e})") from e
    return out


def read_mc_jsonl(path: Path) -> list[Question]:
    """Lines {"question", "choices", "answer" (index or letter)[, "subject"]}."""
    return read_jsonl(path, _jsonl_question, "questions")

def _jsonl_question(line: str, where: str) -> Question:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise EvalError(f"{where}: not valid JSON ({e})") from e
    if not isinstance(record, dict) or not isinstance(record.get("question"), str):
        raise EvalError(f"{where}: needs a string field 'question'")
    choices = record.get("choices")
    if not isinstance(choices, list) or not choices:
        raise EvalError(f"{where}: the example has no choices")
    if len(choices) > len(LETTERS) or not all(isinstance(c, str) and c for c in choices):
        raise EvalError(f"{where}: 'choices' must be 1-26 non-empty strings")
    answer = record.get("answer")
    if isinstance(answer, str) and len(answer) == 1 and answer in LETTERS[:len(choices)]:
        answer = LETTERS.index(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise EvalError(f"{where}: answer {record.get('answer')!r} is not one of the "
                        f"{len(choices)} choices ({', '.join(LETTERS[:len(choices)])} or "
                        f"0-{len(choices) - 1})")
    subject = record.get("subject")
    return Question(record["question"], tuple(choices), answer,
                    subject if isinstance(subject, str) else None, where)


class MultipleChoiceTask(Task):
    """Questions grouped by subject, each with its dev examples for few-shot prompts."""

    def __init__(self, name: str, tests: dict[str, list[Question]],
                 devs: dict[str, list[Question]], settings: Settings):
        self.name, self.settings = name, settings
        self.tests = {s: qs[:settings.limit] for s, qs in tests.items()}
        self.devs = devs
        for subject in self.tests:
            dev = devs.get(subject, [])
            if settings.shots > len(dev):
                where = dev[0].where.rsplit(":", 1)[0] if dev else "no dev split"
                raise EvalError(f"{name}: --shots {settings.shots} is more than the {len(dev)} "
                                f"dev examples of {subject or 'the task'} ({where})")

    def load(self) -> int:
        return sum(2 * len(q.choices) for qs in self.tests.values() for q in qs)

    def requests(self, llm, q: Question) -> tuple[str, list[str], list[str]]:
        """(context, letter continuations, choice-text continuations)."""
        text = prompt(q, self.devs.get(q.subject or "", [])[:self.settings.shots])
        space = " "
        if self.settings.chat:
            text = llm.tokenizer.apply_chat_template([{"role": "user", "content": text}])
            space = ""
        return text, [space + LETTERS[i] for i in range(len(q.choices))], \
            [space + c for c in q.choices]

    def run(self, llm, progress) -> TaskResult:
        questions = [q for qs in self.tests.values() for q in qs]
        built = [self.requests(llm, q) for q in questions]
        pairs = [(context, c) for context, letters, texts in built for c in letters + texts]
        scores = iter(r.logprob for r in llm.loglikelihood(pairs, progress=progress))
        correct = {"letter_acc": [], "acc": [], "acc_norm": []}
        samples = []
        for q, (context, letters, texts) in zip(questions, built):
            letter_ll = np.array([next(scores) for _ in letters])
            text_ll = np.array([next(scores) for _ in texts])
            norm = text_ll / np.array([len(c) for c in q.choices], np.float64)
            picks = {"letter_acc": int(np.argmax(letter_ll)), "acc": int(np.argmax(text_ll)),
                     "acc_norm": int(np.argmax(norm))}
            for metric, pick in picks.items():
                correct[metric].append(float(pick == q.answer))
            samples.append({"subject": q.subject, "prompt": context,
                            "target": LETTERS[q.answer], "prediction": LETTERS[picks["letter_acc"]],
                            "score": float(picks["letter_acc"] == q.answer),
                            "letter_loglikelihoods": letter_ll.tolist(),
                            "choice_loglikelihoods": text_ll.tolist(), "where": q.where})
        return self._result(questions, correct, samples)

    def _result(self, questions, correct, samples) -> TaskResult:
        result = TaskResult(self.name, {m: mean(v) for m, v in correct.items()}, len(questions),
                            samples=samples if self.settings.log_samples else None,
                            info={"shots": self.settings.shots})
        if len(self.tests) > 1 or next(iter(self.tests)):
            for subject in self.tests:
                idx = [i for i, q in enumerate(questions) if (q.subject or "") == subject]
                result.groups[subject] = {m: mean([v[i] for i in idx]) for m, v in correct.items()}
                result.group_sizes[subject] = len(idx)
        return result


def mmlu_task(args: str, settings: Settings) -> MultipleChoiceTask:
    """`mmlu:DIR[,subjects=a+b]`: `{subject}_test.csv` and `{subject}_dev.csv` under DIR
    (flat, or in the release's dev/ and test/ folders)."""
    options = parse_args("mmlu", args, ("path", "subjects"), "path")
    root = existing_path("mmlu", options.get("path"), "directory")
    tests = {p.name[:-len("_test.csv")]: p for p in sorted(root.rglob("*_test.csv"))}
    if not tests:
        raise EvalError(f"mmlu: no {{subject}}_test.csv files under {root}")
    if "subjects" in options:
        wanted = options["subjects"].split("+")
        missing = [s for s in wanted if s not in tests]
        if missing:
            raise EvalError(f"mmlu: no test file for subject(s) {', '.join(missing)} under {root}")
        tests = {s: tests[s] for s in wanted}
    devs = {s: next(iter(sorted(root.rglob(f"{s}_dev.csv"))), None) for s in tests}
    return MultipleChoiceTask(
        "mmlu", {s: read_mmlu_csv(p, s) for s, p in tests.items()},
        {s: read_mmlu_csv(p, s) for s, p in devs.items() if p is not None}, settings)


def jsonl_task(args: str, settings: Settings) -> MultipleChoiceTask:
    """`mc:FILE.jsonl[,dev=DEV.jsonl]`: shots come from the dev file, per subject."""
    options = parse_args("mc", args, ("path", "dev"), "path")
    path = existing_path("mc", options.get("path"), "JSONL file")
    tests: dict[str, list[Question]] = {}
    for q in read_mc_jsonl(path):
        tests.setdefault(q.subject or "", []).append(q)
    devs: dict[str, list[Question]] = {}
    if "dev" in options:
        for q in read_mc_jsonl(existing_path("mc", options["dev"], "dev file")):
            devs.setdefault(q.subject or "", []).append(q)
    return MultipleChoiceTask(f"mc:{path.name}", tests, devs, settings)
