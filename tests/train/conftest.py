"""Shared fixtures of the training tests: a small text corpus and a tiny recipe."""

from __future__ import annotations

import random

import pytest

from flaxlm.train.recipe import Recipe

WORDS = ("the cat dog bird sat ran flew on under over a mat tree house red blue small big "
         "quickly slowly and then").split()

# An inline model small enough to compile in a few seconds (2 layers, GQA 2/1).
TINY_MODEL = dict(family="llama", vocab_size=320, embed_dim=32, num_layers=2, num_heads=2,
                  num_kv_heads=1, head_dim=16, mlp_dim=64, max_seq_len=64)


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
