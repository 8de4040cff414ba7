"""The task kinds of `flaxlm eval` and running a list of tasks on an LLM."""

from __future__ import annotations

from typing import Callable

from flaxlm.eval.arithmetic import ArithmeticTask
from flaxlm.eval.generation import DocstringTask, GenerationTask
from flaxlm.eval.multiple_choice import jsonl_task, mmlu_task
from flaxlm.eval.perplexity import PerplexityTask
from flaxlm.eval.task import EvalError, Settings, Task, TaskResult

KINDS: dict[str, Callable[[str, Settings], Task]] = {
    "perplexity": PerplexityTask,   # perplexity:GLOB[,format=,field=,window=,stride=]
    "mmlu": mmlu_task,              # mmlu:DIR[,subjects=a+b]
    "mc": jsonl_task,               # mc:FILE.jsonl[,dev=DEV.jsonl]
    "gen": GenerationTask,          # gen:FILE.jsonl[,stop=TEXT]
    "docstrings": DocstringTask,    # docstrings[:split=test|train]
    "arithmetic": ArithmeticTask,   # arithmetic[:split=,count=,max_operand=,operations=,seed=]
}


def make_task(spec: str, settings: Settings) -> Task:
    """A task from `KIND[:ARGS]`, its data read and checked (no model needed)."""
    kind, _, args = spec.partition(":")
    if kind not in KINDS:
        raise EvalError(f"unknown task kind {kind!r}; known kinds: {', '.join(KINDS)}")
    return KINDS[kind](args, settings)


def evaluate(llm, tasks: list[Task], progress: bool = True) -> list[TaskResult]:
    """Run every task on `llm`, with a progress bar per task on stderr."""
    from tqdm import tqdm

    results = []
    for task in tasks:
        with tqdm(total=task.load(), desc=task.name, disable=not progress, unit="req") as bar:
            results.append(task.run(llm, bar.update))
    return results


def markdown_table(results: list[TaskResult]) -> str:
    """One row per metric of each task (and of each group, e.g. MMLU subject)."""
    lines = ["| task | metric | value | stderr | n |", "|---|---|---|---|---|"]

    def rows(name, metrics, n):
        for metric, m in metrics.items():
            stderr = "" if m.stderr is None else f"{m.stderr:.4f}"
            lines.append(f"| {name} | {metric} | {m.value:.4f} | {stderr} | {n} |")

    for result in results:
        rows(result.name, result.metrics, result.num_examples)
        for group, metrics in result.groups.items():
            rows(f"{result.name}/{group}", metrics, result.group_sizes.get(group, ""))
    return "\n".join(lines)
