"""The `flaxlm` command: inspect, next-token, convert, and one-line errors."""

import json
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest

from flaxlm.model import load
from flaxlm.model.cli import main
from tests.hf_models import make_hf_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    make_hf_model("gpt2").save_pretrained(directory, safe_serialization=True)
    return directory


def test_inspect_json(tiny_dir, capsys):
    assert main(["inspect", str(tiny_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["norm"] == "layernorm" and info["config"]["learned_positions"]
    assert info["parameter_bytes"] == {"float32": 4 * info["parameters"]}
    assert info["tokenizer"] is None


def test_inspect_smollm2(capsys):
    assert main(["inspect", "smollm2-135m-instruct"]) == 0
    out = capsys.readouterr().out
    assert "134,515,008" in out
    assert "vocabulary 49,152" in out and "chat template present" in out
    assert "'<|im_end|>' (id 2)" in out


def test_convert_round_trip(tiny_dir, tmp_path, capsys):
    out_dir = tmp_path / "converted"
    assert main(["convert", str(tiny_dir), str(out_dir)]) == 0
    assert str(out_dir) in capsys.readouterr().out
    a, _ = load(tiny_dir)
    b, _ = load(out_dir)
    tokens = np.arange(12)[None]
    np.testing.assert_array_equal(np.asarray(a(tokens)), np.asarray(b(tokens)))


def test_next_token_needs_tokenizer(tiny_dir, capsys):
    assert main(["next-token", str(tiny_dir), "hello"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no tokenizer.json" in err[0]


def test_console_script_next_token_chat():
    """The installed `flaxlm` script on the embedded model (what `make demo` runs)."""
    exe = Path(sys.executable).with_name("flaxlm")
    result = subprocess.run([str(exe), "next-token", "smollm2-135m-instruct",
                             "What is the capital of France?", "--chat", "--top", "5"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 6
    probs = [float(line.split()[1]) for line in lines[1:]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001


@pytest.mark.parametrize("argv, message", [
    (["inspect", "/no/such/dir"], "unknown model '/no/such/dir'"),
    (["next-token", "smollm2-135m-instruct", ""], "TEXT is empty"),
])
def test_console_script_errors_are_one_line(argv, message):
    exe = Path(sys.executable).with_name("flaxlm")
    result = subprocess.run([str(exe), *argv], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and message in err[0], result.stderr
