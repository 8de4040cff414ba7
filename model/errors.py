"""The exceptions flaxlm raises for bad input.

Every error a user can cause (a missing file, a corrupt checkpoint, a bad
setting) is one of these, with a message that names the file or setting and
the problem. The CLI prints the message on one line and exits non-zero.
"""


class FlaxlmError(Exception):
    """Base class of every error flaxlm raises on purpose."""


class CheckpointError(FlaxlmError, ValueError):
    """A weights, config or tokenizer file is missing, unreadable or inconsistent."""


class ConfigError(FlaxlmError, ValueError):
    """A model or recipe setting is invalid."""
