"""`flaxlm generate` and `flaxlm chat` on a tiny model; bad settings exit 2 with one line.

Argument checks run in-process (`main([...])`); one real console-script run per
command proves the installed `flaxlm` entry point.
"""

import io
import subprocess
import sys
from pathlib import Path

import pytest

from flaxlm.model.cli import main

FLAXLM = str(Path(sys.executable).with_name("flaxlm"))


@pytest.fixture(scope="module")
def tiny_dir(tiny_hf):
    return tiny_hf("llama-gqa", 0)[1]


def test_generate_greedy_is_deterministic(tiny_dir, capsys):
    """The console script (a real `flaxlm` process), streamed and not: the same text."""
    argv = ["generate", "--model", str(tiny_dir), "--prompt", "The quick", "--temperature", "0",
            "--max-new-tokens", "8", "--ignore-eos"]
    result = subprocess.run([FLAXLM, *argv], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert main(argv + ["--stream"]) == 0
    streamed = capsys.readouterr()
    assert streamed.out.strip() == result.stdout.strip() and result.stdout.strip()
    assert "8 tokens" in streamed.err and "tokens/s" in streamed.err


def test_generate_reads_stdin_and_n_samples(tiny_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello"))
    assert main(["generate", "--model", str(tiny_dir), "--n", "2", "--seed", "1",
                 "--max-new-tokens", "4", "--logit-bias", "5=1.5", "--stop", "zz"]) == 0
    assert capsys.readouterr().out.count("--- sample") == 2


def test_chat_without_template_is_an_error(tiny_dir, capsys):
    assert main(["chat", "--model", str(tiny_dir), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "chat_template" in err[0]


def test_interactive_chat_two_turns():
    """The default model, two turns on stdin, each answer streamed with its token rate."""
    result = subprocess.run([FLAXLM, "chat", "--temperature", "0", "--max-new-tokens", "24"],
                            input="What is the capital of France?\nAnd of Italy?\n\n",
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout and "Rome" in result.stdout
    assert result.stderr.count("tokens/s]") == 2


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "1.5"], "top_p"),
    (["--top-k", "-2"], "top_k"),
    (["--min-p", "1"], "min_p"),
    (["--max-new-tokens", "0"], "max_new_tokens"),
    (["--logit-bias", "x=1"], "--logit-bias"),
    (["--prompt", ""], "prompt is empty"),
    (["--num-beams", "2", "--temperature", "0.5"], "--temperature does not go with --num-beams"),
    (["--num-beams", "2", "--stop", "x"], "--stop does not go with --num-beams"),
    (["--length-penalty", "2"], "--length-penalty applies to beam search (--num-beams) only"),
])
def test_bad_settings_exit_2_with_one_line(flags, message, capsys):
    assert main(["generate", "--prompt", "hi", *flags]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("flaxlm generate: ")
    assert not captured.out
