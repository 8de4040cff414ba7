"""`arithmetic[:split=test,count=128,max_operand=30,operations=+*,seed=0]`: the arithmetic
task of GRPO and PPO (flaxlm.model.arithmetic), answered greedily as a chat.

The defaults are the held-out questions of the shipped arithmetic recipes
(configs/finetune/smollm2-lora-{grpo,ppo}-arithmetic.toml: 128 test questions, operands
up to 30, sums and products, seed 0), so a run's own `eval_reward` can be checked here
with `flaxlm eval --task arithmetic --adapter RUN_EXPORT`. Metrics: `accuracy` (the
completion's last number is the answer: the GRPO reward `arithmetic_answer_reward`) and
`exact` (the completion is the number and nothing else: `arithmetic_reward`), each with
its standard error.
"""

from __future__ import annotations

from flaxlm.eval.generation import _params, generate_all
from flaxlm.eval.metrics import mean
from flaxlm.eval.task import EvalError, Settings, Task, TaskResult, parse_args
from flaxlm.model.arithmetic import SPLITS, arithmetic_problems, is_correct, states_answer
from flaxlm.model.errors import ConfigError

OPTIONS = {"split": "test", "count": "128", "max_operand": "30", "operations": "+*",
           "seed": "0"}


class ArithmeticTask(Task):
    MAX_NEW_TOKENS = 16  # the recipes' rollout_max_new_tokens

    def __init__(self, args: str, settings: Settings):
        options = {**OPTIONS, **parse_args("arithmetic", args, tuple(OPTIONS), None)}
        if options["split"] not in SPLITS:
            raise EvalError(f"task arithmetic: split must be one of {SPLITS}, "
                            f"got {options['split']!r}")
        numbers = {}
        for key in ("count", "max_operand", "seed"):
            try:
                numbers[key] = int(options[key])
            except ValueError:
                raise EvalError(f"task arithmetic: {key} must be an integer, "
                                f"got {options[key]!r}") from None
        try:
            self.problems = arithmetic_problems(
                options["split"], numbers["count"], seed=numbers["seed"],
                max_operand=numbers["max_operand"], operations=options["operations"])
        except ConfigError as e:
            raise EvalError(f"task arithmetic: {e}") from None
        self.problems = self.problems[:settings.limit]
        self.name, self.settings, self.options = "arithmetic", settings, options

    def load(self) -> int:
        return len(self.problems)

    def run(self, llm, progress) -> TaskResult:
        prompts = [llm.chat_prompt_ids([{"role": "user", "content": p.prompt}])
                   for p in self.problems]
        params = _params(self.settings, (), min(self.settings.max_new_tokens,
                                                self.MAX_NEW_TOKENS))
        texts = [r.text for r in generate_all(llm, prompts, params, progress)]
        metrics = {"accuracy": mean([states_answer(p, t) for p, t in zip(self.problems, texts)]),
                   "exact": mean([is_correct(p, t) for p, t in zip(self.problems, texts)])}
        samples = None
        if self.settings.log_samples:
            samples = [{"prompt": p.prompt, "target": str(p.answer), "prediction": t,
                        "score": float(states_answer(p, t))}
                       for p, t in zip(self.problems, texts)]
        return TaskResult(self.name, metrics, len(self.problems), samples=samples,
                          info=dict(self.options))
