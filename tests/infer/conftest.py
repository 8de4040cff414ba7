"""Fixtures of the inference tests: tiny random HF models, each saved once per session."""

import pytest

from tests.hf_models import make_hf_model, save_tokenizer


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """(name, seed) -> (HF model, directory holding it and a trained tokenizer), built once."""
    built = {}

    def get(name: str, seed: int = 0):
        if (name, seed) not in built:
            model = make_hf_model(name, seed=seed)
            directory = tmp_path_factory.mktemp(f"{name}-{seed}")
            model.save_pretrained(directory, safe_serialization=True)
            save_tokenizer(directory, model.config.vocab_size)
            built[name, seed] = model, directory
        return built[name, seed]

    return get
