"""Serving adapters: `LLM.load(base, adapter=DIR)` unmerged or merged, a soft prompt through
the cached programs, and `--adapter` on the command line."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxlm.infer.beam import BeamParams
from flaxlm.infer.llm import LLM
from flaxlm.infer.sampling import SamplingParams
from flaxlm.model import ConfigError, load
from flaxlm.model.cli import main
from flaxlm.model.lora import LoraConfig, adapters, apply_lora
from flaxlm.model.peft_io import save_adapter
from flaxlm.model.prompt_tuning import PromptTuning, apply_prompt_tuning

GREEDY = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def base(tiny_hf):
    return tiny_hf("llama-gqa", 0)[1]


@pytest.fixture(scope="module")
def lora_dir(base, tmp_path_factory):
    model, _ = load(base)
    apply_lora(model, LoraConfig(rank=4, alpha=8), nnx.Rngs(0))
    key = jax.random.key(1)
    for lora in adapters(model).values():
        key, sub = jax.random.split(key)
        lora.b[...] = 0.5 * jax.random.normal(sub, lora.b.shape)
    directory = tmp_path_factory.mktemp("lora")
    save_adapter(model, directory, base_model_name_or_path=str(base))
    return directory


@pytest.fixture(scope="module")
def served(base, lora_dir):
    return LLM.load(base, adapter=lora_dir)


def _greedy_reference(model, prompt_ids, n):
    """Greedy tokens from full forward passes (no cache), one compiled program: the
    sequence is right-padded to its final length, which causal attention ignores."""
    forward = jax.jit(lambda state, x: nnx.merge(nnx.graphdef(model), state)(x))
    ids = np.zeros((1, len(prompt_ids) + n), np.int32)
    ids[0, :len(prompt_ids)] = prompt_ids
    for t in range(len(prompt_ids), len(prompt_ids) + n):
        ids[0, t] = int(jnp.argmax(forward(nnx.state(model), ids)[0, t - 1]))
    return ids[0, len(prompt_ids):].tolist()


def test_lora_served_unmerged_and_merged_alike(base, served, lora_dir):
    merged = LLM.load(base, adapter=lora_dir, merge=True)
    assert adapters(served.model) and not adapters(merged.model)
    prompt = served.tokenizer.encode("The quick brown")
    tokens = served.generate(prompt, GREEDY)[0].token_ids
    assert tokens == merged.generate(prompt, GREEDY)[0].token_ids
    assert tokens == _greedy_reference(served.model, prompt, GREEDY.max_new_tokens)
    plain, _ = load(base)
    x = jnp.asarray([prompt])
    assert np.abs(plain(x) - served.model(x)).max() > 1e-2  # the adapter changes the model


def test_soft_prompt_served_through_the_cache(base, tmp_path):
    """A soft prompt holding the embeddings of tokens P generates exactly what the base
    model generates after the real tokens P: greedy and beam search, through the cache."""
    model, tokenizer = load(base)
    text = "def main():"
    virtual = tokenizer.encode(text)
    apply_prompt_tuning(model, PromptTuning(num_virtual_tokens=len(virtual), init="text",
                                            init_text=text), nnx.Rngs(0), tokenizer)
    save_adapter(model, tmp_path, base_model_name_or_path=str(base))
    prompted, plain = LLM.load(base, adapter=tmp_path), LLM.load(base)
    prompt = tokenizer.encode("Hello, world")
    # 16 new tokens fill the bucket, so every generated cache slot must be reordered right.
    beams = BeamParams(num_beams=2, max_new_tokens=16, ignore_eos=True)
    for params in (GREEDY, beams):
        ours = prompted.generate(prompt, params)[0]
        assert ours.token_ids == plain.generate(virtual + prompt, params)[0].token_ids
    # A conversation holds the virtual tokens in its cache's first slots and feeds each
    # later turn's new tokens after them: every reply is the plain model's after V + prompt.
    for llm in (prompted, plain):
        llm.tokenizer._chat_template = CHATML
    conversation = prompted.conversation(GREEDY)
    for turn in ("Hello, world", "def main(): return 42", "and again"):
        ids = prompted.chat_prompt_ids([*conversation.messages,
                                        {"role": "user", "content": turn}])
        reply = conversation.send(turn)
        text = "".join(reply)
        expected = plain.generate(virtual + ids, GREEDY)[0]
        assert text == expected.text
        assert conversation.fed_tokens < len(ids) or len(conversation.messages) == 2
    with pytest.raises(ConfigError, match="no weights to merge"):
        LLM.load(base, adapter=tmp_path, merge=True)


def test_cli_adapter(base, served, lora_dir, capsys):
    argv = ["generate", "--model", str(base), "--prompt", "The quick brown", "--temperature",
            "0", "--max-new-tokens", "12", "--ignore-eos"]
    assert main(argv + ["--adapter", str(lora_dir)]) == 0
    assert capsys.readouterr().out.strip() == served.generate("The quick brown",
                                                              GREEDY)[0].text.strip()
    assert main(argv + ["--adapter", str(base / "nope")]) != 0
    err = capsys.readouterr().err
    assert "not an adapter directory" in err and err.count("\n") == 1
    assert main(argv + ["--merge"]) != 0
    assert "no adapter given" in capsys.readouterr().err


def test_bad_merge_and_int8(base, lora_dir):
    with pytest.raises(ConfigError, match="no adapter given"):
        LLM.load(base, merge=True)
    with pytest.raises(ConfigError, match="int8"):
        LLM.load(base, adapter=lora_dir, merge=True, quantize="int8")
    int8 = LLM.load(base, adapter=lora_dir, quantize="int8")  # QLoRA-style, unmerged
    assert int8.model.layers[0].attn.q_proj.kernel.dtype == jnp.int8
    assert adapters(int8.model)["layers.0.attn.q_proj"].a.dtype == jnp.float32
