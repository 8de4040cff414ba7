"""`flaxlm generate` and `flaxlm chat`: one flag per sampling setting."""

from __future__ import annotations

import argparse
import os
import sys

from flaxlm.model.cli import Command
from flaxlm.model.errors import ConfigError

DEFAULT_MODEL = "smollm2-135m-instruct"


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a name, .gguf file or HF directory (default {DEFAULT_MODEL})")
    p.add_argument("--adapter", metavar="DIR",
                   help="a PEFT adapter directory (LoRA or prompt tuning) on top of the model")
    p.add_argument("--merge", action="store_true",
                   help="fold the LoRA adapter into the weights (default: serve it unmerged)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--verbose", action="store_true", help="log each program compilation")
    p.add_argument("--mesh", metavar="AXIS=SIZE,...",
                   help="shard over devices, e.g. data=2,tensor=4 (axes data, fsdp, tensor)")
    s = p.add_argument_group("sampling")
    s.add_argument("--max-new-tokens", type=int)
    s.add_argument("--min-new-tokens", type=int)
    s.add_argument("--temperature", type=float, help="0 = greedy")
    s.add_argument("--top-k", type=int)
    s.add_argument("--top-p", type=float)
    s.add_argument("--min-p", type=float)
    s.add_argument("--repetition-penalty", type=float)
    s.add_argument("--presence-penalty", type=float)
    s.add_argument("--frequency-penalty", type=float)
    s.add_argument("--logit-bias", action="append", metavar="ID=BIAS", default=[])
    s.add_argument("--stop", action="append", metavar="TEXT", default=[])
    s.add_argument("--stop-token-ids", type=int, nargs="+", default=[])
    s.add_argument("--ignore-eos", action="store_true")
    s.add_argument("--seed", type=int)
    s.add_argument("--n", type=int)
    s.add_argument("--logprobs", type=int)
    b = p.add_argument_group("beam search")
    b.add_argument("--num-beams", type=int, help="> 1: beam search (HF semantics)")
    b.add_argument("--length-penalty", type=float,
                   help="score = sum of logprobs / generated length ** this (default 1)")
    b.add_argument("--early-stopping", choices=("true", "false", "never"))
    b.add_argument("--num-return-sequences", type=int, help="best hypotheses printed")


_SAMPLING = ("max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p", "min_p",
             "repetition_penalty", "presence_penalty", "frequency_penalty", "seed", "n",
             "logprobs")
_BEAM = ("max_new_tokens", "min_new_tokens", "num_beams", "length_penalty",
         "num_return_sequences")


def sampling_params(args: argparse.Namespace, **defaults):
    """SamplingParams from the flags, or BeamParams when --num-beams is given."""
    from flaxlm.infer.beam import BeamParams
    from flaxlm.infer.sampling import SamplingParams

    beams = args.num_beams is not None
    fields = _BEAM if beams else _SAMPLING
    given = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    kwargs = {**{k: v for k, v in defaults.items() if k in fields}, **given}
    if args.stop_token_ids:
        kwargs["stop_token_ids"] = tuple(args.stop_token_ids)
    kwargs["ignore_eos"] = args.ignore_eos
    if beams:
        _refuse(args, "--num-beams", [f for f in _SAMPLING if f not in _BEAM] + ["logit_bias",
                                                                                 "stop"])
        if args.early_stopping is not None:
            kwargs["early_stopping"] = {"true": True, "false": False}.get(args.early_stopping,
                                                                           "never")
        return BeamParams(**kwargs)
    _refuse(args, "beam search (--num-beams)", ["length_penalty", "num_return_sequences",
                                                "early_stopping"])
    if args.logit_bias:
        kwargs["logit_bias"] = dict(_parse_bias(item) for item in args.logit_bias)
    if args.stop:
        kwargs["stop"] = tuple(args.stop)
    return SamplingParams(**kwargs)


def _refuse(args: argparse.Namespace, needs: str, names: list[str]) -> None:
    for name in names:
        if getattr(args, name) not in (None, []):
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} does not go with {needs}" if needs.startswith("--")
                              else f"{flag} applies to {needs} only")


def _parse_bias(item: str) -> tuple[int, float]:
    token, sep, bias = item.partition("=")
    try:
        return int(token), float(bias)
    except ValueError:
        raise ConfigError(f"--logit-bias wants ID=BIAS, got {item!r}") from None


def _load(args):
    from flaxlm.infer.llm import LLM

    return LLM.load(args.model, dtype=args.dtype, verbose=args.verbose, mesh=args.mesh,
                    adapter=getattr(args, "adapter", None), merge=getattr(args, "merge", False))


