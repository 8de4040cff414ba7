"""Default sampling settings of a model: its generation_config.json, else llama.cpp's.

As transformers and vLLM do, the sampling fields a model's generation_config.json
sets (temperature, top_k, top_p, min_p, repetition_penalty; `do_sample: false`
means greedy) are the defaults of `flaxlm serve` and `flaxlm chat`. A model
without them (a GGUF file such as the embedded SmolLM2, or a directory whose
generation_config.json holds only token ids) gets llama.cpp's chat defaults.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from flaxlm.model.errors import CheckpointError
from flaxlm.model.loading import resolve

LLAMA_CPP_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}
_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
DEFAULTS_HELP = ("Sampling settings a request leaves out come from the model's "
                 "generation_config.json; a model without one samples with llama.cpp's chat "
                 "defaults: temperature 0.8, top_k 40, top_p 0.95, min_p 0.05")


def sampling_defaults(name_or_path: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """(SamplingParams keyword defaults, where they came from) for a model name or path."""
    path = resolve(name_or_path)
    config_path = Path(path) / "generation_config.json"
    if not config_path.is_file():
        return dict(LLAMA_CPP_DEFAULTS), "llama.cpp chat defaults"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config_path}: not readable JSON ({e})") from e
    settings = {k: config[k] for k in _FIELDS if config.get(k) is not None}
    if config.get("do_sample") is False:
        settings["temperature"] = 0.0
    if not settings:
        return dict(LLAMA_CPP_DEFAULTS), "llama.cpp chat defaults"
    if settings.get("top_k") is not None:
        settings["top_k"] = max(int(settings["top_k"]), 0)
    return settings, str(config_path)
