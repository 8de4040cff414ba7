"""Generation tasks: JSONL prompts with references, and the shipped docstring task.

Metrics: exact match (stripped text equals a reference), ROUGE-1/2/L F1
(rouge-score, best over references), corpus BLEU and chrF (sacrebleu); with
`--extract REGEX` the extracted answers are compared instead (group 1 if the
regex has a group, else the match; a reference the regex does not match is
taken whole); with `--n K` (sampled, `--temperature`) also self-consistency:
`maj@K` (the most common extracted answer of the K samples) beside `acc@1`
(the mean correctness of single samples). Text metrics use each prompt's
most likely sample.
"""

from __future__ import annotations

import codecs
import collections
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from flaxlm.eval.metrics import (Metric, bootstrap, corpus_bleu, corpus_chrf, corpus_metric,
                                 mean, rouge)
from flaxlm.eval.task import (EvalError, Settings, Task, TaskResult, existing_path, parse_args,
                              read_jsonl)
from flaxlm.model.docstrings import SPLITS, docstring_examples, first_sentence


def read_generation_jsonl(path: Path) -> list[dict[str, Any]]:
    """Lines {"prompt": str | "messages": [...], "references": [str, ...] | "reference": str}."""
    return read_jsonl(path, _example, "examples")

def _example(line: str, where: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise EvalError(f"{where}: not valid JSON ({e})") from e
    if not isinstance(record, dict):
        raise EvalError(f"{where}: expected a JSON object")
    prompt, messages = record.get("prompt"), record.get("messages")
    if not (isinstance(prompt, str) and prompt) and not (isinstance(messages, list) and messages):
        raise EvalError(f"{where}: needs a non-empty 'prompt' string or 'messages' list")
    refs = record.get("references", record.get("reference"))
    refs = [refs] if isinstance(refs, str) else refs
    if not isinstance(refs, list) or not refs:
        raise EvalError(f"{where}: needs 'references' (a list of strings) or 'reference'")
    if not all(isinstance(r, str) and r.strip() for r in refs):
        raise EvalError(f"{where}: the example has an empty reference")
    return {"prompt": prompt, "messages": messages, "references": refs, "where": where}


def extractor(pattern: str | None):
    """text -> answer (None when the regex finds nothing), or None without a pattern."""
    if pattern is None:
        return None
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise EvalError(f"--extract {pattern!r} is not a valid regular expression ({e})") from e

    def extract(text: str) -> str | None:
        match = regex.search(text)
        if match is None:
            return None
        return (match.group(1) if regex.groups else match.group(0)).strip()

    return extract


def _params(settings: Settings, stop: tuple[str, ...], max_new_tokens: int | None = None):
    from flaxlm.infer.sampling import SamplingParams

    return SamplingParams(temperature=settings.temperature, n=settings.n,
                          seed=settings.seed if settings.temperature > 0 else None,
                          max_new_tokens=max_new_tokens or settings.max_new_tokens, stop=stop)


def generate_all(llm, prompts: list, params, progress) -> list:
    """llm.generate over `prompts` in chunks of one batch, reporting progress per prompt."""
    per_call = max(1, llm.max_batch // params.n)
    results = []
    for start in range(0, len(prompts), per_call):
        results += llm.generate(prompts[start:start + per_call], params, truncate=True)
        progress(len(prompts[start:start + per_call]))
    return results


def text_metrics(predictions: list[str], references: list[list[str]]) -> dict[str, Metric]:
    exact = [float(any(p.strip() == r.strip() for r in refs))
             for p, refs in zip(predictions, references)]
    out = {"exact_match": mean(exact)}
    out.update({kind: mean(v) for kind, v in rouge(predictions, references).items()})
    out["bleu"] = corpus_metric(corpus_bleu, predictions, references)
    out["chrf"] = corpus_metric(corpus_chrf, predictions, references)
    return out


def answer_metrics(samples: list[list[str]], references: list[list[str]], extract,
                   n: int) -> dict[str, Metric]:
    """Extracted-answer accuracy; with n > 1 also majority vote (maj@n) and single-sample acc@1."""
    def truth(refs):
        return {extract(r) or r.strip() for r in refs}

    firsts, majority, singles = [], [], []
    for texts, refs in zip(samples, references):
        answers = [extract(t) for t in texts]
        wanted = truth(refs)
        firsts.append(float(answers[0] in wanted))
        counts = collections.Counter(a for a in answers if a is not None)
        best = max(counts, key=lambda a: (counts[a], -answers.index(a))) if counts else None
        majority.append(float(best in wanted))
        singles.append(float(np.mean([a in wanted for a in answers])))
    if n == 1:
        return {"extract_match": mean(firsts)}
    return {f"maj@{n}": mean(majority), "acc@1": mean(singles)}


class GenerationTask(Task):
    """`gen:FILE.jsonl[,stop=TEXT]` (stop may use escapes such as \\n)."""

    def __init__(self, args: str, settings: Settings):
        options = parse_args("gen", args, ("path", "stop"), "path")
        self.path = existing_path("gen", options.get("path"), "JSONL file")
        self.name = f"gen:{self.path.name}"
        self.settings = settings
        self.stop = (codecs.decode(options["stop"], "unicode_escape"),) if options.get("stop") else ()
        self.extract = extractor(settings.extract)
        self.examples = read_generation_jsonl(self.path)[:settings.limit]

    def load(self) -> int:
        return len(self.examples)

    def run(self, llm, progress) -> TaskResult:
        prompts = []
        for ex in self.examples:
            if ex["messages"] is not None:
                prompts.append(llm.chat_prompt_ids(ex["messages"]))
            elif self.settings.chat:
                prompts.append(llm.chat_prompt_ids([{"role": "user", "content": ex["prompt"]}]))
            else:
                prompts.append(ex["prompt"])
        results = generate_all(llm, prompts, _params(self.settings, self.stop), progress)
        texts = [[o.text for o in r.outputs] for r in results]
        predictions = [t[0] for t in texts]
        references = [ex["references"] for ex in self.examples]
        metrics = text_metrics(predictions, references)
        if self.extract is not None:
            metrics.update(answer_metrics(texts, references, self.extract, self.settings.n))
        samples = None
        if self.settings.log_samples:
            rouge_l = rouge(predictions, references)["rougeL"]
            samples = [{"prompt": ex["prompt"] if ex["messages"] is None else ex["messages"],
                        "target": ex["references"], "prediction": p, "samples": t,
                        "score": s, "where": ex["where"]}
                       for ex, p, t, s in zip(self.examples, predictions, texts, rouge_l)]
        return TaskResult(self.name, metrics, len(self.examples), samples=samples,
                          info={"n": self.settings.n, "temperature": self.settings.temperature})


class DocstringTask(Task):
    """`docstrings[:split=test]`: write a standard-library function's docstring.

    The prompt is the example's `completion_prompt` (ending in opening triple
    quotes; generation stops at the closing ones), or with --chat its `prompt`
    as the user message. Metrics: ROUGE-L (and 1/2) F1 of the generated text's
    first sentence against the reference, and the loss on the reference
    (token-weighted mean negative log-likelihood of the reference given the
    prompt, bootstrap stderr; `ppl` is its exp).
    """

    MAX_NEW_TOKENS = 64

    def __init__(self, args: str, settings: Settings):
        options = parse_args("docstrings", args, ("split",), None)
        split = options.get("split", "test")
        if split not in SPLITS:
            raise EvalError(f"task docstrings: split must be one of {SPLITS}, got {split!r}")
        self.name, self.settings = "docstrings", settings
        self.examples = docstring_examples(split)[:settings.limit]
        self.split = split

    def load(self) -> int:
        return 2 * len(self.examples)

    def run(self, llm, progress) -> TaskResult:
        if self.settings.chat:
            contexts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": e.prompt}])
                        for e in self.examples]
            targets = [e.reference for e in self.examples]
        else:
            contexts = [e.completion_prompt for e in self.examples]
            targets = [e.reference for e in self.examples]
        params = _params(self.settings, ('"""',), min(self.settings.max_new_tokens,
                                                      self.MAX_NEW_TOKENS))
        prompt_ids = [llm.tokenizer.encode(c, add_special_tokens=not self.settings.chat)
                      for c in contexts]
        results = generate_all(llm, prompt_ids, params, progress)
        predictions = [first_sentence(r.text.strip().strip("`'\" ")) for r in results]
        references = [[e.reference] for e in self.examples]
        scores = llm.loglikelihood(list(zip(contexts, targets)), progress=progress)
        nll = np.array([-s.logprob for s in scores])
        tokens = np.array([s.num_tokens for s in scores], np.float64)
        metrics = {kind: mean(v) for kind, v in rouge(predictions, references).items()}
        metrics["loss"] = bootstrap(lambda i: float(nll[i].sum() / tokens[i].sum()), len(nll))
        metrics["ppl"] = Metric(math.exp(metrics["loss"].value))
        samples = None
        if self.settings.log_samples:
            rouge_l = rouge(predictions, references)["rougeL"]
            samples = [{"name": e.name, "prompt": c, "target": e.reference, "prediction": p,
                        "score": s, "loss": float(n / t)}
                       for e, c, p, s, n, t in zip(self.examples, contexts, predictions, rouge_l,
                                                   nll, tokens)]
        return TaskResult(self.name, metrics, len(self.examples), samples=samples,
                          info={"split": self.split})
