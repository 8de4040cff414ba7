"""Log-likelihood throughput: flaxlm vs lm-evaluation-harness's `hf` backend, one run.

A 1,000-question multiple-choice task is built offline from the Python standard
library (flaxlm.model.docstrings): each question gives a function's docstring
sentence and four qualified function names (one right, three drawn with a
seeded RNG), in MMLU's prompt format. Both sides score the same requests with
the same weights (SmolLM2-135M-Instruct's GGUF dequantized to float32; lm-eval
loads the HF export that flaxlm writes): four per question, the context
followed by " " + each choice (lm-eval's `multiple_choice` requests, `acc`),
and with --letters four more, " A" ... " D". Scored tokens/s = continuation
tokens / seconds of the `loglikelihood` call (flaxlm: compile included, and
with --warm a second call; lm-eval: `HFLM.loglikelihood` after the model is
loaded, batch size --hf-batch-size, torch using every core).

    .venv/bin/python scripts/bench_eval.py [--questions 1000] [--letters] [--warm] [--hf-batch-size 16]
"""

import argparse
import json
import os
import random
import tempfile
import time

import numpy as np
from benchlib import cpu_model

MODEL = "smollm2-135m-instruct"


def log(message):
    print(f"[bench_eval] {message}", flush=True)


def build_task(n: int, seed: int = 0):
    """[(context, [4 choices], answer index)] from standard-library docstrings."""
    from flaxlm.eval.multiple_choice import Question, prompt
    from flaxlm.model.docstrings import docstring_examples

    examples = docstring_examples()
    rng = random.Random(seed)
    picked = rng.sample(examples, n)
    names = [e.name for e in examples]
    task = []
    for e in picked:
        wrong = [x for x in rng.sample(names, 4) if x != e.name][:3]
        answer = rng.randrange(4)
        choices = wrong[:answer] + [e.name] + wrong[answer:]
        q = Question(f'Which Python standard-library function has this docstring: "{e.reference}"',
                     tuple(choices), answer, "the Python standard library", "")
        task.append((prompt(q, []), choices, answer))
    return task


def requests_of(task, letters: bool):
    out = []
    for context, choices, _ in task:
        out += [(context, " " + c) for c in choices]
        if letters:
            out += [(context, f" {x}") for x in "ABCD"]
    return out


def accuracy(task, logprobs, letters: bool) -> float:
    per = 8 if letters else 4
    right = [int(np.argmax(logprobs[i * per:i * per + 4])) == answer
             for i, (_, _, answer) in enumerate(task)]
    return float(np.mean(right))


def run_flaxlm(requests, warm: bool):
    from flaxlm.infer import LLM

    llm = LLM.load(MODEL)
    runs = []
    for label in ("cold", "warm")[:1 + warm]:
        t0 = time.perf_counter()
        out = llm.loglikelihood(requests)
        runs.append(time.perf_counter() - t0)
        log(f"flaxlm {label}: {runs[-1]:.1f} s ({llm.num_compiled} programs compiled)")
    return llm, out, runs


def run_hf(llm, requests, batch_size: int):
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from flaxlm.model import save_hf

    torch.set_num_threads(os.cpu_count())
    with tempfile.TemporaryDirectory() as directory:
        save_hf(llm.model, llm.tokenizer, directory)
        hflm = HFLM(pretrained=directory, batch_size=batch_size, device="cpu", dtype="float32")
        instances = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(requests)]
        t0 = time.perf_counter()
        out = hflm.loglikelihood(instances, disable_tqdm=True)
        seconds = time.perf_counter() - t0
    log(f"lm-eval hf: {seconds:.1f} s")
    return out, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=1000)
    parser.add_argument("--letters", action="store_true", help="also score the answer letters")
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--warm", action="store_true", help="time flaxlm a second time")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load_before = os.getloadavg()
    task = build_task(args.questions)
    requests = requests_of(task, args.letters)
    llm, ours, runs = run_flaxlm(requests, args.warm)
    scored = sum(r.num_tokens for r in ours)
    ours_lp = np.array([r.logprob for r in ours])
    res = {"cpu": cpu_model(), "cores": os.cpu_count(), "questions": args.questions,
           "requests": len(requests), "scored_tokens": scored,
           "context_tokens_per_question": float(np.mean(
               [len(llm.tokenizer.encode(c)) for c, _, _ in task])),
           "flaxlm_cold_s": runs[0], "flaxlm_cold_tok_s": scored / runs[0],
           "flaxlm_acc": accuracy(task, ours_lp, args.letters),
           "num_compiled": llm.num_compiled}
    if not args.skip_hf:
        theirs, seconds = run_hf(llm, requests, args.hf_batch_size)
        theirs_lp = np.array([lp for lp, _ in theirs])
        res.update({"hf_s": seconds, "hf_tok_s": scored / seconds,
                    "hf_batch_size": args.hf_batch_size,
                    "hf_acc": accuracy(task, theirs_lp, args.letters),
                    "max_abs_logprob_diff": float(np.max(np.abs(ours_lp - theirs_lp))),
                    "ratio_cold": seconds / runs[0]})
    if args.warm:
        res.update({"flaxlm_warm_s": runs[1], "flaxlm_warm_tok_s": scored / runs[1]})
        if "hf_s" in res:
            res["ratio_warm"] = res["hf_s"] / runs[1]
    res["load_average_before"] = [round(x, 2) for x in load_before]
    res["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}))


if __name__ == "__main__":
    main()
