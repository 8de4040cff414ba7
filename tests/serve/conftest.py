"""Shared by the serving tests: a tiny chat model directory and a free port."""

import json
import shutil
import socket

import pytest

TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_chat(tiny_hf, tmp_path_factory):
    """A tiny llama directory (tests/hf_models.py) whose tokenizer has a chat template."""
    _, source = tiny_hf("llama-gqa", 5)
    directory = tmp_path_factory.mktemp("tiny-chat") / "model"
    shutil.copytree(source, directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return directory
