"""Generation benchmark: flaxlm vs HF transformers on SmolLM2-135M-Instruct, one run.

Prints progress lines and one final JSON line. Both sides use the same float32
weights (the embedded GGUF, dequantized), greedy decoding, the same prompts and
the same number of new tokens (EOS ignored on both sides: flaxlm ignore_eos,
HF eos_token_id=None with an explicit attention mask).

    .venv/bin/python scripts/bench_generate.py [--new-tokens 128] [--skip-hf]
    .venv/bin/python scripts/bench_generate.py --compare aa0cd43 [--llamacpp]
    .venv/bin/python scripts/bench_generate.py --only f32 [--llamacpp]

With `--compare REF`, flaxlm is measured in fresh worker processes, alternating
between this tree and commit REF (extracted with `git archive` into a temporary
directory), so before and after share the run's machine and load; the current
tree's first worker starts with an empty compilation cache and its second
with the cache the first wrote (cold start without and with the cache). HF
runs in this process; `--llamacpp` adds llama-cpp-python on F32 and Q8_0
GGUFs made from the shipped Q4_1 (skipped with a message when `llama_cpp` is
not importable). In one process, `--only int8` alternates float32 and int8 weights, and
`--only f32` float32 decode with and without flaxlm's float32 CPU kernel (batch 1, 4).
"""

import time

T_PROCESS = time.perf_counter()  # before jax is imported: the cold start clock

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
from benchlib import cpu_model  # noqa: E402


def log(message):
    print(f"[bench] {message}", flush=True)


def cold_start(prompt):
    from flaxlm.infer import LLM, SamplingParams

    llm = LLM.load("smollm2-135m-instruct")
    stream = llm.stream(prompt, SamplingParams(temperature=0, max_new_tokens=8))
    next(iter(stream))
    cold = time.perf_counter() - T_PROCESS
    list(stream)
    return llm, cold


def prompt_ids(tokenizer, n, seed=0):
    """A real-text prompt of exactly n tokens."""
    text = open(os.__file__, encoding="utf-8").read()  # stdlib source: on every machine
    ids = tokenizer.encode(text)
    start = np.random.default_rng(seed).integers(0, len(ids) - n)
    return ids[start:start + n]


def flaxlm_decode(llm, prompt, new, batch=1, repeats=2):
    """(ttft_s, decode tok/s per sequence, total tok/s) after a warm-up call."""
    from flaxlm.infer import SamplingParams

    params = SamplingParams(temperature=0, max_new_tokens=new, ignore_eos=True)
    prompts = [prompt] * batch
    llm.generate(prompts, params)  # compile
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = llm.generate(prompts, params)[0]
        total = time.perf_counter() - t0
        assert len(result.token_ids) == new
        if best is None or total < best[0]:
            best = (total, result.ttft_s, (new - 1) / (total - result.ttft_s))
    total, ttft, decode = best
    return ttft, decode, batch * new / total


def hf_model():
    import torch
    import transformers

    from flaxlm.model.embedded import smollm2_gguf_path

    torch.set_num_threads(os.cpu_count())
    path = smollm2_gguf_path()
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def hf_generate(model, prompt, new, batch=1):
    import torch

    ids = torch.tensor([prompt] * batch)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                             do_sample=False, eos_token_id=None, pad_token_id=2,
                             top_k=None, top_p=None, temperature=None)
    assert out.shape[1] == len(prompt) + new
    return time.perf_counter() - t0


def hf_decode(model, prompt, new, batch=1):
    hf_generate(model, prompt, 2, batch)  # warm-up
    ttft = min(hf_generate(model, prompt, 1, batch) for _ in range(2))
    total = hf_generate(model, prompt, new, batch)
    return ttft, (new - 1) / (total - ttft), batch * new / total


