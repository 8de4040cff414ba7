"""The arithmetic task: sums and products of random integers, with a verifiable reward.

A problem is generated from a seed ("What is 37 + 48? Answer with the number only.");
its answer is exact, so a completion is rewarded 1.0 when it states the number and
nothing else (surrounding whitespace and one final "." allowed), else 0.0
(`arithmetic_reward`), or, by the lenient rule, when the last number it writes is the
answer (`arithmetic_answer_reward`: "37 + 48 = 85" counts). It lives in
`flaxlm.model`, like the docstrings task, so training (GRPO's reward) and evaluation
see the same problems and the same split.

Split: a problem (a, op, b) is held out ("test") when the first 8 bytes of the SHA-256
of "a op b", as an integer, modulo 100 are below 10, so no question is in both splits
whatever the seed or the count.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

import numpy as np

from flaxlm.model.errors import ConfigError

OPERATIONS = {"+": lambda a, b: a + b, "*": lambda a, b: a * b}
SPLITS = ("train", "test")
HELD_OUT_PERCENT = 10
_QUESTION = re.compile(r"What is (\d+) ([+*]) (\d+)\? Answer with the number only\.")
_ANSWER = re.compile(r"\s*(-?\d+)\.?\s*")
_NUMBER = re.compile(r"-?\d+")


@dataclasses.dataclass(frozen=True)
class ArithmeticProblem:
    a: int
    op: str          # "+" or "*"
    b: int

    @property
    def prompt(self) -> str:
        return f"What is {self.a} {self.op} {self.b}? Answer with the number only."

    @property
    def answer(self) -> int:
        return OPERATIONS[self.op](self.a, self.b)

    @property
    def split(self) -> str:
        key = f"{self.a} {self.op} {self.b}".encode()
        digest = int.from_bytes(hashlib.sha256(key).digest()[:8], "big")
        return "test" if digest % 100 < HELD_OUT_PERCENT else "train"


def arithmetic_problems(split: str, count: int, *, seed: int = 0, max_operand: int = 99,
                        operations: str = "+*") -> list[ArithmeticProblem]:
    """`count` distinct problems of `split`, operands uniform in [0, max_operand] and the
    operation uniform over `operations` (a string of "+" and "*"), drawn from `seed`."""
    if split not in SPLITS:
        raise ConfigError(f"arithmetic split must be one of {SPLITS}, got {split!r}")
    if not operations or set(operations) - set(OPERATIONS):
        raise ConfigError(f"arithmetic operations {operations!r}: use '+', '*' or '+*'")
    if max_operand < 1:
        raise ConfigError(f"arithmetic max_operand must be >= 1, got {max_operand}")
    ops = sorted(set(operations))
    limit = _split_size(split, max_operand, ops)
    if split == "train":
        limit //= 2  # drawing most of a split by rejection would take long
    if count > limit:
        raise ConfigError(f"{count} arithmetic problems of split {split!r} asked for; with "
                          f"max_operand {max_operand} and operations {operations!r} at most "
                          f"{limit} are drawn (raise max_operand or ask for fewer)")
    rng = np.random.default_rng(seed)
    seen: set[ArithmeticProblem] = set()
    problems = []
    while len(problems) < count:
        a, b = (int(x) for x in rng.integers(0, max_operand + 1, 2))
        problem = ArithmeticProblem(a, ops[int(rng.integers(len(ops)))], b)
        if problem.split == split and problem not in seen:
            seen.add(problem)
            problems.append(problem)
    return problems


def _split_size(split: str, max_operand: int, ops: list[str]) -> int:
    """How many problems `split` holds: counted when there are few, else a bound a little
    below the expected share (the hash split is only close to HELD_OUT_PERCENT)."""
    available = (max_operand + 1) ** 2 * len(ops)
    if available <= 100_000:
        return sum(ArithmeticProblem(a, op, b).split == split for op in ops
                   for a in range(max_operand + 1) for b in range(max_operand + 1))
    share = HELD_OUT_PERCENT if split == "test" else 100 - HELD_OUT_PERCENT
    return available * share * 9 // 1000  # 90% of the expected count


def parse_problem(prompt: str) -> ArithmeticProblem:
    """The problem a prompt asks (it must contain the task's question)."""
    match = _QUESTION.search(prompt)
    if match is None:
        raise ValueError(f"not an arithmetic question: {prompt[:80]!r}")
    return ArithmeticProblem(int(match.group(1)), match.group(2), int(match.group(3)))


def is_correct(problem: ArithmeticProblem, completion: str) -> bool:
    """The completion is the exact answer (whitespace and one final "." allowed)."""
    match = _ANSWER.fullmatch(completion)
    return match is not None and int(match.group(1)) == problem.answer


def states_answer(problem: ArithmeticProblem, completion: str) -> bool:
    """The last number the completion writes is the exact answer ("37 + 48 = 85" and "85."
    count, "85 or 86" does not): the lenient rule, for a model that echoes the sum."""
    numbers = _NUMBER.findall(completion)
    return bool(numbers) and int(numbers[-1]) == problem.answer


def arithmetic_answer_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """Reward callable (`flaxlm.model.arithmetic:arithmetic_answer_reward`): 1.0 when the
    completion's last number is the exact answer (`states_answer`), else 0.0. SmolLM2-135M
    answers "37 + 48 = 85" rather than "85", so the strict `arithmetic_reward` is 0 for
    every sample it draws at the start and gives GRPO nothing to learn from."""
    return [float(states_answer(parse_problem(p), c)) for p, c in zip(prompts, completions,
                                                                      strict=True)]


def arithmetic_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """Reward callable (`flaxlm.model.arithmetic:arithmetic_reward`): 1.0 for the exact
    number, 0.0 otherwise."""
    return [float(is_correct(parse_problem(p), c)) for p, c in zip(prompts, completions,
                                                                   strict=True)]
