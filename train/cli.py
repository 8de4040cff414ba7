"""`flaxlm train`, `flaxlm finetune`, `flaxlm tokenizer train`, `flaxlm plot`, `flaxlm export`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flaxlm.model.cli import Command

SIGNAL_EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


# ---------------------------------------------------------------- train

def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, metavar="FILE",
                   help="a recipe TOML file, e.g. configs/train/tiny.toml")
    p.add_argument("--out", metavar="RUN_DIR",
                   help="checkpoints, metrics.jsonl, TensorBoard events, loss.png "
                        "(default runs/RECIPE_NAME); re-running resumes from it")
    p.add_argument("--steps", type=int, metavar="N", help="train to step N (sets train.steps)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a recipe setting, e.g. optimizer.lr=3e-4 (repeatable)")
    p.add_argument("--init", metavar="MODEL",
                   help="fine-tune from a model (any name or path flaxlm.model.load accepts)")
    p.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() first (multi-host runs); the "
                        "coordinator and process ids come from the flags below, else "
                        "JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID, else JAX's "
                        "cluster detection (TPU pods, SLURM, Open MPI)")
    p.add_argument("--coordinator", metavar="HOST:PORT",
                   help="process 0's address (implies --distributed)")
    p.add_argument("--num-processes", type=int, metavar="N", help="implies --distributed")
    p.add_argument("--process-id", type=int, metavar="I", help="implies --distributed")
    p.add_argument("--dry-run", action="store_true",
                   help="print the parameter, optimizer and activation memory per device "
                        "that the recipe and its mesh (train.mesh) imply, and the seconds "
                        "the train step takes to lower and compile, then exit")
    p.add_argument("--devices", type=int, metavar="N",
                   help="with --dry-run: plan for N devices (default: the devices here; "
                        "activation memory is then estimated by a formula, not compiled)")


def _train(args: argparse.Namespace) -> int:
    from flaxlm.train.loop import train
    from flaxlm.train.recipe import Recipe

    if (args.distributed or args.coordinator or args.num_processes is not None
            or args.process_id is not None):
        from flaxlm.train.distributed import initialize

        initialize(args.coordinator, args.num_processes, args.process_id)
    overrides = tuple(args.overrides) + ((f"train.steps={args.steps}",) if args.steps else ())
    recipe = Recipe.load(args.config, overrides)
    if args.dry_run:
        return _dry_run(recipe, args.init, args.devices)
    run_dir = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    return _finish(train(recipe, run_dir, init=args.init), run_dir)


def _dry_run(recipe, init: str | None, devices: int | None) -> int:
    from flaxlm.train.dryrun import memory_plan

    config = None
    if init is not None:  # the fine-tuned model's shape
        from flaxlm.model.loading import load

        config = recipe.model_config(load(init)[0].config)
    print(memory_plan(recipe, config, num_devices=devices).report())
    return 0


train_command = Command("pretrain or fine-tune a causal LM from a recipe (resumes a run)",
                        _train_arguments, _train)


# ---------------------------------------------------------------- finetune

def _finetune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, metavar="FILE",
                   help="a recipe with a [finetune] table, e.g. "
                        "configs/finetune/smollm2-lora-docstrings.toml")
    p.add_argument("--out", metavar="RUN_DIR",
                   help="checkpoints (trainable state only), metrics.jsonl, TensorBoard "
                        "events, loss.png, report.json (default runs/RECIPE_NAME); re-running "
                        "resumes from it")
    p.add_argument("--steps", type=int, metavar="N", help="train to step N (sets train.steps)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a recipe setting, e.g. finetune.lora_rank=16 (repeatable)")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in RUN_DIR: remove its checkpoints, metrics and export")
    p.add_argument("--no-report", action="store_true",
                   help="skip the closing base-vs-tuned evaluation on held-out docstrings")


def _finetune(args: argparse.Namespace) -> int:
    from flaxlm.model.errors import ConfigError
    from flaxlm.train.finetune import finetune
    from flaxlm.train.recipe import Recipe

    overrides = tuple(args.overrides) + ((f"train.steps={args.steps}",) if args.steps else ())
    recipe = Recipe.load(args.config, overrides)
    if recipe.finetune is None:
        raise ConfigError(f"{args.config}: no [finetune] table (base, method, ...); "
                          "`flaxlm train` runs pretraining recipes")
    run_dir = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    result = finetune(recipe, run_dir, overwrite=args.overwrite)
    code = _finish(result, run_dir)
    if code == 0 and not args.no_report and not recipe.data.files \
            and recipe.finetune.report_examples and recipe.finetune.objective != "reward" \
            and recipe.finetune.base:
        _report(run_dir, recipe)   # a reward model generates nothing to score
    if code == 0 and recipe.finetune.objective == "reward":
        from flaxlm.train.finetune import export_finetuned

        print(f"reward model: {export_finetuned(run_dir, run_dir / 'export', overwrite=True)} "
              "(transformers.AutoModelForSequenceClassification loads it)")
    return code


def _finish(result, run_dir: Path) -> int:
    summary = f"step {result.step}"
    if result.loss is not None:
        summary += f", loss {result.loss:.4f}"
    if result.eval_loss is not None:
        summary += f", held-out loss {result.eval_loss:.4f}"
    if result.stopped_by is not None:
        print(f"{result.stopped_by}: stopped at {summary}; checkpoint saved in "
              f"{run_dir / 'checkpoints'}; run the same command to resume", file=sys.stderr)
        return SIGNAL_EXIT_CODES[result.stopped_by]
    print(f"done: {summary}; run directory {run_dir}")
    return 0


def _report(run_dir: Path, recipe) -> None:
    """Held-out docstrings (loss, ROUGE-L) for the base and the tuned model, with `flaxlm
    eval` (through the command registry: flaxlm.train does not import the evaluation code);
    the tuned model is the run's export in RUN_DIR/export."""
    from flaxlm.model.cli import main
    from flaxlm.model.errors import FlaxlmError
    from flaxlm.train.finetune import export_finetuned

    ft = recipe.finetune
    export = export_finetuned(run_dir, run_dir / "export", overwrite=True)
    common = ["--task", "docstrings", "--chat", "--limit", str(ft.report_examples),
              "--max-new-tokens", str(ft.report_max_new_tokens),
              *(["--quantize", "int8"] if ft.quantize else [])]
    tuned = [str(export)] if ft.method == "full" else [ft.base, "--adapter", str(export)]
    results = {}
    for name, model in (("base", [ft.base]), ("tuned", tuned)):
        out = run_dir / f"report-{name}.json"
        if main(["eval", *model, *common, "--out", str(out)]) != 0:
            raise FlaxlmError(f"the {name} model's evaluation failed (see above)")
        metrics = json.loads(out.read_text())["tasks"]["docstrings"]["metrics"]
        results[name] = {k: metrics[k]["value"] for k in ("loss", "rougeL")}
        out.unlink()
    (run_dir / "report.json").write_text(json.dumps(
        {"task": "docstrings (held-out test split, chat)", "examples": ft.report_examples,
         **results}, indent=2) + "\n")
    print(f"held-out docstrings ({ft.report_examples} examples): "
          f"loss {results['base']['loss']:.4f} -> {results['tuned']['loss']:.4f}, "
          f"ROUGE-L {results['base']['rougeL']:.4f} -> {results['tuned']['rougeL']:.4f} "
          f"(base -> tuned; {run_dir / 'report.json'})")


