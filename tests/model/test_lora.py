"""LoRA and prompt tuning in the model: HF PEFT's forward, merge, int8 bases, what is
differentiated, dropout, the soft prompt's masks and cache, and bad settings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxlm.model import ConfigError, dequantize_model, quantize
from flaxlm.model.cache import KVCache
from flaxlm.model.lora import (DEFAULT_TARGETS, LoraConfig, LoraParam, adapters, apply_lora,
                               lora_filter, merge_lora)
from flaxlm.model.peft_io import load_adapter
from flaxlm.model.prompt_tuning import PromptTuning, apply_prompt_tuning, prompt_filter
from tests.hf_models import jitted
from tests.peft_models import (SEQ, ids, load_base, peft_logits, peft_lora, randomize_adapters,
                                 save_base)

FORWARD_ATOL = 1e-5  # LoRA on top of the same base: flaxlm vs PEFT + transformers, float32
# Merged vs unmerged: W + A @ B * s is rounded once to float32. With the deliberately large
# random adapters here (|A @ B * s| several times |W|) that moves logits by ~5e-5; PEFT's own
# merge_and_unload moves its logits by ~1e-5 on adapters of that size. The bound for
# a merged export against the unmerged adapter is 1e-4.
MERGE_ATOL = 1e-4


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    out = {}
    for name in ("llama-gqa", "qwen2-bias"):
        out[name] = tmp_path_factory.mktemp(name)
        save_base(name, out[name])
    return out


def _jit_grad(loss, wrt):
    """The gradient of loss(model) with respect to the `wrt` variables, compiled (eager
    NNX calls are slow on a loaded 2-core machine)."""
    return nnx.jit(lambda m: nnx.grad(loss, argnums=nnx.DiffState(0, wrt))(m))


@pytest.mark.parametrize("name,settings", [
    ("llama-gqa", {}),
    ("llama-gqa", {"use_rslora": True, "r": 8, "lora_alpha": 4}),
    ("llama-gqa", {"target_modules": ["q_proj", "v_proj"]}),
    ("qwen2-bias", {}),  # biased q/k/v: PEFT adds the adapter after the bias
])
def test_forward_equals_peft(tmp_path, base_dirs, name, settings):
    reference = peft_lora(name, **settings)
    reference.save_pretrained(tmp_path)
    model = load_base(base_dirs[name])
    tokens = ids(2, SEQ, model.config.vocab_size)
    base = jitted(model)(tokens)
    assert load_adapter(model, tmp_path) == "lora"
    ours, theirs = jitted(model)(tokens), peft_logits(reference, tokens)
    assert np.abs(ours - base).max() > 1e-2  # the adapter matters
    assert np.abs(ours - theirs).max() <= FORWARD_ATOL


def test_fresh_adapter_is_peft_init_and_changes_nothing(base_dirs):
    model = load_base(base_dirs["llama-gqa"])
    tokens = ids(1, SEQ, model.config.vocab_size)
    before = jitted(model)(tokens)
    paths = apply_lora(model, LoraConfig(rank=4, alpha=8), nnx.Rngs(0))
    assert sorted(paths) == sorted(f"layers.{i}.{p}" for i in range(2) for p in
                                   ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
                                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
    np.testing.assert_array_equal(jitted(model)(tokens), before)  # B = 0
    lora = adapters(model)["layers.0.mlp.down_proj"]
    a = np.asarray(lora.a[...])
    bound = 1 / np.sqrt(model.config.mlp_dim)  # kaiming_uniform_(a=sqrt(5)): 1 / sqrt(fan_in)
    assert a.shape == (model.config.mlp_dim, 4) and np.abs(a).max() <= bound
    assert np.abs(a).max() > 0.9 * bound and abs(a.std() - bound / np.sqrt(3)) < 0.1 * bound
    assert not np.asarray(lora.b[...]).any()


def test_merge_equals_unmerged_and_leaves_no_trace(base_dirs):
    model = load_base(base_dirs["qwen2-bias"])
    fresh = load_base(base_dirs["qwen2-bias"])
    tokens = ids(2, SEQ, model.config.vocab_size)
    apply_lora(model, LoraConfig(rank=4, alpha=16, rslora=True), nnx.Rngs(0))
    randomize_adapters(model)
    unmerged = jitted(model)(tokens)
    merged_paths = merge_lora(model)
    assert len(merged_paths) == 14 and not adapters(model)
    merged = jitted(model)(tokens)
    assert np.abs(merged - unmerged).max() <= MERGE_ATOL
    assert np.abs(merged - jitted(fresh)(tokens)).max() > 1e-2
    # The merged model is an ordinary model: the same program as one never adapted.
    lower = lambda m: jax.jit(lambda s, t: nnx.merge(nnx.graphdef(m), s)(t)).lower(
        nnx.state(m), tokens).as_text()
    assert lower(model) == lower(fresh)


def test_only_adapters_are_differentiated(base_dirs):
    model = load_base(base_dirs["llama-gqa"])
    apply_lora(model, LoraConfig(rank=2, alpha=4, targets=("q_proj", "down_proj")), nnx.Rngs(0))
    tokens = jnp.asarray(ids(1, 16, model.config.vocab_size))

    def loss(m):
        return jnp.mean(jax.nn.log_softmax(m(tokens))[..., 0])

    grads = _jit_grad(loss, lora_filter)(model)
    flat = nnx.to_flat_state(grads)
    assert flat and all(isinstance(v, LoraParam) for _, v in flat)
    names = {".".join(map(str, p)) for p, _ in flat}
    assert names == {f"layers.{i}.{p}.lora.{m}" for i in range(2)
                     for p in ("attn.q_proj", "mlp.down_proj") for m in "ab"}
    # A fresh adapter (B = 0): B gets a gradient, A none yet (as in PEFT).
    g = dict((".".join(map(str, p)), np.asarray(v.get_value())) for p, v in flat)
    assert np.abs(g["layers.0.attn.q_proj.lora.b"]).max() > 0
    assert not g["layers.0.attn.q_proj.lora.a"].any()


def test_dropout_only_in_training_mode(base_dirs):
    model = load_base(base_dirs["llama-gqa"])
    tokens = jnp.asarray(ids(1, 16, model.config.vocab_size))
    apply_lora(model, LoraConfig(rank=4, alpha=8, dropout=0.5), nnx.Rngs(params=0, dropout=1))
    randomize_adapters(model)
    plain = load_base(base_dirs["llama-gqa"])
    apply_lora(plain, LoraConfig(rank=4, alpha=8), nnx.Rngs(0))
    for path, lora in adapters(plain).items():
        lora.a[...], lora.b[...] = adapters(model)[path].a[...], adapters(model)[path].b[...]
    run = nnx.jit(lambda m, t: m(t))  # carries the dropout streams' counts in and out
    expected = run(plain, tokens)
    np.testing.assert_allclose(run(model, tokens), expected, atol=1e-6)  # eval by default
    model.train()
    first, second = run(model, tokens), run(model, tokens)
    assert np.abs(first - expected).max() > 1e-3 and np.abs(first - second).max() > 1e-3
    # A train step seeds the masks from its own key: the same key, the same masks.
    nnx.reseed(model, dropout=jax.random.key(7))
    seeded = run(model, tokens)
    nnx.reseed(model, dropout=jax.random.key(7))
    np.testing.assert_array_equal(run(model, tokens), seeded)
    model.eval()
    np.testing.assert_allclose(run(model, tokens), expected, atol=1e-6)


def test_int8_base_with_float_adapters(base_dirs):
    """An int8 base with float adapters computes exactly what the float model with the
    int8 weights' values and the same adapters does: it differs from the float model by
    the int8 rounding of the base weights only."""
    int8_model = quantize(load_base(base_dirs["llama-gqa"]))
    rounded = dequantize_model(int8_model)  # float32 weights = int8 values * scales
    tokens = ids(2, SEQ, int8_model.config.vocab_size)
    before = jitted(int8_model)(tokens)
    for m in (int8_model, rounded):
        apply_lora(m, LoraConfig(rank=4, alpha=8), nnx.Rngs(0))
        randomize_adapters(m)
    lora = adapters(int8_model)["layers.0.attn.o_proj"]
    assert lora.a.dtype == jnp.float32 and lora.a.shape == (4, 16, 4)  # [heads, head_dim, r]
    assert int8_model.layers[0].attn.o_proj.kernel.dtype == jnp.int8
    ours_int8 = jitted(int8_model)(tokens)
    assert np.abs(ours_int8 - before).max() > 1e-2  # the adapters act on the int8 model
    assert np.abs(ours_int8 - jitted(rounded)(tokens)).max() <= FORWARD_ATOL
    grads = _jit_grad(lambda m: jnp.mean(m(jnp.asarray(tokens))), lora_filter)(int8_model)
    assert all(isinstance(v, LoraParam) for _, v in nnx.to_flat_state(grads))
    with pytest.raises(ConfigError, match="int8"):
        merge_lora(int8_model)


@pytest.mark.parametrize("kwargs,message", [
    (dict(rank=0, alpha=8), "rank must be an int > 0"),
    (dict(rank=-2, alpha=8), "rank must be an int > 0"),
    (dict(rank=4, alpha=0), "alpha must be a number > 0"),
    (dict(rank=4, alpha=-1.0), "alpha must be a number > 0"),
    (dict(rank=4, alpha=8, dropout=1.0), "dropout must be in"),
    (dict(rank=4, alpha=8, targets=()), "targets must be non-empty"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LoraConfig(**kwargs)


def test_target_matching_no_module_lists_the_modules(base_dirs):
    model = load_base(base_dirs["llama-gqa"])
    with pytest.raises(ConfigError, match=r"'c_attn' matches no module.*down_proj, gate_proj, "
                                          r"k_proj, o_proj, q_proj, up_proj, v_proj"):
        apply_lora(model, LoraConfig(rank=4, alpha=8, targets=("q_proj", "c_attn")), nnx.Rngs(0))
    assert not adapters(model)  # nothing was changed
    paths = apply_lora(model, LoraConfig(rank=4, alpha=8, targets=(r"layers\.1\..*_proj",)),
                       nnx.Rngs(0))
    assert len(paths) == 7 and all(p.startswith("layers.1.") for p in paths)
    with pytest.raises(ConfigError, match="already has LoRA adapters"):
        apply_lora(model, LoraConfig(rank=4, alpha=8), nnx.Rngs(0))
    assert DEFAULT_TARGETS[0] == "q_proj"


# ------------------------------------------------------------------ prompt tuning

def _prompted(directory, n=4, seed=3):
    model = load_base(directory)
    apply_prompt_tuning(model, PromptTuning(num_virtual_tokens=n), nnx.Rngs(seed))
    return model


def test_soft_prompt_packed_rows_equal_documents_alone(base_dirs):
    model = _prompted(base_dirs["llama-gqa"])
    run = nnx.jit(lambda m, t, p, s: m(t, positions=p, attention_mask=s))
    vocab = model.config.vocab_size
    docs = ids(2, 10, vocab, seed=1)
    alone = np.asarray(run(model, jnp.asarray(docs), None, None))  # one row per document
    packed = jnp.asarray(np.concatenate([docs[0], docs[1], np.zeros(4, int)])[None])
    segments = jnp.asarray([[1] * 10 + [2] * 10 + [0] * 4])
    positions = jnp.asarray([list(range(10)) * 2 + [0] * 4])
    out = np.asarray(run(model, packed, positions, segments))
    assert out.shape == (1, 24, vocab)
    np.testing.assert_allclose(out[0, :10], alone[0], atol=1e-5)
    np.testing.assert_allclose(out[0, 10:20], alone[1], atol=1e-5)


def test_soft_prompt_prefill_and_decode_equal_full_forward(base_dirs):
    model = _prompted(base_dirs["llama-gqa"], n=3)
    tokens = jnp.asarray(ids(2, 12, model.config.vocab_size))
    full = np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens))
    prefill = nnx.jit(lambda m, t, c: m(t, cache=c, soft_prompt=True))
    step = nnx.jit(lambda m, t, c: m(t, cache=c))
    logits, cache = prefill(model, tokens[:, :8], KVCache.init(model.config, 2, 3 + 12))
    assert np.asarray(cache.lengths).tolist() == [11, 11]  # 3 virtual + 8 tokens
    np.testing.assert_allclose(logits, full[:, :8], atol=1e-5)
    for t in range(8, 12):
        logits, cache = step(model, tokens[:, t:t + 1], cache)
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5)


def test_soft_prompt_is_the_only_trainable_part(base_dirs):
    model = _prompted(base_dirs["llama-gqa"])
    tokens = jnp.asarray(ids(1, 8, model.config.vocab_size))
    grads = _jit_grad(lambda m: jnp.mean(m(tokens)), prompt_filter)(model)
    (path, value), = nnx.to_flat_state(grads)
    assert ".".join(map(str, path)) == "soft_prompt.embedding" and value.shape == (4, 64)
    assert np.abs(np.asarray(value.get_value())).max() > 0


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_virtual_tokens=0), "num_virtual_tokens > 0"),
    (dict(num_virtual_tokens=4, init="zeros"), "is not one of"),
    (dict(num_virtual_tokens=4, init="text"), "needs a non-empty init_text"),
])
def test_bad_prompt_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PromptTuning(**kwargs)
