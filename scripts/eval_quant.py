"""Int8 quality and memory: SmolLM2-135M-Instruct in float32 vs int8, one run.

Perplexity on held-out real text: the source of the Python standard library's
argparse.py and difflib.py (on every machine with Python), tokenized and cut
into 512-token windows, 20 from each file (40 x 511 = 20,440 predicted
tokens), scored by a full forward pass. Greedy agreement: 16 chat prompts,
256 new tokens each (temperature 0, EOS ignored), through the `LLM` API;
the share of positions where int8 chose the same token as float32, and how
many tokens each prompt matched before the first difference. Once two greedy
texts differ they stay different, so the script also reports the
teacher-forced agreement: int8's argmax at every position of float32's own
generations (prompt + 256 tokens), against float32's token.

Variants: "int8" is `load(..., quantize="int8")` (the GGUF's Q8_0 embedding,
which is also the tied LM head, kept with its own blocks, so it equals the
float32 embedding exactly; every projection per-channel int8);
"int8_channel_embed" quantizes the float32 model, the embedding per channel
too. "int8_float_embed" (embedding left float32) is only measured for memory:
its weights equal "int8"'s. The float32 model is itself the GGUF's Q4_1/Q8_0
weights dequantized.

    .venv/bin/python scripts/eval_quant.py [--windows-per-file 20] [--new-tokens 256]
"""

import argparse
import json
import math
import os
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

MODEL = "smollm2-135m-instruct"
TEXT_FILES = ("argparse.py", "difflib.py")
WINDOW = 512
PROMPTS = [
    "Explain in three sentences why the sky is blue.",
    "Write a Python function that checks whether a string is a palindrome.",
    "What is the capital of France, and what is it known for?",
    "Give me three tips for learning a new language.",
    "Summarize the plot of Romeo and Juliet.",
    "How does a refrigerator keep food cold?",
    "Write a haiku about autumn leaves.",
    "What are the main differences between a list and a tuple in Python?",
    "Describe the water cycle for a ten-year-old.",
    "Why do we have seasons on Earth?",
    "Write a short email asking a colleague to reschedule a meeting.",
    "What is photosynthesis?",
    "List five healthy breakfast ideas.",
    "How do I reverse a linked list? Explain the steps.",
    "What causes earthquakes?",
    "Tell me a short story about a robot who learns to paint.",
]


def log(message):
    print(f"[eval_quant] {message}", flush=True)


def text_windows(tokenizer, per_file):
    """[windows, WINDOW] token ids: `per_file` consecutive windows from each text file."""
    stdlib = sysconfig.get_paths()["stdlib"]
    windows = []
    for name in TEXT_FILES:
        with open(os.path.join(stdlib, name), encoding="utf-8") as f:
            ids = tokenizer.encode(f.read())
        if len(ids) < per_file * WINDOW:
            raise SystemExit(f"{name}: {len(ids)} tokens, need {per_file * WINDOW}")
        windows += [ids[i * WINDOW:(i + 1) * WINDOW] for i in range(per_file)]
    return np.asarray(windows, np.int32)


def perplexity(model, windows, batch=4):
    """exp(mean next-token NLL) over every window position after the first."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def nll_sum(state, tokens):
        logits = nnx.merge(graphdef, state)(tokens)[:, :-1]
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.sum(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    total = sum(float(nll_sum(state, jnp.asarray(windows[i:i + batch])))
                for i in range(0, len(windows), batch))
    return math.exp(total / (windows.shape[0] * (WINDOW - 1)))


def greedy_tokens(model, tokenizer, new_tokens):
    """[(prompt ids, generated ids)] for the 16 chat prompts."""
    from flaxlm.infer import LLM, SamplingParams

    llm = LLM(model, tokenizer)
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
    results = llm.chat([[{"role": "user", "content": p}] for p in PROMPTS], params)
    return [(r.prompt_token_ids, r.token_ids) for r in results]


def teacher_forced_agreement(model, reference):
    """Share of float32's generated tokens that are also `model`'s argmax given
    float32's text so far."""
    graphdef, state = nnx.split(model)
    argmax = jax.jit(lambda state, ids: jnp.argmax(nnx.merge(graphdef, state)(ids), axis=-1))
    seqs = [list(prompt) + list(tokens) for prompt, tokens in reference]
    width = max(map(len, seqs))  # right padding: causal, so earlier positions are unchanged
    ids = np.asarray([s + [0] * (width - len(s)) for s in seqs], np.int32)
    preds = np.concatenate([np.asarray(argmax(state, jnp.asarray(ids[i:i + 4])))
                            for i in range(0, len(ids), 4)])
    same = total = 0
    for row, (prompt, tokens) in zip(preds, reference):
        same += int(np.sum(row[len(prompt) - 1:len(prompt) - 1 + len(tokens)] == np.asarray(tokens)))
        total += len(tokens)
    return same / total