finetune_command = Command("fine-tune a model on chats (SFT): full, LoRA or prompt tuning, "
                           "from a recipe with a [finetune] table (resumes a run)",
                           _finetune_arguments, _finetune)


# ---------------------------------------------------------------- tokenizer train

def _tokenizer_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = sub.add_parser("train", help="train a byte-level BPE tokenizer on local files")
    t.add_argument("--data", required=True, action="append", metavar="GLOB",
                   help="text, JSONL or Parquet files (repeatable; ** recurses)")
    t.add_argument("--vocab-size", required=True, type=int, metavar="N")
    t.add_argument("--out", required=True, metavar="DIR")
    t.add_argument("--format", default="auto", choices=("auto", "text", "jsonl", "parquet"))
    t.add_argument("--text-field", default="text", help="JSONL/Parquet text field (default text)")
    t.add_argument("--max-bytes", type=int, default=1 << 30,
                   help="stop reading after about this much text (default 1 GiB)")


def _tokenizer(args: argparse.Namespace) -> None:
    from flaxlm.train.data import first_documents
    from flaxlm.model.sources import DocumentSource, find_files
    from flaxlm.train.tokenizer_train import train_tokenizer

    source = DocumentSource(find_files(tuple(args.data)), args.format, args.text_field)
    tokenizer = train_tokenizer(first_documents(source, range(len(source)), args.max_bytes),
                                args.vocab_size)
    out = tokenizer.save(args.out)
    print(f"wrote {out}: {tokenizer.vocab_size} tokens from {len(source)} documents")


tokenizer_command = Command("train a tokenizer: flaxlm tokenizer train --data GLOB "
                            "--vocab-size N --out DIR", _tokenizer_arguments, _tokenizer)


# ---------------------------------------------------------------- plot

def _plot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", metavar="PNG", help="default RUN_DIR/loss.png")


def _plot(args: argparse.Namespace) -> None:
    from flaxlm.train.plot import plot_run

    print(f"wrote {plot_run(args.run_dir, args.out)}")


plot_command = Command("plot a training run's loss curve to a PNG", _plot_arguments, _plot)


# ---------------------------------------------------------------- export

def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("out", metavar="DIR",
                   help="the directory to write: a Hugging Face model, or for a LoRA or "
                        "prompt-tuning run a PEFT adapter directory")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--merge", action="store_true",
                   help="LoRA: fold the adapters into the weights and write a whole model")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DIR")


def _export(args: argparse.Namespace) -> None:
    from flaxlm.model.errors import ConfigError
    from flaxlm.train.checkpoint import export_hf, read_run_file
    from flaxlm.train.finetune import check_out_dir, export_finetuned

    recipe, _, _ = read_run_file(Path(args.run_dir))
    if recipe.finetune is not None:
        out = export_finetuned(args.run_dir, args.out, args.merge, args.step, args.overwrite)
    elif args.merge:
        raise ConfigError(f"{args.run_dir}: --merge is for LoRA runs; this run trained "
                          "every weight")
    else:
        check_out_dir(Path(args.out), args.overwrite)
        out = export_hf(args.run_dir, args.out, args.step)
    print(f"wrote {out}")


export_command = Command("export a training checkpoint: a Hugging Face directory, or a "
                         "fine-tuning run's PEFT adapter (--merge: the merged model)",
                         _export_arguments, _export)
