"""The `flaxlm` command: inspect, next-token, convert, quantize, and one-line errors.

Arguments and errors are checked in-process (`main([...])`); each command also runs once
through the installed console script."""

import json
from pathlib import Path
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.model import flat_params, load
from flaxlm.model.cli import main
from tests.hf_models import make_hf_model, save_tokenizer

FLAXLM = str(Path(sys.executable).with_name("flaxlm"))


def flaxlm(*argv: str) -> subprocess.CompletedProcess:
    """Run the installed `flaxlm` console script; it must succeed."""
    result = subprocess.run([FLAXLM, *argv], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    make_hf_model("gpt2").save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny llama with a tokenizer (what `quantize` and `next-token` need)."""
    directory = tmp_path_factory.mktemp("llama")
    make_hf_model("llama-gqa", seed=3).save_pretrained(directory, safe_serialization=True)
    save_tokenizer(directory, 320)
    return directory


def test_inspect_json(tiny_dir, capsys):
    assert main(["inspect", str(tiny_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["norm"] == "layernorm" and info["config"]["learned_positions"]
    assert info["parameter_bytes"] == {"float32": 4 * info["parameters"]}
    assert info["tokenizer"] is None


def test_console_script_inspect_smollm2():
    out = flaxlm("inspect", "smollm2-135m-instruct").stdout
    assert "134,515,008" in out
    assert "vocabulary 49,152" in out and "chat template present" in out
    assert "'<|im_end|>' (id 2)" in out


def test_console_script_convert_round_trip(tiny_dir, tmp_path):
    out_dir = tmp_path / "converted"
    assert str(out_dir) in flaxlm("convert", str(tiny_dir), str(out_dir)).stdout
    a, _ = load(tiny_dir)
    b, _ = load(out_dir)
    tokens = np.arange(12)[None]
    np.testing.assert_array_equal(np.asarray(a(tokens)), np.asarray(b(tokens)))


def test_convert_bfloat16(tiny_dir, tmp_path, capsys):
    assert main(["convert", str(tiny_dir), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    assert str(tmp_path / "bf16") in capsys.readouterr().out
    data = (tmp_path / "bf16" / "model.safetensors").read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    assert {t["dtype"] for name, t in header.items() if name != "__metadata__"} == {"BF16"}
    a = np.asarray(load(tiny_dir, dtype="bfloat16")[0](np.arange(12)[None]))
    np.testing.assert_array_equal(np.asarray(load(tmp_path / "bf16", dtype="bfloat16")[0](
        np.arange(12)[None])), a)  # float32 weights rounded to bfloat16 on write or on load


def test_console_script_quantize_writes_what_load_quantizes(llama_dir, tmp_path):
    assert "int8" in flaxlm("quantize", str(llama_dir), str(tmp_path / "out")).stdout
    written, expected = flat_params(load(tmp_path / "out")[0]), flat_params(
        load(llama_dir, quantize="int8")[0])
    assert written.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(np.asarray(written[key]), np.asarray(value), err_msg=key)
    assert written["layers.0.mlp.up_proj.kernel"].dtype == jnp.int8


def test_quantize_keep_embeddings(llama_dir, tmp_path, capsys):
    assert main(["quantize", str(llama_dir), str(tmp_path / "keep"), "--keep-embeddings"]) == 0
    assert "int8" in capsys.readouterr().out
    kept = flat_params(load(tmp_path / "keep")[0])
    assert kept["embed.embedding"].dtype == jnp.float32 and kept["lm_head"].dtype == jnp.float32
    assert kept["layers.0.mlp.up_proj.kernel"].dtype == jnp.int8


def test_next_token_needs_tokenizer(tiny_dir, capsys):
    assert main(["next-token", str(tiny_dir), "hello"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no tokenizer.json" in err[0]


def test_next_token_top_k(llama_dir, capsys):
    assert main(["next-token", str(llama_dir), "The quick brown fox", "--top", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and lines[0].endswith("top 3 next tokens:")


def test_console_script_next_token_chat():
    """The installed `flaxlm` script on the embedded model (what `make demo` runs)."""
    lines = flaxlm("next-token", "smollm2-135m-instruct", "What is the capital of France?",
                   "--chat", "--top", "5").stdout.strip().splitlines()
    assert len(lines) == 6
    probs = [float(line.split()[1]) for line in lines[1:]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001


@pytest.mark.parametrize("argv, message", [
    (["inspect", "/no/such/dir"], "unknown model '/no/such/dir'"),
    (["next-token", "smollm2-135m-instruct", ""], "TEXT is empty"),
    (["convert", "/no/such/dir", "/tmp/out"], "unknown model '/no/such/dir'"),
    (["quantize", "/no/such/dir", "/tmp/out"], "unknown model '/no/such/dir'"),
])
def test_errors_are_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"flaxlm {argv[0]}: error: ") and message in err[0], err


@pytest.mark.parametrize("argv", [["next-token", "x", "y", "--top", "0"], ["inspect"],
                                  ["no-such-command"]])
def test_bad_arguments_exit_2_with_one_line(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"flaxlm{' ' + argv[0] if argv[0] != 'no-such-command' else ''}: "
                             "error: "), err
