"""`flaxlm serve` as a process (SIGTERM), bad flags, and the sampling defaults of serve and chat."""

import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from flaxlm.infer.defaults import LLAMA_CPP_DEFAULTS, sampling_defaults
from flaxlm.infer.llm import LLM
from flaxlm.infer.sampling import SamplingParams
from flaxlm.model.cli import main
from tests.serve.conftest import free_port

FLAXLM = [sys.executable, "-c", "import sys; from flaxlm.model.cli import main; sys.exit(main())"]


def test_sigterm_finishes_the_stream_in_flight_and_exits_0(tiny_chat):
    port = free_port()
    process = subprocess.Popen(
        FLAXLM + ["serve", str(tiny_chat), "--port", str(port), "--context", "256",
                  "--max-slots", "1", "--no-warmup"], stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        lines, first = [], threading.Event()

        def read():
            body = {"model": str(tiny_chat), "prompt": "Hello", "max_tokens": 200, "stream": True,
                    "temperature": 0, "ignore_eos": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        first.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert first.wait(60)
        process.send_signal(signal.SIGTERM)
        reader.join(60)
        assert process.wait(60) == 0
    finally:
        process.kill()
        stderr = process.stderr.read()
    assert lines[-1] == "data: [DONE]", stderr
    last = json.loads(lines[-2][len("data: "):])
    assert last["choices"][0]["finish_reason"] == "length"
    assert "Traceback" not in stderr


@pytest.mark.parametrize("flags, message", [
    (["--port", "0"], "--port must be in"),
    (["--context", "100"], "context must be a multiple of 256"),
    (["--max-slots", "0"], "max_slots must be an int >= 1"),
])
def test_bad_flags_exit_2_with_one_line(tiny_chat, capsys, flags, message):
    assert main(["serve", str(tiny_chat), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_help_names_the_defaults(capsys):
    for command in ("serve", "chat"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "generation_config.json" in text and "temperature 0.8, top_k 40, top_p 0.95, " \
            "min_p 0.05" in text


def test_sampling_defaults_from_generation_config(tmp_path):
    assert sampling_defaults("smollm2-135m-instruct") == (LLAMA_CPP_DEFAULTS,
                                                          "llama.cpp chat defaults")
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": 2}))
    assert sampling_defaults(tmp_path)[0] == {"temperature": 0.6, "top_p": 0.9}
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    assert sampling_defaults(tmp_path)[0] == {"temperature": 0.0}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert sampling_defaults(tmp_path)[0] == LLAMA_CPP_DEFAULTS


def test_chat_samples_with_the_defaults(tiny_chat, capsys):
    """`flaxlm chat` on a model without generation settings: llama.cpp's, not temperature 1."""
    assert main(["chat", "--model", str(tiny_chat), "--prompt", "Hello", "--seed", "5",
                 "--max-new-tokens", "12", "--ignore-eos"]) == 0
    printed = capsys.readouterr().out
    llm = LLM.load(tiny_chat)
    ref = llm.chat([{"role": "user", "content": "Hello"}],
                   SamplingParams(max_new_tokens=12, seed=5, ignore_eos=True,
                                  **LLAMA_CPP_DEFAULTS))
    hot = llm.chat([{"role": "user", "content": "Hello"}],
                   SamplingParams(max_new_tokens=12, seed=5, ignore_eos=True))
    assert printed == ref.text and ref.text != hot.text  # the newline goes to stderr
