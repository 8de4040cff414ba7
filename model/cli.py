"""The `flaxlm` command: a dispatcher plus the model subcommands.

Subcommands are registered as entry points in the group `flaxlm.commands`
(pyproject.toml), so flaxlm.infer and flaxlm.train add theirs without this
module importing them. Each entry point is a `Command`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from importlib.metadata import entry_points
from typing import Callable

from flaxlm.model.errors import FlaxlmError


@dataclasses.dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


class _Parser(argparse.ArgumentParser):
    """A usage error is one line on stderr and exit status 2, like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="flaxlm", description="JAX/Flax language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for ep in sorted(entry_points(group="flaxlm.commands"), key=lambda e: e.name):
        command: Command = ep.load()
        p = sub.add_parser(ep.name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except FlaxlmError as e:
        print(f"flaxlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flaxlm {args.command}: interrupted", file=sys.stderr)
        return 130


# ---------------------------------------------------------------- inspect

def _inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="smollm2-135m-instruct, a .gguf file or an HF directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _inspect(args: argparse.Namespace) -> None:
    from flaxlm.model.loading import load, resolve
    from flaxlm.model.params import param_stats

    model, tokenizer = load(args.model)
    count, by_dtype = param_stats(model)
    info = {
        "source": str(resolve(args.model)),
        "config": model.config.to_dict(),
        "parameters": count,
        "parameter_bytes": by_dtype,
        "tokenizer": None if tokenizer is None else {
            "vocab_size": tokenizer.vocab_size,
            "special_tokens": {k: {"token": t, "id": i}
                               for k, (t, i) in tokenizer.special_tokens.items()},
            "eos_token_ids": list(tokenizer.eos_token_ids),
            "add_bos_token": tokenizer.add_bos_token,
            "chat_template": tokenizer.chat_template is not None,
        },
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"model:       {info['source']}")
    print(f"parameters:  {count:,} ({_format_bytes(by_dtype)})")
    print("config:")
    for key, value in info["config"].items():
        print(f"  {key:<16} {value}")
    tok = info["tokenizer"]
    if tok is None:
        print("tokenizer:   none (no tokenizer.json)")
        return
    print(f"tokenizer:   vocabulary {tok['vocab_size']:,}, "
          f"chat template {'present' if tok['chat_template'] else 'absent'}, "
          f"adds BOS: {tok['add_bos_token']}, eos ids {tok['eos_token_ids']}")
    for name, special in tok["special_tokens"].items():
        print(f"  {name:<16} {special['token']!r} (id {special['id']})")


def _format_bytes(by_dtype: dict[str, int]) -> str:
    return ", ".join(f"{dtype}: {n / 2**20:.1f} MiB" for dtype, n in sorted(by_dtype.items()))


inspect_command = Command("show a model's config, parameter count and tokenizer",
                          _inspect_arguments, _inspect)


# ---------------------------------------------------------------- next-token

def _next_token_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="smollm2-135m-instruct, a .gguf file or an HF directory")
    p.add_argument("text", help="the prompt")
    p.add_argument("--chat", action="store_true",
                   help="wrap TEXT as a user message in the model's chat template")
    p.add_argument("--top", type=_positive_int, default=10, metavar="K",
                   help="how many tokens to show (default 10)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _next_token(args: argparse.Namespace) -> None:
    from flaxlm.model.errors import ConfigError
    from flaxlm.model.loading import load
    from flaxlm.model.scoring import next_token_distribution

    if not args.text:
        raise ConfigError("TEXT is empty")
    model, tokenizer = load(args.model, dtype=args.dtype)
    if tokenizer is None:
        raise ConfigError(f"{args.model} has no tokenizer.json, so TEXT cannot be encoded")
    prompt = (tokenizer.apply_chat_template([{"role": "user", "content": args.text}])
              if args.chat else args.text)
    ids = tokenizer.encode(prompt)
    top = next_token_distribution(model, ids, k=args.top)
    print(f"prompt: {len(ids)} tokens; top {args.top} next tokens:")
    for rank, (token_id, prob) in enumerate(top, 1):
        print(f"{rank:>3}. {prob:8.4f}  {token_id:>6}  {tokenizer.decode([token_id])!r}")


next_token_command = Command("print the most likely next tokens after a prompt",
                             _next_token_arguments, _next_token)


# ---------------------------------------------------------------- convert

def _convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="smollm2-135m-instruct, a .gguf file or an HF directory")
    p.add_argument("dst", help="output directory (Hugging Face format, safetensors)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="dtype of the written weights")


def _convert(args: argparse.Namespace) -> None:
    from flaxlm.model.loading import load, save_hf

    model, tokenizer = load(args.src, dtype=args.dtype)
    out = save_hf(model, tokenizer, args.dst)
    print(f"wrote {out}")


convert_command = Command("convert a model to a Hugging Face directory",
                          _convert_arguments, _convert)


# ---------------------------------------------------------------- quantize

def _quantize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="smollm2-135m-instruct, a .gguf file or an HF directory")
    p.add_argument("dst", help="output directory (flaxlm int8 safetensors, config, tokenizer)")
    p.add_argument("--keep-embeddings", action="store_true",
                   help="leave the token embedding and LM head in float32")


def _quantize(args: argparse.Namespace) -> None:
    from flaxlm.model.loading import load, save_hf
    from flaxlm.model.params import param_stats
    from flaxlm.model.quant import quantize

    if args.keep_embeddings:
        model, tokenizer = load(args.src)
        model = quantize(model, embeddings=False)
    else:
        model, tokenizer = load(args.src, quantize="int8")
    out = save_hf(model, tokenizer, args.dst)
    _, by_dtype = param_stats(model)
    print(f"wrote {out} ({_format_bytes(by_dtype)})")


quantize_command = Command("write an int8 copy of a model that `load` reads back as int8",
                           _quantize_arguments, _quantize)