def beam_search_bench(llm, hf, prompt, new=64, beams=4, rounds=3):
    """flaxlm vs HF beam search on one prompt, eos ignored so both run `new` steps.

    Rounds alternate the two sides (one call each) and the round with the median ratio
    is reported, so load from other processes hits both alike. HF runs with whichever of
    1 thread or all cores was faster on a short warm-up. `_cpu_s`: CPU seconds of the
    process during the call, which varies less than wall time on a shared machine.
    """
    import torch

    from flaxlm.infer import SamplingParams

    try:
        from flaxlm.infer import BeamParams
    except ImportError:  # before BeamParams (a --compare baseline)
        BeamParams = SamplingParams  # noqa: N806
    params = BeamParams(num_beams=beams, max_new_tokens=new, ignore_eos=True)
    ours = llm.generate([prompt], params)[0].token_ids  # compiles
    if hf is None:
        return {f"beam{beams}_flaxlm_s": _timed(lambda: llm.generate([prompt], params))[0]}
    ids = torch.tensor([prompt])
    kwargs = dict(attention_mask=torch.ones_like(ids), num_beams=beams, do_sample=False,
                  eos_token_id=None, pad_token_id=2, top_k=None, top_p=None, temperature=None)

    def hf_run(tokens):
        with torch.no_grad():
            return hf.generate(ids, max_new_tokens=tokens, **kwargs)

    def hf_seconds(threads):  # a short run after a warm-up
        torch.set_num_threads(threads)
        hf_run(2)
        return _timed(lambda: hf_run(8))[0]

    threads = min(sorted({1, os.cpu_count()}), key=hf_seconds)
    torch.set_num_threads(threads)
    if hf_run(new)[0, len(prompt):].tolist() != ours:
        log("note: HF's best hypothesis differs from flaxlm's")
    results = []
    for _ in range(rounds):
        flax = _timed(lambda: llm.generate([prompt], params))
        ref = _timed(lambda: hf_run(new))
        results.append((ref[0] / flax[0], flax, ref))
        log(f"beam search ({beams} beams, {new} tokens): flaxlm {flax[0]:.2f} s, HF "
            f"({threads} threads) {ref[0]:.2f} s, ratio {results[-1][0]:.2f}")
    torch.set_num_threads(os.cpu_count())
    ratio, flax, ref = sorted(results)[len(results) // 2]
    return {f"beam{beams}_flaxlm_s": flax[0], f"beam{beams}_hf_s": ref[0],
            f"beam{beams}_ratio": ratio, f"beam{beams}_flaxlm_cpu_s": flax[1],
            f"beam{beams}_hf_cpu_s": ref[1], f"beam{beams}_hf_threads": threads,
            f"beam{beams}_round_ratios": [round(r[0], 3) for r in results]}


def _timed(fn):
    """(wall seconds, process CPU seconds) of one call."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


@contextlib.contextmanager
def _kernel_off(variable="FLAXLM_INT8_KERNEL"):
    """Programs traced (compiled) in this block take XLA's path, not the CPU kernel that
    `variable` switches (FLAXLM_INT8_KERNEL or FLAXLM_F32_KERNEL)."""
    saved = os.environ.get(variable)
    os.environ[variable] = "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ[variable]
        else:
            os.environ[variable] = saved


def int8_bench(llm, prompt, new, rounds=3):
    """flaxlm batch-1 decode with int8 weights (load(..., quantize="int8")) against the
    float32 `llm`, alternated `rounds` times on the same prompt (best of each), so a
    change in the machine's load hits both. int8 runs twice: with the compiled CPU kernel
    (flaxlm.model.int8_kernel; the default where it is built) and with XLA's int8 path."""
    from flaxlm.infer import LLM
    from flaxlm.model import int8_blocks, int8_kernel, param_stats

    int8_llm = LLM.load("smollm2-135m-instruct", quantize="int8")
    xla_llm = LLM.load("smollm2-135m-instruct", quantize="int8")
    flaxlm_decode(int8_llm, prompt, 4, repeats=1)  # compile the int8 programs
    with _kernel_off():
        flaxlm_decode(xla_llm, prompt, 4, repeats=1)
    fp32, int8, xla = 0.0, 0.0, 0.0
    for _ in range(rounds):
        fp32 = max(fp32, flaxlm_decode(llm, prompt, new, repeats=1)[1])
        ttft, decode, _ = flaxlm_decode(int8_llm, prompt, new, repeats=1)
        int8 = max(int8, decode)
        with _kernel_off():
            xla = max(xla, flaxlm_decode(xla_llm, prompt, new, repeats=1)[1])
    res = {"int8_decode_tok_s": int8, "int8_fp32_decode_tok_s": fp32,
           "int8_vs_fp32_ratio": int8 / fp32, "int8_ttft_128_s": ttft,
           "int8_kernel": int8_kernel.best_variant() if int8_kernel.enabled() else "off",
           "int8_xla_decode_tok_s": xla, "int8_xla_vs_fp32_ratio": xla / fp32,
           "int8_weight_bytes": sum(param_stats(int8_llm.model)[1].values()),
           "int8_block_bytes": int8_blocks.choices()}  # XLA's path, measured at first use
    log(f"int8 batch 1: decode {int8:.1f} tok/s (kernel: {res['int8_kernel']}), XLA's int8 path "
        f"{xla:.1f}, float32 {fp32:.1f} in the same rounds ({res['int8_vs_fp32_ratio']:.2f}x, "
        f"{res['int8_xla_vs_fp32_ratio']:.2f}x), int8 weights "
        f"{res['int8_weight_bytes'] / 2**20:.0f} MiB")
    return res


def f32_bench(prompt, new, batches=(1, 4), rounds=3):
    """float32 decode with the compiled CPU matmul kernel (flaxlm.model.f32_kernel, the
    default where it is built) against XLA's dots (FLAXLM_F32_KERNEL=0), alternated
    `rounds` times per batch size on the same prompt (best of each)."""
    from flaxlm.infer import LLM
    from flaxlm.model import f32_kernel

    kernel_llm = LLM.load("smollm2-135m-instruct")
    xla_llm = LLM.load("smollm2-135m-instruct")
    res = {"f32_kernel": f32_kernel.best_variant() if f32_kernel.enabled() else "off"}
    for batch in batches:
        flaxlm_decode(kernel_llm, prompt, 4, batch=batch, repeats=1)  # compile
        with _kernel_off("FLAXLM_F32_KERNEL"):
            flaxlm_decode(xla_llm, prompt, 4, batch=batch, repeats=1)
        kernel, xla = 0.0, 0.0
        for _ in range(rounds):
            kernel = max(kernel, flaxlm_decode(kernel_llm, prompt, new, batch, repeats=1)[1])
            with _kernel_off("FLAXLM_F32_KERNEL"):
                xla = max(xla, flaxlm_decode(xla_llm, prompt, new, batch, repeats=1)[1])
        res[f"f32_batch{batch}"] = {"kernel_tok_s": kernel, "xla_tok_s": xla,
                                    "ratio": kernel / xla}
        log(f"float32 batch {batch}: decode {kernel:.1f} tok/s per sequence with the kernel "
            f"({res['f32_kernel']}), {xla:.1f} with XLA's dots ({kernel / xla:.2f}x)")
    return res


def bandwidth_gb_s(megabytes=512, repeats=10):
    """Best read rate of a float32 matrix-vector product over `megabytes` of weights."""
    import jax
    import jax.numpy as jnp

    rows = megabytes * 2**20 // (4 * 8192)
    w = jnp.ones((rows, 8192), jnp.float32)
    x = jnp.ones((8192,), jnp.float32)
    matvec = jax.jit(lambda w, x: w @ x)
    matvec(w, x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        matvec(w, x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return w.nbytes / best / 1e9


def stream_bench(llm, prompt, new, rounds=2):
    """Batch-1 decode tok/s of `llm.stream` and of `generate`, alternated (best of each)."""
    from flaxlm.infer import SamplingParams

    params = SamplingParams(temperature=0, max_new_tokens=new, ignore_eos=True)
    streamed, plain = 0.0, 0.0
    for _ in range(rounds + 1):  # the first round compiles
        stream = llm.stream(prompt, params)
        for _ in stream:
            pass
        streamed = max(streamed, stream.decode_tokens_per_s)
        plain = max(plain, flaxlm_decode(llm, prompt, new, repeats=1)[1])
    return {"stream_decode_tok_s": streamed, "generate_decode_tok_s": plain,
            "stream_vs_generate": streamed / plain}


def chat_bench(llm, turns=10, longest=1500, new=64):
    """A conversation whose prompts grow to `longest` tokens: per turn, the prompt length,
    the time to its first token and how many programs compiled during the turn."""
    from flaxlm.infer import SamplingParams

    text = open(os.__file__, encoding="utf-8").read()
    conversation = llm.conversation(SamplingParams(temperature=0, max_new_tokens=new))
    out = []
    for turn in range(turns):
        target = 20 + (longest - 20) * turn // (turns - 1)
        have = len(llm.chat_prompt_ids(conversation.messages)) if conversation.messages else 0
        ids = llm.tokenizer.encode(text)[turn * 1000:]
        message = llm.tokenizer.decode(ids[:max(target - have - 12, 4)])
        before = llm.num_compiled
        stream = conversation.send(message)
        for _ in stream:
            pass
        prompt = len(llm.chat_prompt_ids(conversation.messages[:-1]))
        out.append({"prompt_tokens": prompt, "ttft_s": round(stream.ttft_s, 4),
                    "fed_tokens": conversation.fed_tokens,
                    "compiled": llm.num_compiled - before,
                    "decode_tok_s": round(stream.decode_tokens_per_s or 0.0, 2)})
        log(f"chat turn {turn + 1}: {out[-1]}")
    return {"chat_turns": out}


def flaxlm_side(args):
    """Everything measured on flaxlm alone, in this (fresh) process: one worker's JSON."""
    llm, cold = cold_start("Hello")
    if args.cold_only:
        return {"cold_start_s": cold}
    new = args.new_tokens
    p128, p512 = prompt_ids(llm.tokenizer, 128), prompt_ids(llm.tokenizer, 512, seed=1)
    ttft128, decode, _ = flaxlm_decode(llm, p128, new)
    ttft512, _, _ = flaxlm_decode(llm, p512, 16, repeats=1)
    res = {"cold_start_s": cold, "decode_tok_s": decode, "ttft_128_s": ttft128,
           "ttft_512_s": ttft512}
    res["batch32_tok_s"] = flaxlm_decode(llm, p128, new, batch=args.batch, repeats=1)[2]
    res["beam4_s"] = beam_search_bench(llm, None, p128)["beam4_flaxlm_s"]
    int8 = int8_bench(llm, p128, new, rounds=2)
    res.update(int8_decode_tok_s=int8["int8_decode_tok_s"],
               int8_vs_fp32=int8["int8_vs_fp32_ratio"])
    res.update(stream_bench(llm, p128, new))
    if hasattr(llm, "conversation"):
        res.update(chat_bench(llm))
    return res


def _code_tree(ref, workdir):
    """PYTHONPATH under which `import flaxlm` is commit `ref` of this repository."""
    import subprocess
    import tarfile

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tree = os.path.join(workdir, "tree")
    os.makedirs(tree)
    archive = subprocess.run(["git", "-C", repo, "archive", ref], capture_output=True,
                             check=True).stdout
    import io
    tarfile.open(fileobj=io.BytesIO(archive)).extractall(tree, filter="data")
    package = os.path.join(workdir, "path", "flaxlm")
    os.makedirs(package)
    for name in ("model", "infer", "train", "eval", "configs"):
        if os.path.isdir(os.path.join(tree, name)):
            os.symlink(os.path.join(tree, name), os.path.join(package, name))
    return os.path.join(workdir, "path")


def _worker(args, pythonpath, env, cold_only=False):
    import subprocess

    argv = [sys.executable, os.path.abspath(__file__), "--worker",
            "--new-tokens", str(args.new_tokens), "--batch", str(args.batch)]
    argv += ["--cold-only"] if cold_only else []
    environ = {**os.environ, **env}
    if pythonpath:
        environ["PYTHONPATH"] = pythonpath
    out = subprocess.run(argv, capture_output=True, text=True, env=environ)
    for line in out.stdout.splitlines()[:-1]:
        print(f"    {line}", flush=True)
    if out.returncode:
        raise SystemExit(f"worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(args):
    """flaxlm at `args.compare` and now, alternating fresh processes; HF and llama.cpp here."""
    import statistics
    import tempfile

    res = {"cpu": cpu_model(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "load_avg_start": os.getloadavg(), "new_tokens": args.new_tokens}
    with tempfile.TemporaryDirectory() as tmp:
        base_path = _code_tree(args.compare, tmp)
        cache = {"FLAXLM_COMPILE_CACHE_DIR": os.path.join(tmp, "xla")}
        runs = {"before": [], "after": []}
        for r in range(args.rounds):
            log(f"round {r + 1}: {args.compare}")
            runs["before"].append(_worker(args, base_path, {"FLAXLM_COMPILE_CACHE": "0"}))
            log(f"round {r + 1}: this tree (compilation cache {'empty' if r == 0 else 'kept'})")
            runs["after"].append(_worker(args, None, cache))
        log("this tree, cold start only, with the compilation cache the runs above wrote")
        warm = _worker(args, None, cache, cold_only=True)["cold_start_s"]
    for side, results in runs.items():
        keys = [k for k, v in results[0].items() if isinstance(v, (int, float))]
        res[side] = {k: statistics.median(r[k] for r in results) for k in keys}
        res[side]["cold_start_per_round_s"] = [r["cold_start_s"] for r in results]
        if "chat_turns" in results[-1]:
            res[side]["chat_turns"] = results[-1]["chat_turns"]
    res["after"]["cold_start_warm_cache_s"] = warm
    if not args.skip_hf:
        res["hf"] = hf_side(args)
    if args.llamacpp:
        res["llamacpp"] = llamacpp_side(args)
    res["load_avg_end"] = os.getloadavg()
    print(json.dumps(_rounded(res)))


def hf_side(args):
    new = args.new_tokens
    from flaxlm.model import load

    _, tokenizer = load("smollm2-135m-instruct")
    p128, p512 = prompt_ids(tokenizer, 128), prompt_ids(tokenizer, 512, seed=1)
    model = hf_model()
    ttft128, decode, _ = hf_decode(model, p128, new)
    ttft512 = min(hf_generate(model, p512, 1) for _ in range(2))
    thr = args.batch * new / hf_generate(model, p128, new, batch=args.batch)
    import torch

    ids = torch.tensor([p128])
    with torch.no_grad():
        kwargs = dict(attention_mask=torch.ones_like(ids), num_beams=4, do_sample=False,
                      eos_token_id=None, pad_token_id=2, top_k=None, top_p=None,
                      temperature=None, max_new_tokens=64)
        model.generate(ids, **{**kwargs, "max_new_tokens": 2})
        beam = _timed(lambda: model.generate(ids, **kwargs))[0]
    out = {"decode_tok_s": decode, "ttft_128_s": ttft128, "ttft_512_s": ttft512,
           "batch32_tok_s": thr, "beam4_s": beam}
    log(f"HF: {out}")
    return out


def llamacpp_side(args, rounds=2):
    """llama-cpp-python batch-1 greedy decode on F32 and Q8_0 GGUFs of the shipped model."""
    try:
        import llama_cpp
    except ImportError:
        log("llama.cpp: skipped (llama_cpp is not importable; build notes in docs/benchmarks.md)")
        return None
    from flaxlm.model import load
    from flaxlm.model.embedded import smollm2_gguf_path

    _, tokenizer = load("smollm2-135m-instruct")
    prompt = prompt_ids(tokenizer, 128)
    source = str(smollm2_gguf_path())
    out = {"version": getattr(llama_cpp, "__version__", "?")}
    folder = os.path.join(os.path.expanduser("~"), ".cache", "flaxlm", "llamacpp")
    os.makedirs(folder, exist_ok=True)
    for name, ftype in (("f32", llama_cpp.LLAMA_FTYPE_ALL_F32),
                        ("q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0)):
        path = os.path.join(folder, f"smollm2-135m-instruct-{name}.gguf")
        if not os.path.exists(path):
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.allow_requantize = ftype, True
            params.nthread = os.cpu_count()
            if llama_cpp.llama_model_quantize(source.encode(), path.encode(), params) != 0:
                raise SystemExit(f"llama_model_quantize to {name} failed")
        model = llama_cpp.Llama(path, n_ctx=1024, n_batch=512, n_threads=os.cpu_count(),
                                n_threads_batch=os.cpu_count(), verbose=False)
        best = 0.0
        for _ in range(rounds + 1):
            tokens, t_first = 0, None
            t0 = time.perf_counter()
            for _ in model.generate(prompt, top_k=1, temp=0.0, reset=True):
                tokens += 1
                if t_first is None:
                    t_first = time.perf_counter()
                if tokens == args.new_tokens:
                    break
            best = max(best, (tokens - 1) / (time.perf_counter() - t_first))
        out[f"{name}_decode_tok_s"] = best
        out[f"{name}_ttft_128_s"] = t_first - t0
        log(f"llama.cpp {name}: decode {best:.1f} tok/s")
        del model
    return out


def _rounded(x):
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_rounded(v) for v in x]
    return x


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--only", choices=("beam", "int8", "f32"),
                        help="run one part of the benchmark")
    parser.add_argument("--compare", metavar="REF",
                        help="also measure commit REF, in alternating worker processes")
    parser.add_argument("--rounds", type=int, default=1, help="worker rounds with --compare")
    parser.add_argument("--cold-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--llamacpp", action="store_true",
                        help="also run llama-cpp-python (F32 and Q8_0) when it is importable")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    new = args.new_tokens
    if args.worker:
        print(json.dumps(_rounded(flaxlm_side(args))))
        return
    if args.compare:
        compare(args)
        return
    if args.only in ("int8", "f32"):
        from flaxlm.infer import LLM

        llm = LLM.load("smollm2-135m-instruct")
        prompt = prompt_ids(llm.tokenizer, 128)
        part = (int8_bench(llm, prompt, new) if args.only == "int8"
                else f32_bench(prompt, new))
        res = {"cpu": cpu_model(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
               "load_avg_1min": os.getloadavg()[0], **part}
        if args.llamacpp:
            res["llamacpp"] = llamacpp_side(args)
        res["load_avg_1min_end"] = os.getloadavg()[0]
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}))
        return
    if args.only == "beam":
        from flaxlm.infer import LLM

        llm = LLM.load("smollm2-135m-instruct")
        hf = None if args.skip_hf else hf_model()
        res = {"machine": f"{platform.machine()}, {os.cpu_count()} cores",
               "load_avg_1min": os.getloadavg()[0],
               **beam_search_bench(llm, hf, prompt_ids(llm.tokenizer, 128)),
               "load_avg_1min_end": os.getloadavg()[0]}
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}))
        return

    llm, cold = cold_start("Hello")
    log(f"cold start (process start to first token): {cold:.2f} s")
    from flaxlm.model import param_stats

    count, by_dtype = param_stats(llm.model)
    weight_bytes = sum(by_dtype.values())
    p128, p512 = prompt_ids(llm.tokenizer, 128), prompt_ids(llm.tokenizer, 512, seed=1)

    res = {"cpu": cpu_model(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "new_tokens": new, "cold_start_s": cold, "weight_bytes": weight_bytes}
    ttft128, decode, _ = flaxlm_decode(llm, p128, new)
    ttft512, _, _ = flaxlm_decode(llm, p512, 16, repeats=1)
    res.update(flaxlm_decode_tok_s=decode, flaxlm_ttft_128_s=ttft128, flaxlm_ttft_512_s=ttft512)
    log(f"flaxlm batch 1: decode {decode:.1f} tok/s, ttft 128: {ttft128:.3f} s, 512: {ttft512:.3f} s")
    _, _, thr = flaxlm_decode(llm, p128, new, batch=args.batch, repeats=1)
    res["flaxlm_batch32_tok_s"] = thr
    log(f"flaxlm batch {args.batch}: {thr:.1f} tok/s")
    res["bandwidth_gb_s"] = bandwidth_gb_s()
    res["roofline_fraction"] = decode * weight_bytes / (res["bandwidth_gb_s"] * 1e9)
    log(f"matvec bandwidth {res['bandwidth_gb_s']:.1f} GB/s; roofline fraction "
        f"{res['roofline_fraction']:.2f}")

    if not args.skip_hf:
        model = hf_model()
        h_ttft128, h_decode, _ = hf_decode(model, p128, new)
        h_ttft512 = min(hf_generate(model, p512, 1) for _ in range(2))
        log(f"HF batch 1: decode {h_decode:.1f} tok/s, ttft 128: {h_ttft128:.3f} s, "
            f"512: {h_ttft512:.3f} s")
        h_thr = args.batch * new / hf_generate(model, p128, new, batch=args.batch)
        log(f"HF batch {args.batch}: {h_thr:.1f} tok/s")
        res.update(hf_decode_tok_s=h_decode, hf_ttft_128_s=h_ttft128, hf_ttft_512_s=h_ttft512,
                   hf_batch32_tok_s=h_thr, decode_ratio=decode / h_decode,
                   batch32_ratio=res["flaxlm_batch32_tok_s"] / h_thr,
                   ttft_128_ratio=h_ttft128 / ttft128, ttft_512_ratio=h_ttft512 / ttft512)
    res.update(beam_search_bench(llm, None if args.skip_hf else model, p128))
    res.update(int8_bench(llm, p128, new))
    if args.llamacpp:
        res["llamacpp"] = llamacpp_side(args)
    # ttft_s: flaxlm's, for the two prompt lengths the issue names
    res["ttft_s"] = {"128": ttft128, "512": ttft512}
    res["batch32_tok_s"] = {"flaxlm": res["flaxlm_batch32_tok_s"],
                            "hf": res.get("hf_batch32_tok_s")}
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}))


if __name__ == "__main__":
    main()
