"""A look inside: residual stream and attention probabilities against HF transformers'
output_hidden_states / output_attentions, the logit lens, and `flaxlm attention`."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flaxlm.infer.attention_plot import token_label
from flaxlm.infer.llm import LLM
from flaxlm.model import ConfigError
from flaxlm.model.cli import main

TOL = 1e-4  # float32 against HF, as the other parity tests


def _ids(n, seed):
    return np.random.default_rng(seed).integers(1, 300, n).tolist()


# GQA (which query head reads which kv head), Gemma 2 (soft-capped logits, a window shorter
# than the text, post-norms, scaled embeddings), GPT-2 (learned positions).
@pytest.mark.parametrize("name", ["llama-gqa", "gemma2-softcap", "gpt2"])
def test_trace_equals_hf_hidden_states_and_attentions(tiny_hf, name):
    hf_model, directory = tiny_hf(name)
    llm = LLM.load(directory)
    texts = [_ids(37, 1), _ids(11, 2)]  # one batch, the second row padded
    results = llm.trace(texts, logit_lens=3)
    layers = hf_model.config.num_hidden_layers
    for ids, got in zip(texts, results):
        with torch.no_grad():
            out = hf_model(torch.tensor([ids]), output_hidden_states=True,
                           output_attentions=True)
        hidden = [h[0].numpy() for h in out.hidden_states]  # layers + 1, last after the norm
        assert got.residual.shape == (layers + 1, len(ids), hidden[0].shape[-1])
        for i in range(layers):
            np.testing.assert_allclose(got.residual[i], hidden[i], atol=TOL, rtol=TOL,
                                       err_msg=f"residual {i}")
        normed = np.asarray(_final_norm(llm, got.residual[-1]))
        np.testing.assert_allclose(normed, hidden[-1], atol=TOL, rtol=TOL)
        attn = np.stack([a[0].numpy() for a in out.attentions])  # [layers, heads, n, n]
        assert got.attention.shape == attn.shape
        np.testing.assert_allclose(got.attention, attn, atol=TOL)
        np.testing.assert_allclose(got.attention.sum(-1), 1.0, atol=1e-5)
        assert np.all(np.triu(got.attention, k=1) == 0.0)  # causal: nothing from the future
        np.testing.assert_allclose(got.logits, out.logits[0].numpy(), atol=TOL, rtol=TOL)
        # The lens' last row is the model's own prediction.
        logprobs = torch.log_softmax(out.logits[0], -1).numpy()
        top = np.argsort(-logprobs, axis=-1)[:, :3]
        np.testing.assert_array_equal(got.lens_ids[-1], top)
        np.testing.assert_allclose(got.lens_logprobs[-1],
                                   np.take_along_axis(logprobs, top, -1), atol=TOL)
        assert got.lens_ids.shape == (layers + 1, len(ids), 3)


def _final_norm(llm, residual):
    from flax import nnx

    model = nnx.merge(llm.programs.graphdef, llm.programs.state)
    return model.final_norm(residual[None])[0]


def test_trace_unchanged_by_batching(tiny_hf):
    _, directory = tiny_hf("llama-gqa")
    llm = LLM.load(directory)
    short, long = _ids(6, 3), _ids(40, 4)
    alone = llm.trace([short])[0]
    batched = llm.trace([long, short])[1]  # padded to the long row's bucket
    assert batched.token_ids == short and batched.lens_ids is None
    np.testing.assert_allclose(batched.residual, alone.residual, atol=1e-5)
    np.testing.assert_allclose(batched.attention, alone.attention, atol=1e-6)


def test_trace_bad_input(tiny_hf):
    _, directory = tiny_hf("llama-gqa")
    llm = LLM.load(directory)
    with pytest.raises(ConfigError, match="logit_lens must be an int >= 0"):
        llm.trace([[1, 2]], logit_lens=-1)
    with pytest.raises(ConfigError, match="more than the vocabulary"):
        llm.trace([[1, 2]], logit_lens=10**6)
    with pytest.raises(ConfigError, match="text 1 is empty"):
        llm.trace([[1, 2], []])
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        llm.trace([[1, 10**6]])
    with pytest.raises(ConfigError, match="more than the model's context"):
        llm.trace([[1] * (llm.config.max_seq_len + 1)])


def test_token_labels_show_whitespace():
    assert token_label(" the\n") == "\u2423the\u21b5"
    assert token_label("") == "\u2205"


def test_attention_command_draws_png(tiny_hf, tmp_path, capsys):
    _, directory = tiny_hf("llama-gqa")
    out = tmp_path / "attn.png"
    assert main(["attention", str(directory), "hello world, hello", "--layer", "-1",
                 "--head", "1", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "tokens" in capsys.readouterr().out
    # Mean over heads, layer 0: another picture.
    mean = tmp_path / "mean.png"
    assert main(["attention", str(directory), "hello world, hello", "--layer", "0",
                 "--out", str(mean)]) == 0
    assert mean.read_bytes() != out.read_bytes()


@pytest.mark.parametrize("args, message", [
    (["--layer", "2"], "--layer 2: the model has 2 layers (0 to 1"),
    (["--layer", "0", "--head", "4"], "--head 4: the model has 4 attention heads"),
    (["--layer", "0", "--head", "-1"], "--head -1: a head index is >= 0"),
    (["--layer", "0", "--out", "/nonexistent/a.png"], "is not a writable directory"),
    (["--layer", "0", "--out", "attn.jpg"], "written as PNG"),
])
def test_attention_command_errors(tiny_hf, capsys, args, message):
    _, directory = tiny_hf("llama-gqa")
    assert main(["attention", str(directory), "hello world"] + args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_attention_console_script(tiny_hf, tmp_path):
    """The installed `flaxlm` script reaches the command (the other tests run in-process)."""
    _, directory = tiny_hf("gpt2")
    out = tmp_path / "a.png"
    flaxlm = str(Path(sys.executable).with_name("flaxlm"))
    run = subprocess.run([flaxlm, "attention", str(directory),
                          "some text", "--layer", "1", "--out", str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert out.stat().st_size > 1000