# ---------------------------------------------------------------- generate

def _generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", help="the prompt (default: read from stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--stream", action="store_true", help="print tokens as they come")
    _add_common(p)


def _generate(args: argparse.Namespace) -> None:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise ConfigError("the prompt is empty")
    params = sampling_params(args)  # checked before the model is loaded
    llm = _load(args)
    if args.chat:
        prompt = llm.chat_prompt_ids([{"role": "user", "content": prompt}])
    if args.stream:
        _stream_answer(llm, prompt, params)
        return
    result = llm.generate([prompt], params)[0]
    for i, out in enumerate(result.outputs):
        if out.score is not None:
            print(f"--- beam {i + 1} ({out.finish_reason}, score {out.score:.4f})")
        elif len(result.outputs) > 1:
            print(f"--- sample {i + 1} ({out.finish_reason})")
        print(out.text)


def _stream_answer(llm, prompt, params) -> str:
    return _print_stream(llm.stream(prompt, params))


def _print_stream(stream) -> str:
    pieces = []
    for piece in stream:
        pieces.append(piece)
        print(piece, end="", flush=True)
    rate = (f", {stream.decode_tokens_per_s:.1f} tokens/s"
            if stream.decode_tokens_per_s is not None else "")
    first = f", first after {stream.ttft_s:.2f} s" if stream.ttft_s is not None else ""
    print(f"\n[{stream.num_tokens} tokens{first}{rate}]", file=sys.stderr, flush=True)
    return "".join(pieces)


generate_command = Command("generate text from a prompt", _generate_arguments, _generate)


# ---------------------------------------------------------------- chat

def _chat_arguments(p: argparse.ArgumentParser) -> None:
    from flaxlm.infer.defaults import DEFAULTS_HELP

    p.description = f"Chat with a model, streaming its answers. {DEFAULTS_HELP}."
    p.add_argument("--system", help="a system message")
    p.add_argument("--prompt", help="answer this one message and exit (no interactive loop)")
    _add_common(p)


def _chat(args: argparse.Namespace) -> None:
    from flaxlm.infer.defaults import sampling_defaults

    defaults, _ = sampling_defaults(args.model)  # generation_config.json, else llama.cpp's
    params = sampling_params(args, max_new_tokens=256, **defaults)
    llm = _load(args)
    conversation = llm.conversation(params, system=args.system)
    questions = [args.prompt] if args.prompt is not None else _read_turns()
    for question in questions:
        _print_stream(conversation.send(question))


def _read_turns():
    print("flaxlm chat: type a message, an empty line or Ctrl-D ends.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            return
        if not line.strip():
            return
        yield line


chat_command = Command("chat with a model, streaming its answers", _chat_arguments, _chat)


# ---------------------------------------------------------------- attention

def _attention_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="smollm2-135m-instruct, a .gguf file or an HF directory")
    p.add_argument("text", help="the text whose attention is drawn")
    p.add_argument("--layer", type=int, required=True,
                   help="layer index from 0 (negative: from the last)")
    p.add_argument("--head", type=int, help="one head (default: the mean over heads)")
    p.add_argument("--out", default="attention.png", help="PNG path (default: attention.png)")
    p.add_argument("--chat", action="store_true", help="wrap the text in the chat template")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--verbose", action="store_true", help="log each program compilation")
    p.add_argument("--mesh", metavar="AXIS=SIZE,...",
                   help="shard over a device mesh, e.g. tensor=2")


def _attention(args: argparse.Namespace) -> None:
    from pathlib import Path

    from flaxlm.infer.attention_plot import pick, plot_attention

    if not args.text.strip():
        raise ConfigError("the text is empty")
    if args.head is not None and args.head < 0:
        raise ConfigError(f"--head {args.head}: a head index is >= 0")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out {out}: the heat map is written as PNG, name it *.png")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ConfigError(f"--out {out}: {parent} is not a writable directory")
    llm = _load(args)
    text = (llm.chat_prompt_ids([{"role": "user", "content": args.text}]) if args.chat
            else args.text)
    result = llm.trace([text])[0]
    pick(result, args.layer, args.head)  # a bad index is named before drawing
    plot_attention(result, args.layer, args.head, out)
    print(f"wrote {out}: {len(result.tokens)} tokens")


attention_command = Command("draw one layer's attention over a text as a heat map (PNG)",
                            _attention_arguments, _attention)
