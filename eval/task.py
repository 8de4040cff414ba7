"""What every task kind shares: settings, results, errors, the `KIND[:ARGS]` syntax."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from flaxlm.eval.metrics import Metric
from flaxlm.model.errors import FlaxlmError


class EvalError(FlaxlmError, ValueError):
    """A task specification or a data file is wrong (the message names file and line)."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """The command line's settings, shared by every task."""

    limit: int | None = None       # the first N examples of each task (of each MMLU subject)
    shots: int = 0                 # few-shot examples (multiple choice)
    chat: bool = False             # wrap prompts in the model's chat template
    n: int = 1                     # samples per prompt (generation; > 1: self-consistency)
    temperature: float = 0.0       # generation; 0 = greedy
    max_new_tokens: int = 128
    seed: int = 0
    extract: str | None = None     # regex: the answer in a generated text (group 1 if any)
    log_samples: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class TaskResult:
    """One task's metrics (and per-group metrics, e.g. per MMLU subject)."""

    name: str
    metrics: dict[str, Metric]
    num_examples: int
    groups: dict[str, dict[str, Metric]] = dataclasses.field(default_factory=dict)
    group_sizes: dict[str, int] = dataclasses.field(default_factory=dict)
    samples: list[dict[str, Any]] | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. window, stride

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "num_examples": self.num_examples, **self.info,
            "metrics": {k: m.to_dict() for k, m in self.metrics.items()}}
        if self.groups:
            out["groups"] = {g: {"num_examples": self.group_sizes.get(g),
                                 "metrics": {k: m.to_dict() for k, m in ms.items()}}
                             for g, ms in self.groups.items()}
        return out


Progress = Callable[[int], None]


class Task:
    """A task: `load` reads and checks its data (before any model is loaded),
    `run(llm, progress)` evaluates and returns a TaskResult."""

    name: str = "task"

    def load(self) -> int:
        """Read the data; returns the number of scoring or generation steps (for the progress bar)."""
        raise NotImplementedError

    def run(self, llm, progress: Progress) -> TaskResult:
        raise NotImplementedError


def parse_args(kind: str, text: str, known: tuple[str, ...], positional: str | None
               ) -> dict[str, str]:
    """`PATH,key=value,...` -> {positional: PATH, key: value}; unknown keys are an error."""
    out: dict[str, str] = {}
    for i, part in enumerate(p for p in text.split(",") if p) if text else ():
        key, sep, value = part.partition("=")
        if not sep:
            if i or positional is None:
                raise EvalError(f"task {kind}: {part!r} is not key=value")
            out[positional] = part
            continue
        if key not in known:
            raise EvalError(f"task {kind}: unknown option {key!r} (options: {', '.join(known)})")
        out[key] = value
    return out


def existing_path(kind: str, value: str | None, what: str) -> Path:
    if not value:
        raise EvalError(f"task {kind} needs a {what}: --task {kind}:PATH")
    path = Path(value).expanduser()
    if not path.exists():
        raise EvalError(f"task {kind}: {path} does not exist")
    return path


def int_option(kind: str, options: dict[str, str], key: str, default: int | None) -> int | None:
    if key not in options:
        return default
    try:
        value = int(options[key])
    except ValueError:
        raise EvalError(f"task {kind}: {key} must be an integer, got {options[key]!r}") from None
    if value < 1:
        raise EvalError(f"task {kind}: {key} must be >= 1, got {value}")
    return value


def read_jsonl(path: Path, parse: Callable[[str, str], Any], what: str) -> list[Any]:
    """`parse(line, "FILE:LINE")` of every non-blank line; an unreadable file or one with
    no lines is an EvalError naming the file (`what`: "examples", "questions")."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"{path}: cannot read ({e})") from e
    out = [parse(line, f"{path}:{number}") for number, line in enumerate(lines, 1)
           if line.strip()]
    if not out:
        raise EvalError(f"{path}: no {what}")
    return out
