"""JAX's persistent compilation cache, on by default, so a second start compiles nothing.

Compiled programs are written to `$FLAXLM_COMPILE_CACHE_DIR`, else
`$XDG_CACHE_HOME/flaxlm/xla` (`~/.cache/flaxlm/xla`), and read back by any later
process that compiles the same program for the same devices and flags.
`FLAXLM_COMPILE_CACHE=0` turns it off; a cache directory the user set in JAX's
own config (`jax_compilation_cache_dir`) is left as it is.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax


def cache_home() -> Path:
    """flaxlm's directory under the user's cache: `$XDG_CACHE_HOME/flaxlm`, else
    `~/.cache/flaxlm`."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "flaxlm"


def compile_cache_dir() -> Path | None:
    """Where flaxlm keeps compiled programs, or None when the cache is off."""
    if os.environ.get("FLAXLM_COMPILE_CACHE", "1").strip().lower() in ("0", "false", "off", "no"):
        return None
    given = os.environ.get("FLAXLM_COMPILE_CACHE_DIR")
    if given:
        return Path(given).expanduser()
    return cache_home() / "xla"


def enable_compile_cache() -> str | None:
    """Point JAX's persistent cache at `compile_cache_dir()` (every program, however fast
    it compiled); returns the directory in use, or None when the cache is off."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    path = compile_cache_dir()
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # a read-only home: run without the cache rather than fail
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return str(path)
