"""The persistent compilation cache: a second process start compiles nothing, and
FLAXLM_COMPILE_CACHE=0 turns the cache off (nothing read from it)."""

import json
import os
import subprocess
import sys

import pytest

# One process start: load, stream, generate; counts of JAX's events: every program
# XLA needs is a backend compile event; one found in the persistent cache is a hit
# (read, not compiled).
SCRIPT = r"""
import json, sys
from jax import monitoring
counts = {"compiles": 0, "requests": 0, "hits": 0}
def on_event(event, **kwargs):
    if event == "/jax/compilation_cache/compile_requests_use_cache":
        counts["requests"] += 1
    elif event == "/jax/compilation_cache/cache_hits":
        counts["hits"] += 1
def on_duration(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":  # compiled, or read from the cache
        counts["compiles"] += 1
monitoring.register_event_listener(on_event)
monitoring.register_event_duration_secs_listener(on_duration)
from flaxlm.infer import LLM, SamplingParams
llm = LLM.load(sys.argv[1])
greedy = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
stream = llm.stream("The quick brown", greedy)
text = "".join(stream)
assert llm.generate(["The quick brown"], greedy)[0].text == text
import jax
print(json.dumps({**counts, "programs": llm.num_compiled, "text": text,
                  "cache_dir": jax.config.jax_compilation_cache_dir}))
"""


def _start(directory, env):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(directory)], capture_output=True,
                         text=True, timeout=600, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def model_dir(tiny_hf):
    return tiny_hf("llama-gqa", 0)[1]


def test_second_start_compiles_nothing_and_the_cache_can_be_off(model_dir, tmp_path):
    cache = {"FLAXLM_COMPILE_CACHE_DIR": str(tmp_path / "xla")}
    first = _start(model_dir, {**cache, "FLAXLM_COMPILE_CACHE": "1"})
    assert first["programs"] >= 2 and first["compiles"] > first["hits"]
    assert first["cache_dir"] == str(tmp_path / "xla") and any((tmp_path / "xla").iterdir())
    second = _start(model_dir, {**cache, "FLAXLM_COMPILE_CACHE": "1"})
    assert second["text"] == first["text"]
    assert second["compiles"] == second["hits"] == first["compiles"], "the second start compiled"
    off = _start(model_dir, {**cache, "FLAXLM_COMPILE_CACHE": "0"})
    assert off["text"] == first["text"] and off["cache_dir"] is None
    assert off["compiles"] == first["compiles"] and off["hits"] == 0
