"""Tiny models and data files shared by the eval tests."""

import pytest

from flaxlm.infer.llm import LLM


@pytest.fixture(scope="package")
def tiny_dir(tiny_hf):
    """A tiny random llama with a BPE tokenizer, saved as an HF directory."""
    return tiny_hf("llama-gqa", 11)[1]


@pytest.fixture(scope="package")
def tiny_llm(tiny_dir):
    return LLM.load(tiny_dir)
