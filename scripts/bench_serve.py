"""Serving throughput and time to first token: `flaxlm serve` vs static batching vs llama-server.

At each concurrency (default 1, 8 and 32 streams), a server with as many slots
(`--max-slots` N; llama-server `--parallel` N) is started, and N clients each send
--per-stream chat requests one after another, streaming (SSE) with greedy
decoding and `ignore_eos` so every reply is --max-tokens long. Prompts are chat
messages of mixed lengths (4 to 200 words) built from a seeded RNG. Reported:
output tokens/s (all completion tokens / wall time of the level) and time to
first token p50/p99 (from sending a request to its first content chunk).

  (a) static batching: the same prompts through `LLM.chat` in batches of the
      concurrency, timed on a second pass (the first compiles its programs);
      no streaming: a request's ttft is `GenerationResult.ttft_s`, its batch's
      prefill and first token;
  (b) llama.cpp's `llama-server` with `--parallel N` slots on the F32 and Q8_0
      GGUFs given, the same client load against its /v1/chat/completions;
      skipped with a message when --llama-server is not given.

    .venv/bin/python scripts/bench_serve.py [--streams 1,8,32] [--max-tokens 128]
        [--llama-server PATH --gguf-f32 F32.gguf --gguf-q8 Q8_0.gguf]

Outside `make test`. Report the CPU model (printed) with the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import threading
import time

import numpy as np
from benchlib import cpu_model

WORDS = ("the quick brown fox jumps over a lazy dog while rivers run to the sea and "
         "people write programs that explain why the sky is blue at noon").split()


def log(message):
    print(f"[bench_serve] {message}", flush=True)


def prompts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    lengths = rng.choice([4, 16, 50, 120, 200], n)
    return [" ".join(rng.choice(WORDS, k)) + "?" for k in lengths]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _one(client, url, model, prompt, max_tokens, extra):
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
            "max_tokens": max_tokens, "temperature": 0, "stream_options": {"include_usage": True},
            **extra}
    start, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if first is None and choice.get("delta", {}).get("content"):
                    first = time.perf_counter()
    return (first or time.perf_counter()) - start, tokens


async def _load(url, model, texts, streams, max_tokens, extra):
    import httpx

    async with httpx.AsyncClient(timeout=3600) as client:
        queues = [texts[i::streams] for i in range(streams)]

        async def stream(queue):
            return [await _one(client, url, model, p, max_tokens, extra) for p in queue]

        start = time.perf_counter()
        results = await asyncio.gather(*[stream(q) for q in queues])
        wall = time.perf_counter() - start
    flat = [r for rs in results for r in rs]
    return _summary([t for t, _ in flat], sum(n for _, n in flat), wall)


def _summary(ttfts, tokens, wall):
    return {"tokens_per_s": tokens / wall, "ttft_p50_s": float(np.percentile(ttfts, 50)),
            "ttft_p99_s": float(np.percentile(ttfts, 99)), "tokens": tokens, "wall_s": wall}


def start_flaxlm(args, slots):
    import uvicorn

    from flaxlm.infer.defaults import sampling_defaults
    from flaxlm.infer.llm import LLM
    from flaxlm.infer.serve.app import create_app
    from flaxlm.infer.serve.scheduler import Scheduler

    llm = LLM.load(args.model)
    scheduler = Scheduler(llm, max_slots=slots, max_queue=4096, context=args.context)
    t = time.perf_counter()
    scheduler.warmup()
    log(f"flaxlm warm-up: {scheduler.num_compiled} programs, {time.perf_counter() - t:.1f} s")
    scheduler.start()
    app = create_app(llm, scheduler, model_name=args.model,
                     defaults=sampling_defaults(args.model)[0])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return llm, scheduler, server, f"http://127.0.0.1:{port}"


def static_batching(llm, texts, streams, max_tokens):
    from flaxlm.infer.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_new_tokens=max_tokens, ignore_eos=True)
    conversations = [[{"role": "user", "content": p}] for p in texts]
    ttfts, tokens, start = [], 0, time.perf_counter()
    for i in range(0, len(conversations), streams):
        results = llm.chat(conversations[i:i + streams], params)
        ttfts += [r.ttft_s for r in results]
        tokens += sum(len(r.token_ids) for r in results)
    return _summary(ttfts, tokens, time.perf_counter() - start)


def llama_server(args, gguf, streams, texts):
    port = free_port()
    command = [args.llama_server, "-m", gguf, "--port", str(port), "--parallel", str(streams),
               "-c", str(args.context * streams), "--threads", str(os.cpu_count())]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        return asyncio.run(_load(url, "model", texts, streams, args.max_tokens,
                                 {"ignore_eos": True}))
    finally:
        process.terminate()
        process.wait(60)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--streams", default="1,8,32")
    p.add_argument("--per-stream", type=int, default=2, help="requests each stream sends")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--context", type=int, default=512,
                   help="flaxlm serve --context (prompt + reply); llama-server gets as much "
                        "per slot")
    p.add_argument("--skip-static", action="store_true")
    p.add_argument("--llama-server", help="path of llama.cpp's llama-server binary")
    p.add_argument("--gguf-f32", help="F32 GGUF of the model (for llama-server)")
    p.add_argument("--gguf-q8", help="Q8_0 GGUF of the model (for llama-server)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    levels = [int(s) for s in args.streams.split(",")]
    log(f"CPU: {cpu_model()}, {os.cpu_count()} cores; model {args.model}")
    rows = []
    for streams in levels:
        texts = prompts(streams * args.per_stream, seed=streams)
        llm, scheduler, server, url = start_flaxlm(args, streams)  # --max-slots = the streams
        rows.append(("flaxlm serve", streams, asyncio.run(
            _load(url, args.model, texts, streams, args.max_tokens, {"ignore_eos": True}))))
        server.should_exit = True
        scheduler.stop()  # its thread holds this level's model and cache
        time.sleep(1)
        if not args.skip_static:
            static_batching(llm, texts, streams, args.max_tokens)  # compiles its programs
            rows.append(("static LLM.chat", streams,
                         static_batching(llm, texts, streams, args.max_tokens)))
        del llm, scheduler, server
        if args.llama_server is None:
            log("llama-server: skipped (no --llama-server PATH given)")
        else:
            for name, gguf in (("llama-server F32", args.gguf_f32),
                               ("llama-server Q8_0", args.gguf_q8)):
                if gguf is None:
                    log(f"{name}: skipped (no GGUF given)")
                    continue
                rows.append((name, streams, llama_server(args, gguf, streams, texts)))
        for name, level, r in rows:
            if level == streams:
                log(f"{name} x{level}: {r['tokens_per_s']:.1f} tokens/s, ttft p50 "
                    f"{r['ttft_p50_s']:.2f} s, p99 {r['ttft_p99_s']:.2f} s")
    print("| server | streams | output tokens/s | TTFT p50 (s) | TTFT p99 (s) |")
    print("|---|---|---|---|---|")
    for name, streams, r in rows:
        print(f"| {name} | {streams} | {r['tokens_per_s']:.1f} | {r['ttft_p50_s']:.3f} "
              f"| {r['ttft_p99_s']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_model(), "rows": [{"server": n, "streams": s, **r}
                                                    for n, s, r in rows]}, f, indent=2)


if __name__ == "__main__":
    main()
