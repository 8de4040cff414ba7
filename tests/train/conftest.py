"""Shared fixtures of the training tests: a small text corpus and a tiny recipe."""

from __future__ import annotations

import functools
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.train.recipe import Recipe

WORDS = ("the cat dog bird sat ran flew on under over a mat tree house red blue small big "
         "quickly slowly and then").split()

# An inline model small enough to compile in a few seconds (2 layers, GQA 2/1).
TINY_MODEL = dict(vocab_size=320, embed_dim=32, num_layers=2, num_heads=2,
                  num_kv_heads=1, head_dim=16, mlp_dim=64, max_seq_len=64)


def random_rows(num_rows: int, seq_len: int = 17, seed: int = 0,
                vocab_size: int = TINY_MODEL["vocab_size"]):
    """Random rows of two packed documents each (the second starts at a random column)."""
    from flaxlm.train.data import Batch

    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, (num_rows, seq_len)).astype(np.int32)
    cut = rng.integers(3, seq_len - 3, num_rows)[:, None]
    columns = np.arange(seq_len)[None, :]
    segments = np.where(columns < cut, 1, 2).astype(np.int32)
    positions = np.where(columns < cut, columns, columns - cut).astype(np.int32)
    return Batch(tokens=tokens, segment_ids=segments, positions=positions)


def accum_batch(batch, accum: int = 1):
    """Rows [batch, seq] -> [accum, batch / accum, seq] (the train step's layout)."""
    return jax.tree.map(lambda x: x.reshape(accum, -1, x.shape[-1]), batch)


@functools.lru_cache(maxsize=None)
def initial_state(config, opt):
    """(graphdef, TrainState) of a float32, remat-free model of `config` (seed 0), cached."""
    from flax import nnx

    from flaxlm.model import Decoder
    from flaxlm.train.step import new_state

    return new_state(Decoder(config.replace(remat="none", dtype="float32"), rngs=nnx.Rngs(0)),
                     opt, seed=0)


@functools.lru_cache(maxsize=None)
def compiled_steps(config, mesh: str, opt):
    """`compile_steps` for `config` over all devices ("data=1": the first device only)."""
    from flax import nnx

    from flaxlm.model import Decoder
    from flaxlm.model.sharding import make_mesh
    from flaxlm.train.step import compile_steps

    _, state = initial_state(config, opt)
    devices = jax.devices() if mesh != "data=1" else jax.devices()[:1]
    return compile_steps(nnx.graphdef(Decoder(config, rngs=nnx.Rngs(0))), opt, state,
                         make_mesh(mesh, devices))


def fresh_state(config, mesh: str, opt):
    """A copy of the cached initial state placed on `mesh`'s shardings (steps donate it)."""
    steps = compiled_steps(config, mesh, opt)
    state = jax.tree.map(lambda x: jnp.array(x, copy=True), initial_state(config, opt)[1])
    return jax.device_put(state, steps.state_sharding)


def write_corpus(directory, num_documents: int = 40, seed: int = 0):
    """`num_documents` text files of simple repetitive English (a learnable corpus)."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(num_documents):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) + "."
                     for _ in range(rng.randint(2, 12))]
        (directory / f"doc{i:03d}.txt").write_text(" ".join(sentences).capitalize() + "\n")
    return directory


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def straight(corpus, tmp_path_factory):
    """(RunResult, run directory) of the test recipe's six steps in one go (checkpoints
    at 3 and 6). Tests that change a run work on a copy."""
    from flaxlm.train.loop import train

    run_dir = tmp_path_factory.mktemp("straight")
    return train(tiny_recipe(corpus), run_dir), run_dir


def tiny_recipe(corpus_dir, **sections) -> Recipe:
    """The test recipe; `sections` override tables, e.g. train={"steps": 4}."""
    data = {
        "model": dict(TINY_MODEL),
        "tokenizer": {"source": "train", "vocab_size": 300},
        "data": {"files": [str(corpus_dir / "*.txt")], "seq_len": 32, "eval_fraction": 0.1,
                 "read_threads": 1, "prefetch": 8},
        "optimizer": {"lr": 1e-2, "warmup_steps": 2, "decay_steps": 6},
        "train": {"steps": 6, "batch_size": 8},
        "checkpoint": {"every": 3, "keep": 5},
        "log": {"every": 1, "eval_every": 3, "eval_batches": 2, "progress": False,
                "tensorboard": True, "plot": True},
    }
    for name, table in sections.items():
        data[name] = {**data.get(name, {}), **table}
    return Recipe.from_dict(data, source="test recipe")


def to_toml(recipe: Recipe) -> str:
    """A recipe as TOML text (strings, numbers, booleans and lists of strings)."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines = []
    for section, table in recipe.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {value(v)}" for key, v in table.items()]
    return "\n".join(lines) + "\n"
