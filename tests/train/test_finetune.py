"""Fine-tuning runs on a tiny random llama: one LoRA step equals PEFT + torch.optim.AdamW,
only the trainable part changes (LoRA, prompt tuning, full with frozen embeddings), resume
after SIGTERM is bitwise equal to a straight run, export to PEFT / merged HF, bad input."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from flaxlm.model import flat_params, load
from flaxlm.model.cli import main
from flaxlm.model.sharding import make_mesh
from flaxlm.train import finetune as ft_lib
from flaxlm.train import loop as loop_lib
from flaxlm.train.data import Batch
from flaxlm.train.metrics import read_metrics
from flaxlm.train.optim import optimizer
from flaxlm.train.recipe import OptimizerConfig, Recipe
from flaxlm.train.step import TrainState, compile_steps, put_batch

from tests.hf_models import hf_logits, jitted, make_hf_model
from tests.train.conftest import to_toml
from tests.train.resume import assert_same_state, stop_then_resume

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
WORDS = "red blue green cat dog bird one two three big small".split()


def save_chat_tokenizer(directory) -> None:
    """A byte-level BPE with ChatML specials (<|im_end|> ends a turn and is the EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS) * 30, "user assistant system\n" * 30], trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "bos_token": None, "chat_template": CHATML,
         "tokenizer_class": "PreTrainedTokenizerFast"}))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("chat-llama")
    make_hf_model("llama-gqa", seed=3).save_pretrained(directory, safe_serialization=True)
    save_chat_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    """48 two-turn chats: the reply repeats the colour the user named (learnable)."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    lines = []
    for _ in range(48):
        words = list(rng.choice(WORDS, 4))
        lines.append(json.dumps({"messages": [
            {"role": "user", "content": " ".join(words)},
            {"role": "assistant", "content": words[0]},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": f"{words[0]} {words[1]}"}]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def recipe_for(base_dir, chats, **finetune) -> Recipe:
    return Recipe.from_dict({
        "finetune": {"base": str(base_dir), "method": "lora", "lora_rank": 4,
                     "lora_alpha": 8.0, "report_examples": 0, **finetune},
        "data": {"files": [str(chats)], "seq_len": 48, "eval_fraction": 0.1},
        "optimizer": {"lr": 3e-2, "warmup_steps": 0, "weight_decay": 0.0},
        "train": {"steps": 3, "batch_size": 8},
        "checkpoint": {"every": 3, "keep": 5},
        "log": {"every": 1, "eval_every": 3, "eval_batches": 1, "progress": False,
                "tensorboard": False, "plot": False},
    }, source="test recipe")


# ---------------------------------------------------------------- one step against PEFT

def test_lora_step_equals_peft_and_torch_adamw(tmp_path, base_dir):
    """Same base, same random adapter (A and B non-zero), same masked batch, AdamW
    (betas 0.9/0.999, decoupled weight decay 0.1, no clipping): the adapter update, the
    loss and the gradient norm agree with PEFT + torch.optim.AdamW.

    eps is 1e-2, near the gradients' scale (rms ~0.04): with a tiny eps Adam's first
    update is lr * g / (|g| + eps) ~ lr * sign(g), which hides the gradients' magnitudes
    and turns float32 rounding in a near-zero gradient into a whole lr of difference (a
    1e-7 gradient of this test moved 9e-6 at eps 1e-8). At this eps every element's
    update depends on its gradient smoothly, and eps's placement (outside the square
    root, as both define it) matters. lr 0.1 keeps the updates far above the float32
    rounding of the parameters they are added to."""
    import peft
    import transformers

    from flaxlm.model.lora import adapters, lora_filter
    from flaxlm.model.peft_io import load_adapter

    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32,
                                                           attn_implementation="eager")
    reference = peft.get_peft_model(hf, peft.LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj"]))
    reference.save_pretrained(tmp_path / "before")
    model, _ = load(base_dir)
    assert load_adapter(model, tmp_path / "before") == "lora"
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 300, (2, 33)).astype(np.int32)
    loss_mask = (rng.random((2, 33)) < 0.6).astype(np.int32)
    batch = Batch(tokens=tokens[None], segment_ids=np.ones_like(tokens)[None],
                  positions=np.broadcast_to(np.arange(33, dtype=np.int32), (1, 2, 33)).copy(),
                  loss_mask=loss_mask[None])
    settings = OptimizerConfig(lr=0.1, warmup_steps=0, b1=0.9, b2=0.999, eps=1e-2,
                               weight_decay=0.1, clip_norm=0.0)

    graphdef, params, frozen = nnx.split(model, lora_filter, ...)
    opt = optimizer(settings, total_steps=10)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt.init(params),
                       rng=jax.random.PRNGKey(0))
    steps = compile_steps(graphdef, opt, jax.eval_shape(lambda s: s, state),
                          make_mesh("data=1", jax.devices()[:1]), frozen=frozen)
    before = {k: np.asarray(v) for k, v in nnx.to_flat_state(params)}
    new, metrics = steps.train(jax.device_put(state, steps.state_sharding),
                               put_batch(batch, steps.train_batch_sharding))

    trainable = [p for p in reference.parameters() if p.requires_grad]
    adamw = torch.optim.AdamW(trainable, lr=0.1, betas=(0.9, 0.999), eps=1e-2,
                              weight_decay=0.1)
    labels = np.where(loss_mask == 1, tokens, -100)
    out = reference(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                    attention_mask=torch.ones(2, 33, dtype=torch.long),
                    labels=torch.as_tensor(labels, dtype=torch.long))
    out.loss.backward()
    grad_norm = torch.sqrt(sum((p.grad ** 2).sum() for p in trainable)).item()
    adamw.step()
    reference.save_pretrained(tmp_path / "after")

    np.testing.assert_allclose(float(metrics.loss), out.loss.item(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics.grad_norm), grad_norm, rtol=1e-5)
    assert float(metrics.tokens) == loss_mask[:, 1:].sum()
    theirs_model, _ = load(base_dir)
    load_adapter(theirs_model, tmp_path / "after")
    theirs = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(theirs_model, lora_filter))}
    ours = {k: np.asarray(v) for k, v in nnx.to_flat_state(new.params)}
    assert ours.keys() == theirs.keys() == before.keys() and len(adapters(model)) == 14
    ours_update = np.concatenate([(ours[k] - before[k]).ravel() for k in sorted(ours)])
    theirs_update = np.concatenate([(theirs[k] - before[k]).ravel() for k in sorted(ours)])
    assert np.linalg.norm(theirs_update) > 1e-3
    relative = np.linalg.norm(ours_update - theirs_update) / np.linalg.norm(theirs_update)
    assert relative <= 1e-5, relative


def test_lora_dropout_is_on_in_training_only(base_dir):
    """The train step draws LoRA dropout from the state's RNG (a different mask for another
    RNG, the same for the same); the eval step and a plain forward have none."""
    from flaxlm.model.lora import LoraConfig, adapters, apply_lora, lora_filter
    from flaxlm.train.step import loss_sum

    model, _ = load(base_dir)
    apply_lora(model, LoraConfig(rank=4, alpha=8.0, dropout=0.5), nnx.Rngs(params=0, dropout=1))
    for i, lora in enumerate(adapters(model).values()):  # B is zero after apply_lora
        lora.b[...] = 0.5 * jax.random.normal(jax.random.key(i), lora.b.shape)
    graphdef, params, frozen = nnx.split(model, lora_filter, ...)
    opt = optimizer(OptimizerConfig(lr=1e-3, warmup_steps=0), total_steps=10)
    steps = compile_steps(graphdef, opt, jax.eval_shape(lambda p: TrainState(
        step=jnp.zeros((), jnp.int32), params=p, opt_state=opt.init(p),
        rng=jax.random.PRNGKey(0)), params), make_mesh("data=1", jax.devices()[:1]),
        frozen=frozen)
    tokens = np.random.default_rng(0).integers(0, 300, (1, 2, 17)).astype(np.int32)
    batch = Batch(tokens=tokens, segment_ids=np.ones_like(tokens),
                  positions=np.broadcast_to(np.arange(17, dtype=np.int32), tokens.shape).copy())

    def train_loss(seed: int) -> float:
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=opt.init(params), rng=jax.random.PRNGKey(seed))
        state = jax.device_put(jax.tree.map(jnp.copy, state), steps.state_sharding)
        return float(steps.train(state, put_batch(batch, steps.train_batch_sharding))[1].loss)

    evaluated = steps.eval(jax.device_put(params, steps.state_sharding.params),
                           put_batch(jax.tree.map(lambda x: x[0], batch),
                                     steps.eval_batch_sharding))
    plain = loss_sum(graphdef, params, jax.tree.map(lambda x: x[0], batch), frozen)
    assert float(evaluated.mean) == pytest.approx(float(plain.mean), rel=1e-6)
    assert train_loss(0) == train_loss(0)
    assert len({train_loss(0), train_loss(1), float(plain.mean)}) == 3


# ---------------------------------------------------------------- what trains

def _paths(state) -> set[str]:
    return {".".join(map(str, p)) for p, _ in nnx.to_flat_state(state)}


@pytest.mark.parametrize("method, settings, trained", [
    ("lora", {}, r"\.lora\.[ab]$"),
    ("prompt", {"prompt_tokens": 4, "prompt_init": "random"}, r"^soft_prompt\.embedding$"),
    ("full", {"freeze": ["^embed\\."]}, r"^(?!embed\.)"),
])
def test_only_the_trainable_part_changes(tmp_path, base_dir, chats, method, settings, trained):
    import re

    recipe = recipe_for(base_dir, chats, method=method, **settings)
    run, info = ft_lib.prepare_finetune(recipe, tmp_path)
    names = _paths(run.state.params)  # the state (and checkpoints) hold the trainable part only
    assert names and all(re.search(trained, n) for n in names)
    assert info.params == sum(x.size for x in jax.tree.leaves(run.state.params)) < info.total
    assert info.optimizer_bytes == sum(x.nbytes for x in jax.tree.leaves(run.state.opt_state))
    result = loop_lib.execute(run)
    assert result.step == 3 and result.eval_loss is not None
    tuned, _, step, _ = ft_lib.restore_finetuned(tmp_path)
    base = {k: np.asarray(v) for k, v in flat_params(load(base_dir)[0]).items()}
    after = {k: np.asarray(v) for k, v in flat_params(tuned).items()}
    changed = {k for k in after if k not in base or not np.array_equal(after[k], base[k])}
    assert step == 3 and changed and all(re.search(trained, k) for k in changed)
    if method == "full":  # every trainable weight moved; the frozen embedding did not
        assert changed == {k for k in after if re.search(trained, k)}
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


# ---------------------------------------------------------------- resume

def test_resume_after_sigterm_is_bitwise_equal(tmp_path, base_dir, chats, monkeypatch):
    """LoRA with dropout (so the step RNG matters): SIGTERM during step 2's logging saves
    and stops; the same command resumes; the end state equals a straight run's bit for bit."""
    recipe = recipe_for(base_dir, chats, lora_dropout=0.2)
    recipe = Recipe.from_dict({**recipe.to_dict(), "train": {**recipe.to_dict()["train"],
                                                              "steps": 5}}, source="r")
    straight = ft_lib.finetune(recipe, tmp_path / "straight")
    stopped, resumed = stop_then_resume(recipe, tmp_path / "resumed", monkeypatch, 2)
    assert stopped.stopped_by == "SIGTERM" and stopped.last_checkpoint == stopped.step < 5
    assert resumed.resumed_from == stopped.step and resumed.step == 5
    assert resumed.data_state == straight.data_state
    a, b = assert_same_state(tmp_path / "straight", tmp_path / "resumed")
    assert int(a.step) == int(b.step) == 5
    no_dropout = recipe_for(base_dir, chats)
    with pytest.raises(Exception, match="cannot resume: finetune.lora_dropout was 0.2"):
        ft_lib.prepare_finetune(no_dropout, tmp_path / "resumed")