def agreement(reference, other):
    reference, other = [t for _, t in reference], [t for _, t in other]
    same = sum(int(a == b) for ref, out in zip(reference, other) for a, b in zip(ref, out))
    total = sum(len(ref) for ref in reference)
    prefixes = [next((i for i, (a, b) in enumerate(zip(ref, out)) if a != b), len(ref))
                for ref, out in zip(reference, other)]
    return same / total, float(np.mean(prefixes))


def memory(float_model):
    from flaxlm.model import load, param_stats
    from flaxlm.model.quant import quantize

    bf16, _ = load(MODEL, dtype="bfloat16")
    sizes = {"float32": float_model, "bfloat16": bf16, "int8": load(MODEL, quantize="int8")[0],
             "int8_float_embed": quantize(float_model, embeddings=False)}
    out = {name: sum(param_stats(m)[1].values()) for name, m in sizes.items()}
    for name in ("bfloat16", "int8", "int8_float_embed"):
        out[f"{name}_vs_float32"] = out[name] / out["float32"]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows-per-file", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=256)
    args = parser.parse_args()
    from flaxlm.model import load
    from flaxlm.model.quant import quantize

    t0 = time.perf_counter()
    float_model, tokenizer = load(MODEL)
    variants = {
        "float32": float_model,
        "int8": load(MODEL, quantize="int8")[0],
        "int8_channel_embed": quantize(float_model),
    }
    windows = text_windows(tokenizer, args.windows_per_file)
    res = {"text": f"python {'.'.join(map(str, os.sys.version_info[:3]))} stdlib "
                   f"{', '.join(TEXT_FILES)}",
           "scored_tokens": int(windows.shape[0] * (WINDOW - 1))}
    reference = None
    for name, model in variants.items():
        ppl = perplexity(model, windows)
        tokens = greedy_tokens(model, tokenizer, args.new_tokens)
        res[f"{name}_ppl"] = ppl
        if reference is None:
            reference = tokens
            # cached decode vs one full forward: 1.0 up to float ties
            res[f"{name}_teacher_forced_agreement"] = teacher_forced_agreement(model, reference)
            log(f"{name}: perplexity {ppl:.4f}")
            continue
        share, prefix = agreement(reference, tokens)
        forced = teacher_forced_agreement(model, reference)
        res[f"{name}_ppl_rel_delta"] = ppl / res["float32_ppl"] - 1
        res[f"{name}_greedy_agreement"] = share
        res[f"{name}_mean_prefix_match"] = prefix
        res[f"{name}_teacher_forced_agreement"] = forced
        log(f"{name}: perplexity {ppl:.4f} ({100 * res[f'{name}_ppl_rel_delta']:+.3f}%), "
            f"greedy agreement {share:.3f}, tokens before first difference {prefix:.1f}, "
            f"teacher-forced agreement {forced:.4f}")
    res["param_bytes"] = memory(float_model)
    log(f"parameter bytes: {res['param_bytes']}")
    res["seconds"] = time.perf_counter() - t0
    print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in res.items()}))


if __name__ == "__main__":
    main()
