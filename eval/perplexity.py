"""Perplexity over local text, JSONL or Parquet files (the readers training uses).

`perplexity:GLOB[,format=auto|text|jsonl|parquet,field=text,window=N,stride=N]`:
every document is scored with `LLM.loglikelihood_rolling` (each token once,
the first given the prefix token; windows of `window` tokens, default the
model's context, advancing by `stride`). Over all documents:

- token perplexity  exp(-sum logprob / sum tokens)
- bits per byte     -sum logprob / (ln 2 * sum UTF-8 bytes)
- word perplexity   exp(-sum logprob / sum words), words split on whitespace

with bootstrap standard errors over documents.
"""

from __future__ import annotations

import math
import re

import numpy as np

from flaxlm.eval.metrics import bootstrap
from flaxlm.eval.task import EvalError, Settings, Task, TaskResult, int_option, parse_args
from flaxlm.model.errors import FlaxlmError

FORMATS = ("auto", "text", "jsonl", "parquet")


class PerplexityTask(Task):
    def __init__(self, args: str, settings: Settings):
        from flaxlm.model.sources import DocumentSource, find_files

        options = parse_args("perplexity", args, ("path", "format", "field", "window", "stride"),
                             "path")
        if not options.get("path"):
            raise EvalError("task perplexity needs files: --task perplexity:GLOB")
        fmt = options.get("format", "auto")
        if fmt not in FORMATS:
            raise EvalError(f"task perplexity: format must be one of {FORMATS}, got {fmt!r}")
        self.window = int_option("perplexity", options, "window", None)
        self.stride = int_option("perplexity", options, "stride", None)
        try:
            files = find_files((options["path"],))
            source = DocumentSource(files, fmt, options.get("field", "text"))
            count = len(source) if settings.limit is None else min(settings.limit, len(source))
            self.documents = [source[i] for i in range(count)]
        except FlaxlmError as e:
            raise EvalError(f"task perplexity: {e}") from e
        self.name = f"perplexity:{options['path']}"
        self.settings = settings

    def load(self) -> int:
        return len(self.documents)

    def run(self, llm, progress) -> TaskResult:
        docs = self.documents
        done = llm.loglikelihood_rolling(docs, self.window, self.stride, progress=None)
        progress(len(docs))
        logprob = np.array([d.logprob for d in done], np.float64)
        tokens = np.array([d.num_tokens for d in done], np.float64)
        nbytes = np.array([len(d.encode("utf-8")) for d in docs], np.float64)
        words = np.array([len(re.split(r"\s+", d.strip())) for d in docs], np.float64)
        metrics = {
            "token_perplexity": bootstrap(lambda i: math.exp(-logprob[i].sum() / tokens[i].sum()),
                                          len(docs)),
            "bits_per_byte": bootstrap(lambda i: -logprob[i].sum() / nbytes[i].sum() / math.log(2),
                                       len(docs)),
            "word_perplexity": bootstrap(lambda i: math.exp(-logprob[i].sum() / words[i].sum()),
                                         len(docs)),
        }
        window = self.window or llm.config.max_seq_len
        samples = None
        if self.settings.log_samples:
            samples = [{"document": i, "prompt": d[:200], "logprob": float(lp),
                        "tokens": int(t), "bytes": int(b)}
                       for i, (d, lp, t, b) in enumerate(zip(docs, logprob, tokens, nbytes))]
        return TaskResult(self.name, metrics, len(docs), samples=samples,
                          info={"tokens": int(tokens.sum()), "window": window,
                                "stride": self.stride or window})
