"""The train/tokenizer/plot/export commands: bad input is one line on stderr and exit 2,
found before anything is compiled and without losing a checkpoint; SIGTERM saves."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flaxlm.model.cli import main
from flaxlm.train import loop as loop_lib
from flaxlm.train.checkpoint import read_run_file, restore_model
from flaxlm.train.metrics import read_metrics

from tests.train.conftest import tiny_recipe, to_toml


@pytest.fixture
def recipe_file(corpus, tmp_path):
    path = tmp_path / "recipe.toml"
    path.write_text(to_toml(tiny_recipe(corpus)))
    return path


def no_training(monkeypatch):
    """Fail the test if a run gets as far as its first step (and its compilation)."""
    def refuse(self):
        raise AssertionError("the run started training: the error was not found up front")

    monkeypatch.setattr(loop_lib._Loop, "execute", refuse)


@pytest.fixture(name="no_training")
def no_training_fixture(monkeypatch):
    no_training(monkeypatch)


def _fails(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"flaxlm {argv[0]}: error: "), err
    assert message in err[0], err[0]


@pytest.mark.parametrize("overrides, message", [
    (["data.files=[\"/nonexistent/*.txt\"]"], "no file matches '/nonexistent/*.txt'"),
    (["data.seq_len=1000"], "data.seq_len 1000 is above the model's context (max_seq_len 64)"),
    (["train.batch_size=4"], "not divisible by the 8 data-parallel devices"),
    (["train.grad_accum=3"], "train.batch_size (8) is not divisible by train.grad_accum (3)"),
    (["optimizer.lrr=1"], "unknown setting 'optimizer.lrr' (did you mean 'optimizer.lr'?)"),
    (["train.mesh=\"data=3\""], "has 3 devices, but 8 are available"),
    (["tokenizer.source=\"/nonexistent/model\""], "unknown model '/nonexistent/model'"),
])
def test_bad_settings(capsys, no_training, recipe_file, tmp_path, overrides, message):
    argv = ["train", "--config", str(recipe_file), "--out", str(tmp_path / "run")]
    _fails(capsys, argv + [a for o in overrides for a in ("--set", o)], message)


def test_empty_data_file(capsys, no_training, recipe_file, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    argv = ["train", "--config", str(recipe_file), "--out", str(tmp_path / "run"),
            "--set", f"data.files=[\"{tmp_path / 'empty.txt'}\"]"]
    _fails(capsys, argv, "empty.txt: empty, no documents")


def test_unwritable_run_dir(capsys, no_training, recipe_file, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    argv = ["train", "--config", str(recipe_file), "--out", str(tmp_path / "file" / "run")]
    _fails(capsys, argv, "cannot write to the run directory")


def test_missing_recipe(capsys, tmp_path):
    _fails(capsys, ["train", "--config", str(tmp_path / "nope.toml")], "cannot read recipe")


def test_corrupt_checkpoint_is_reported_and_kept(capsys, no_training, straight, tmp_path):
    _, straight_dir = straight
    run_dir = tmp_path / "run"
    shutil.copytree(straight_dir, run_dir)
    recipe, _, _ = read_run_file(run_dir)
    (tmp_path / "r.toml").write_text(to_toml(recipe))
    for path in (run_dir / "checkpoints" / "6" / "state").rglob("*"):
        if path.is_file() and path.name != "_METADATA":
            path.write_bytes(b"garbage")
    _fails(capsys, ["train", "--config", str(tmp_path / "r.toml"), "--out", str(run_dir),
                    "--steps", "8"], "checkpoints/6: cannot restore the checkpoint")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["3", "6"]


def test_sigterm_saves_a_restorable_checkpoint(corpus, tmp_path):
    recipe = tiny_recipe(corpus, train={"steps": 100_000, "batch_size": 2},
                         checkpoint={"every": 100_000},
                         log={"eval_every": 100_000, "plot": False, "tensorboard": False})
    (tmp_path / "r.toml").write_text(to_toml(recipe))
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device: starts faster
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "flaxlm"), "train", "--config", str(tmp_path / "r.toml"),
         "--out", str(run_dir)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(read_metrics(run_dir)) < 2:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 143, err
    assert "SIGTERM: stopped at step" in err
    model, tokenizer, step = restore_model(run_dir)
    assert step >= 2 and step == int(err.split("stopped at step ")[1].split(",")[0])


def test_sigint_saves_and_exits_130_with_a_progress_bar(capsys, corpus, tmp_path):
    """In-process `flaxlm train`: SIGINT finishes the step, saves a checkpoint and exits 130
    (the console-script run above covers SIGTERM); the bar shows steps, loss and tokens/s."""
    recipe = tiny_recipe(corpus, train={"steps": 100_000}, checkpoint={"every": 100_000},
                         log={"eval_every": 100_000, "plot": False, "tensorboard": False,
                              "progress": True})
    (tmp_path / "r.toml").write_text(to_toml(recipe))
    run_dir = tmp_path / "run"

    def interrupt():  # once two steps are logged, the run's own handler is installed
        deadline = time.monotonic() + 300
        while len(read_metrics(run_dir)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    assert main(["train", "--config", str(tmp_path / "r.toml"), "--out", str(run_dir)]) == 130
    err = capsys.readouterr().err
    assert "SIGINT: stopped at step" in err, err
    assert "step" in err and "loss=" in err and "tok_s=" in err  # the progress bar
    model, tokenizer, step = restore_model(run_dir)
    assert step >= 2 and step == int(err.split("stopped at step ")[1].split(",")[0])


def flaxlm(*argv: str) -> str:
    """Run the installed `flaxlm` console script; it must succeed. Returns its stdout."""
    result = subprocess.run([str(Path(sys.executable).parent / "flaxlm"), *argv],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_console_script_tokenizer_train(capsys, corpus, tmp_path):
    import transformers

    from flaxlm.model.tokenizer import Tokenizer

    out = flaxlm("tokenizer", "train", "--data", str(corpus / "*.txt"), "--vocab-size", "300",
                 "--out", str(tmp_path / "tok"))
    assert "300 tokens from 40 documents" in out
    ours = Tokenizer.from_hf_dir(tmp_path / "tok")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = "The cat sat on the mat.<|endoftext|>"
    assert ours.encode(text) == theirs(text).input_ids
    assert ours.encode(text)[-1] == ours.eos_token_id == 0
    specials = {name: token for name, (token, _) in ours.special_tokens.items()}
    assert specials == {"bos_token": "<|begin_of_text|>", "eos_token": "<|endoftext|>",
                        "pad_token": "<|pad|>"}
    for marker in ("<|im_start|>", "<|im_end|>"):
        assert len(ours.encode(marker)) == 1
    chat = ours.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    _fails(capsys, ["tokenizer", "train", "--data", str(corpus / "*.txt"), "--vocab-size", "100",
                    "--out", str(tmp_path / "small")], "vocab size 100 is below 261")


def test_console_script_plot(capsys, tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 5.0, "eval_loss": null}\n{"step": 2, "loss": 4.0, "eval_loss": 4.5}\n')
    assert str(tmp_path / "curve.png") in flaxlm("plot", str(tmp_path), "--out",
                                                 str(tmp_path / "curve.png"))
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _fails(capsys, ["plot", str(tmp_path / "missing")], "no metrics.jsonl")


def test_console_script_export_of_a_chosen_step(capsys, straight, tmp_path):
    """`flaxlm export RUN_DIR DIR --step 3` writes the step-3 checkpoint's weights (not the
    latest, step 6) with the run's tokenizer."""
    import numpy as np

    from flaxlm.model import flat_params, load

    _, run_dir = straight
    assert str(tmp_path / "hf") in flaxlm("export", str(run_dir), str(tmp_path / "hf"),
                                          "--step", "3")
    exported, tokenizer = load(tmp_path / "hf")
    step3, run_tokenizer, step = restore_model(run_dir, 3)
    assert step == 3 and tokenizer.encode("the cat sat") == run_tokenizer.encode("the cat sat")
    ours, theirs, latest = flat_params(exported), flat_params(step3), flat_params(
        restore_model(run_dir)[0])
    assert ours.keys() == theirs.keys()
    for key in ours:
        np.testing.assert_array_equal(np.asarray(ours[key]), np.asarray(theirs[key]), err_msg=key)
    assert not np.array_equal(np.asarray(ours["layers.0.mlp.up_proj.kernel"]),
                              np.asarray(latest["layers.0.mlp.up_proj.kernel"]))
    _fails(capsys, ["export", str(tmp_path / "hf"), str(tmp_path / "x")],
           "not a training run directory")
    _fails(capsys, ["export", str(run_dir), str(tmp_path / "x"), "--step", "4"],
           "checkpoints/4: cannot restore the checkpoint")


def test_changed_recipe_does_not_resume_into_a_run(capsys, no_training, corpus, recipe_file,
                                                   tmp_path):
    from flaxlm.train.checkpoint import write_run_file

    recipe = tiny_recipe(corpus)
    (tmp_path / "run").mkdir()
    write_run_file(tmp_path / "run", recipe, recipe.model_config(), None)
    argv = ["train", "--config", str(recipe_file), "--out", str(tmp_path / "run")]
    _fails(capsys, argv + ["--set", "data.seq_len=16"],
           "cannot resume: data.seq_len was 32 in this run directory, the recipe now says 16")
    _fails(capsys, argv + ["--init", "smollm2-135m-instruct"],
           "started with --init None, not smollm2-135m-instruct")