# ---------------------------------------------------------------- export

@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base_dir, chats):
    run_dir = tmp_path_factory.mktemp("lora-run")
    ft_lib.finetune(recipe_for(base_dir, chats), run_dir)
    return run_dir


def test_export_adapter_loads_in_peft_and_merged_equals_unmerged(tmp_path, capsys, base_dir,
                                                                 lora_run):
    import peft
    import transformers

    assert main(["export", str(lora_run), str(tmp_path / "adapter")]) == 0
    assert main(["export", str(lora_run), str(tmp_path / "merged"), "--merge"]) == 0
    tuned, _, _, _ = ft_lib.restore_finetuned(lora_run)
    tokens = np.random.default_rng(0).integers(0, 300, (2, 24))
    ours = jitted(tuned)(tokens)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32,
                                                           attn_implementation="eager")
    theirs = hf_logits(peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval(), tokens)
    assert np.abs(ours - theirs).max() <= 1e-4
    assert np.abs(ours - jitted(load(base_dir)[0])(tokens)).max() > 1e-3  # it was trained
    merged, _ = load(tmp_path / "merged")
    assert np.abs(jitted(merged)(tokens) - ours).max() <= 1e-4
    capsys.readouterr()
    assert main(["export", str(lora_run), str(tmp_path / "adapter")]) == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err
    assert main(["export", str(lora_run), str(tmp_path / "adapter"), "--overwrite"]) == 0


