"""lm-evaluation-harness: flaxlm as an `lm_eval.api.model.LM`, and running harness tasks.

    from lm_eval import simple_evaluate
    from flaxlm.eval.harness import FlaxlmLM
    results = simple_evaluate(model=FlaxlmLM(LLM.load("smollm2-135m-instruct")), tasks=[...])

The adapter is also registered as lm-eval's model "flaxlm"
(`model_args="pretrained=PATH"`) once this module is imported. Requests map
onto `LLM.loglikelihood`, `LLM.loglikelihood_rolling` (lm-eval's disjoint
windows) and `LLM.generate` (greedy unless `do_sample`, stopping at `until`,
the context cut from the left to leave room for `max_gen_toks`), with the same
tokenization as lm-eval's `hf` backend.
"""

from __future__ import annotations

import difflib
import json
import os
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs
from tqdm import tqdm

from flaxlm.eval.task import EvalError
from flaxlm.infer.llm import LLM
from flaxlm.infer.sampling import SamplingParams

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HFLM default


@register_model("flaxlm")
class FlaxlmLM(LM):
    """An `LLM` behind lm-eval's three request types."""

    def __init__(self, llm: LLM | None = None, pretrained: str | None = None,
                 batch_size: int | str | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                 dtype: str = "float32", quantize: str | None = None, mesh: str | None = None,
                 **ignored: Any):
        """An LLM, or lm-eval's model_args (pretrained=MODEL, dtype, quantize, mesh); lm-eval's
        device and max_batch_size are ignored (JAX places the model, buckets size batches)."""
        super().__init__()
        if llm is None:
            if pretrained is None:
                raise EvalError("FlaxlmLM needs an LLM or pretrained=MODEL")
            max_batch = int(batch_size) if str(batch_size or "").isdigit() else 64
            llm = LLM.load(pretrained, max_batch=max_batch, dtype=dtype, quantize=quantize,
                           mesh=mesh)
        self.llm = llm
        self.max_gen_toks = max_gen_toks
        self._name = str(pretrained or "flaxlm")

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args) for r in requests]
        with tqdm(total=len(pairs), disable=disable_tqdm, desc="flaxlm loglikelihood") as bar:
            out = self.llm.loglikelihood(pairs, progress=bar.update)
        answers = [(r.logprob, r.is_greedy) for r in out]
        for pair, answer in zip(pairs, answers):
            self.cache_hook.add_partial("loglikelihood", pair, answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [r.args[0] for r in requests]
        with tqdm(total=len(texts), disable=disable_tqdm, desc="flaxlm rolling") as bar:
            out = [r.logprob for r in self.llm.loglikelihood_rolling(texts)]
            bar.update(len(texts))
        for text, logprob in zip(texts, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), logprob)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(requests)
        with tqdm(total=len(requests), disable=disable_tqdm, desc="flaxlm generate") as bar:
            for indices in groups.values():
                params = self._params(requests[indices[0]].args[1])
                contexts = [requests[i].args[0] for i in indices]
                for i, result in zip(indices, self.llm.generate(contexts, params, truncate=True)):
                    out[i] = result.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, result.text)
                bar.update(len(indices))
        return out

    def _params(self, gen_kwargs: dict) -> SamplingParams:
        kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        sampled = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature") or 0) > 0
        extra = {}
        if sampled:
            extra = {k: kwargs[k] for k in ("top_p", "top_k", "min_p") if kwargs.get(k) is not None}
        return SamplingParams(max_new_tokens=int(kwargs["max_gen_toks"]),
                              temperature=float(kwargs["temperature"]) if sampled else 0.0,
                              stop=tuple(s for s in until if s), **extra)

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        return self.llm.tokenizer.apply_chat_template(chat_history,
                                                      add_generation_prompt=add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return self._name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.llm.tokenizer.chat_template if chat_template else None


def task_manager(include_path: str | None = None, tasks: list[str] | None = None):
    """lm-eval's TaskManager with the tasks under `include_path` added. When `tasks` are all
    found there, lm-eval's own ~15,000 task files are not indexed (that takes seconds)."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not os.path.isdir(include_path):
        raise EvalError(f"--include-path {include_path}: not a directory")
    if include_path is not None and tasks is not None:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    return TaskManager(include_path=include_path)


def check_tasks(manager, tasks: list[str]) -> None:
    known = set(manager.all_tasks)
    for name in tasks:
        if name not in known:
            hint = difflib.get_close_matches(name, sorted(known), n=3)
            extra = f" (did you mean {', '.join(hint)}?)" if hint else ""
            raise EvalError(f"--harness: unknown lm-evaluation-harness task {name!r}{extra}")


def run_harness(llm: LLM, tasks: list[str], manager, *, limit: int | None, shots: int | None,
                chat: bool, log_samples: bool, seed: int = 0) -> dict[str, Any]:
    """lm_eval.simple_evaluate on flaxlm; returns lm-eval's results dict."""
    from lm_eval import simple_evaluate

    return simple_evaluate(model=FlaxlmLM(llm), tasks=tasks, num_fewshot=shots, limit=limit,
                           task_manager=manager, log_samples=log_samples,
                           apply_chat_template=chat, bootstrap_iters=1000, random_seed=seed,
                           numpy_random_seed=seed, fewshot_random_seed=seed)
