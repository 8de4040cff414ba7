"""Tiny models and data files shared by the eval tests."""

import pytest

from flaxlm.infer.llm import LLM
from tests.hf_models import make_hf_model, save_tokenizer


@pytest.fixture(scope="package")
def tiny_dir(tmp_path_factory):
    """A tiny random llama with a BPE tokenizer, saved as an HF directory."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    make_hf_model("llama-gqa", seed=11).save_pretrained(directory, safe_serialization=True)
    save_tokenizer(directory, 320)
    return directory


@pytest.fixture(scope="package")
def tiny_llm(tiny_dir):
    return LLM.load(tiny_dir)