# ---------------------------------------------------------------- bad input

@pytest.fixture
def recipe_file(tmp_path, base_dir, chats):
    path = tmp_path / "recipe.toml"
    path.write_text(to_toml(recipe_for(base_dir, chats)))
    return path


@pytest.mark.parametrize("overrides, message", [
    (['finetune.method="qlora"'], "finetune.method 'qlora' is not one of full, lora, prompt"),
    (["finetune.lora_rank=0"], "finetune.lora_rank must be > 0, got 0"),
    (["finetune.lora_alpha=0"], "finetune.lora_alpha must be > 0, got 0.0"),
    (['finetune.method="prompt"', "finetune.prompt_tokens=0"],
     "finetune.prompt_tokens must be > 0, got 0"),
    (['finetune.lora_targets=["qq_proj"]'], "'qq_proj' matches no module; the projections are"),
    (['finetune.method="full"', 'finetune.freeze=["^nope"]'],
     "finetune.freeze '^nope' matches no parameter"),
    (['finetune.quantize="int8"', 'finetune.method="full"'], "freezes the base"),
    (['data.train_on="first"'], "data.train_on 'first' is not one of all, last"),
    (['finetune.base="/nonexistent"'], "unknown model '/nonexistent'"),
])
def test_bad_settings_fail_before_compiling(capsys, monkeypatch, recipe_file, tmp_path,
                                            overrides, message):
    from tests.train.test_cli import no_training

    no_training(monkeypatch)
    argv = ["finetune", "--config", str(recipe_file), "--out", str(tmp_path / "run")]
    assert main(argv + [a for o in overrides for a in ("--set", o)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flaxlm finetune: error: ") and message in err[0]


def test_bad_data_is_named(capsys, monkeypatch, recipe_file, tmp_path):
    from tests.train.test_cli import no_training

    no_training(monkeypatch)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"text": "x"}\n')
    argv = ["finetune", "--config", str(recipe_file), "--out", str(tmp_path / "run"),
            "--set", f'data.files=["{bad}"]']
    assert main(argv) == 2
    assert f"{bad}:2: needs 'messages' (a chat) or 'prompt' and 'completion'" in \
        capsys.readouterr().err
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n' * 4)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{bad}:" in err and ": the conversation has no assistant turn (roles: user)" in err


def test_report_scores_base_and_tuned_with_flaxlm_eval(capsys, lora_run):
    """The closing report runs `flaxlm eval --task docstrings --chat` on the base and on
    the base + the run's exported adapter (2 held-out examples here)."""
    import dataclasses

    from flaxlm.train.cli import _report

    recipe = ft_lib.read_run_file(lora_run)[0]
    recipe = dataclasses.replace(recipe, finetune=dataclasses.replace(
        recipe.finetune, report_examples=2, report_max_new_tokens=4))
    _report(lora_run, recipe)
    report = json.loads((lora_run / "report.json").read_text())
    assert report["examples"] == 2 and set(report) >= {"base", "tuned"}
    for side in ("base", "tuned"):
        assert set(report[side]) == {"loss", "rougeL"} and report[side]["loss"] > 0
    assert report["base"]["loss"] != report["tuned"]["loss"]  # the adapter was applied
    assert (lora_run / "export" / "adapter_config.json").is_file()
    assert "held-out docstrings (2 examples): loss" in capsys.readouterr().out


def test_train_and_finetune_recipes_are_not_mixed(capsys, recipe_file, tmp_path):
    assert main(["train", "--config", str(recipe_file), "--out", str(tmp_path / "a")]) == 2
    assert "has a [finetune] table: run it with `flaxlm finetune`" in capsys.readouterr().err
    plain = tmp_path / "plain.toml"
    plain.write_text('[model]\npreset = "tiny-llama"\n')
    assert main(["finetune", "--config", str(plain), "--out", str(tmp_path / "b")]) == 2
    assert "no [finetune] table" in capsys.readouterr().err
