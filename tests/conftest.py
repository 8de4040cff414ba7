"""Test-wide settings: CPU only, eight host devices (for the sharding tests), offline."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight CPU devices, so sharded and unsharded runs can be compared in-process
# (DESIGN.md: Sharding). Unsharded code runs on the first device as before.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The int8 matmul's CPU block size, fixed so no test process runs the first-use probe
# (tests/model/test_int8_blocks.py tests the probe and its record on their own).
os.environ.setdefault("FLAXLM_INT8_BLOCK_BYTES", str(1 << 22))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, float32, loaded once."""
    from flaxlm.model import load

    return load("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_hf():
    """transformers' own float32 load of the same GGUF: the reference."""
    import torch
    import transformers

    from flaxlm.model.embedded import smollm2_gguf_path

    path = smollm2_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """(name, seed) -> (HF model, directory holding it and a trained tokenizer), built once."""
    from tests.hf_models import make_hf_model, save_tokenizer

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
