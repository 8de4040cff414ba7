"""`flaxlm eval MODEL --task KIND[:ARGS] ... | --harness TASKS`: a table on stdout, JSON on request."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from flaxlm.model.cli import Command
from flaxlm.model.errors import ConfigError

DEFAULT_BATCH = 64


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="smollm2-135m-instruct, a .gguf file or an HF directory")
    p.add_argument("--task", action="append", default=[], metavar="KIND[:ARGS]",
                   help="perplexity:GLOB, mmlu:DIR, mc:FILE.jsonl, gen:FILE.jsonl, docstrings, "
                        "arithmetic "
                        "(repeatable; options as ,key=value)")
    p.add_argument("--harness", metavar="TASKS", help="lm-evaluation-harness tasks, comma-separated")
    p.add_argument("--include-path", metavar="DIR", help="more lm-evaluation-harness task YAMLs")
    p.add_argument("--limit", type=int, help="the first N examples of each task (MMLU: subject)")
    p.add_argument("--shots", type=int, help="few-shot examples (default 0; harness: the task's)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH,
                   help=f"rows per call, a power of two (default {DEFAULT_BATCH})")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    p.add_argument("--out", metavar="FILE", help="write settings, metrics and samples as JSON")
    p.add_argument("--log-samples", action="store_true", help="every example in the JSON")
    g = p.add_argument_group("generation")
    g.add_argument("--n", type=int, default=1, help="samples per prompt (self-consistency)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--extract", metavar="REGEX", help="the answer in a generation (group 1)")
    g.add_argument("--seed", type=int, default=0)
    m = p.add_argument_group("model")
    m.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    m.add_argument("--quantize", choices=("int8",))
    m.add_argument("--adapter", metavar="DIR",
                   help="a PEFT adapter directory (LoRA or prompt tuning) on the model")
    m.add_argument("--mesh", metavar="AXIS=SIZE,...")
    m.add_argument("--verbose", action="store_true", help="log each program compilation")


def _settings(args: argparse.Namespace):
    from flaxlm.eval.generation import extractor
    from flaxlm.eval.task import Settings

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    if args.shots is not None and args.shots < 0:
        raise ConfigError(f"--shots must be >= 0, got {args.shots}")
    if args.batch_size < 1 or args.batch_size & (args.batch_size - 1):
        raise ConfigError(f"--batch-size must be a power of two, got {args.batch_size}")
    if args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")
    if args.n > 1 and args.temperature <= 0:
        raise ConfigError(f"--n {args.n} draws samples: give --temperature > 0")
    if args.temperature < 0 or args.max_new_tokens < 1:
        raise ConfigError("--temperature must be >= 0 and --max-new-tokens >= 1")
    extractor(args.extract)
    return Settings(limit=args.limit, shots=args.shots or 0, chat=args.chat, n=args.n,
                    temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                    seed=args.seed, extract=args.extract, log_samples=args.log_samples)


def _check_out(path: str | None) -> None:
    """Fail now, not after the evaluation, when --out cannot be written."""
    if path is None:
        return
    out = Path(path)
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a directory")
    existed = out.exists()
    try:
        with open(out, "a", encoding="utf-8"):
            pass
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write ({e.strerror})") from None
    if not existed:
        out.unlink()


def _run(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")       # never a hub download (data or model)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from flaxlm.eval.tasks import evaluate, make_task, markdown_table

    if not args.task and not args.harness:
        raise ConfigError("nothing to evaluate: give --task KIND[:ARGS] and/or --harness TASKS")
    settings = _settings(args)
    _check_out(args.out)
    tasks = [make_task(spec, settings) for spec in args.task]  # data read before the model
    harness, manager = _harness_tasks(args)
    from flaxlm.infer.llm import LLM

    start = time.perf_counter()
    adapter = {"adapter": args.adapter} if args.adapter else {}
    llm = LLM.load(args.model, dtype=args.dtype, quantize=args.quantize, mesh=args.mesh,
                   max_batch=args.batch_size, verbose=args.verbose, **adapter)
    results = evaluate(llm, tasks)
    report = {"model": args.model, "adapter": args.adapter, "settings": {**settings.to_dict(),
                                                "batch_size": args.batch_size,
                                                "dtype": args.dtype, "quantize": args.quantize},
              "tasks": {r.name: r.to_dict() for r in results}}
    if results:
        print(markdown_table(results))
    if harness:
        report["harness"] = _run_harness(llm, harness, manager, args, settings)
    report["samples"] = {r.name: r.samples for r in results if r.samples is not None}
    report["num_compiled"] = llm.num_compiled
    report["seconds"] = round(time.perf_counter() - start, 3)
    if args.out:
        _write_json(Path(args.out), report)


def _harness_tasks(args):
    if not args.harness:
        if args.include_path:
            raise ConfigError("--include-path adds lm-evaluation-harness tasks: give --harness")
        return [], None
    from flaxlm.eval.harness import check_tasks, task_manager

    names = [t.strip() for t in args.harness.split(",") if t.strip()]
    manager = task_manager(args.include_path, names)
    check_tasks(manager, names)
    return names, manager


def _run_harness(llm, names, manager, args, settings):
    from lm_eval.utils import make_table

    from flaxlm.eval.harness import run_harness

    out = run_harness(llm, names, manager, limit=settings.limit, shots=args.shots,
                      chat=settings.chat, log_samples=settings.log_samples, seed=settings.seed)
    print(make_table(out))
    keep = ("results", "groups", "n-shot", "n-samples", "versions", "higher_is_better")
    report = {k: out[k] for k in keep if k in out}
    if settings.log_samples:
        report["samples"] = out.get("samples")
    return report


def _write_json(path: Path, report: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)
    print(f"wrote {path}", file=sys.stderr)


eval_command = Command("evaluate a model: perplexity, multiple choice, generation, "
                       "docstrings, lm-evaluation-harness tasks", _arguments, _run)
