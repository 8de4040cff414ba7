"""`flaxlm serve`: the OpenAI-compatible HTTP server (uvicorn)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys

from flaxlm.infer.defaults import DEFAULTS_HELP
from flaxlm.model.cli import Command
from flaxlm.model.errors import ConfigError

DEFAULT_MODEL = "smollm2-135m-instruct"


def _arguments(p: argparse.ArgumentParser) -> None:
    p.description = f"Serve a model over the OpenAI API (continuous batching). {DEFAULTS_HELP}."
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"a name, .gguf file or HF directory (default {DEFAULT_MODEL})")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="the model's name in the API (default: MODEL)")
    p.add_argument("--max-slots", type=int, default=16, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait for a slot; more get 429")
    p.add_argument("--context", type=int,
                   help="cache slots per request: prompt + max_tokens (a multiple of 256; "
                        "default: the model's context, at most 2048)")
    p.add_argument("--steps-per-round", type=int, default=8,
                   help="decode steps per host round trip while nobody waits")
    p.add_argument("--prefill-tokens", type=int, default=512,
                   help="prompt tokens prefilled between two decode calls")
    p.add_argument("--request-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="a request running longer is stopped (408)")
    p.add_argument("--quantize", choices=("int8",), help="int8 weights")
    p.add_argument("--adapter", metavar="DIR",
                   help="a PEFT LoRA adapter directory on top of the model")
    p.add_argument("--merge", action="store_true",
                   help="fold the LoRA adapter into the weights (default: serve it unmerged)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--mesh", metavar="AXIS=SIZE,...",
                   help="shard over devices, e.g. data=2,tensor=4 (axes data, fsdp, tensor)")
    p.add_argument("--api-key", help="requests must send Authorization: Bearer KEY")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="compile the programs on first use instead of at start-up")
    p.add_argument("--verbose", action="store_true", help="log each program compilation")


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from flaxlm.infer.defaults import sampling_defaults
    from flaxlm.infer.llm import LLM
    from flaxlm.infer.serve.app import create_app
    from flaxlm.infer.serve.scheduler import Scheduler

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be in [1, 65535], got {args.port}")
    if args.request_timeout <= 0:
        raise ConfigError(f"--request-timeout must be > 0, got {args.request_timeout}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(name)s: %(message)s")
    defaults, source = sampling_defaults(args.model)
    llm = LLM.load(args.model, dtype=args.dtype, quantize=args.quantize, mesh=args.mesh,
                   verbose=args.verbose, adapter=args.adapter, merge=args.merge)
    scheduler = Scheduler(llm, max_slots=args.max_slots, max_queue=args.max_queue,
                          context=args.context, steps_per_round=args.steps_per_round,
                          prefill_tokens=args.prefill_tokens)
    if args.warmup:
        scheduler.warmup()
    print(f"flaxlm serve: {scheduler.num_compiled} programs compiled; sampling defaults "
          f"{defaults} ({source}); {args.max_slots} slots of {scheduler.context} tokens",
          file=sys.stderr, flush=True)
    scheduler.start()
    name = args.served_model_name or str(args.model)
    app = create_app(llm, scheduler, model_name=name, defaults=defaults, api_key=args.api_key,
                     request_timeout_s=args.request_timeout)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=30)
    _Server(config).run()
    return 0


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, but SIGTERM/SIGINT end with status 0 after the graceful
        shutdown (uvicorn re-raises the signal, so the process would die of it)."""

        @contextlib.contextmanager
        def capture_signals(self):
            handlers = {s: signal.signal(s, self.handle_exit)
                        for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in handlers.items():
                    signal.signal(s, handler)

    return Server


def _Server(config):  # noqa: N802 - builds the class on first use (uvicorn imported lazily)
    return _server_class()(config)


serve_command = Command("serve a model over an OpenAI-compatible HTTP API", _arguments, _serve)
