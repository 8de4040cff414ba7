"""The int8 matmul's block size on XLA:CPU, chosen by measuring this CPU once.

`flaxlm.model.int8` converts an int8 weight to float in blocks of output rows
and multiplies each block while it is in cache. The best block size depends on
the CPU and on how many rows of activations the matmul has: on an AMD EPYC the
batch-1 decode step was fastest with 4 MiB float blocks; on an Intel Xeon with
AVX-512/AMX 4 MiB blocks made int8 decode 0.63x float32 and 128 KiB blocks
1.09x, while prefill and batched decode still want 4 MiB on both
(docs/benchmarks.md, "Int8 weights"). So no size is fixed here: at the first
int8 matmul on a CPU backend a short probe (a few seconds: a chain of int8
matmuls at SmolLM2-135M's layer shapes, for each candidate size and for 1, 4
and 32 rows) picks the fastest per row count, and the choice is kept on disk
per CPU model, core count and jaxlib version in
`$XDG_CACHE_HOME/flaxlm/int8_blocks.json` (`~/.cache/flaxlm/...`), so later
processes read it instead of measuring. `FLAXLM_INT8_BLOCK_BYTES=N` fixes the
size for every row count (no probe); deleting the file measures again.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.model.compile_cache import cache_home
from flaxlm.model.errors import ConfigError

logger = logging.getLogger(__name__)

ENV = "FLAXLM_INT8_BLOCK_BYTES"
CANDIDATES = (1 << 17, 1 << 18, 1 << 20, 1 << 22)   # float bytes of one converted block
PROBE_ROWS = (1, 4, 32)                              # activation rows probed
DEFAULT = 1 << 22                                    # off CPU (unused there) and on failure
# One decoder layer of SmolLM2-135M as (k, n): q, k, v, o, gate, up, down.
_LAYER = ((576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576))
_PROBE_LAYERS = 24   # ~80 MB of int8 weights: more than the caches hold


def block_bytes(rows: int) -> int:
    """Float bytes per converted block for a matmul with `rows` activation rows: the
    choice measured for the largest probed row count <= rows."""
    choice = choices()
    probed = [r for r in sorted(choice) if r <= max(rows, 1)]
    return choice[probed[-1] if probed else min(choice)]


@functools.cache
def choices() -> dict[int, int]:
    """{probed rows: block bytes} for this process: from FLAXLM_INT8_BLOCK_BYTES, the
    on-disk record for this CPU, or a probe (then recorded)."""
    given = os.environ.get(ENV, "").strip()
    if given:
        return {rows: _parse(given) for rows in PROBE_ROWS}
    if jax.default_backend() != "cpu":
        return {rows: DEFAULT for rows in PROBE_ROWS}
    key = machine_key()
    path = record_path()
    known = _read(path).get(key)
    if known is not None:
        return known
    times = measure()
    measured = fastest(times)
    logger.info("int8 block sizes measured on %s: %s (seconds: %s)", key, measured, times)
    _write(path, key, measured)
    return measured


def machine_key() -> str:
    """What the choice depends on: CPU model, core count, jaxlib version."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} | {os.cpu_count()} cores | jaxlib {jax.lib.__version__}"


def record_path() -> Path:
    return cache_home() / "int8_blocks.json"


def measure(layer: tuple[tuple[int, int], ...] = _LAYER, layers: int = _PROBE_LAYERS,
            rows: tuple[int, ...] = PROBE_ROWS, candidates: tuple[int, ...] = CANDIDATES,
            repeats: int = 3) -> dict[int, dict[int, float]]:
    """Seconds per pass of a decode-like chain for each row count and candidate block
    size: `layers` stacked copies of `layer` ((k, n) int8 weights, each output feeding
    the next input of its width), scanned so the program stays one layer long while the
    weights stream from memory as a real model's do (best of `repeats`, after a warm-up)."""
    from flaxlm.model.int8 import _blocked_matmul
    rng = np.random.default_rng(0)
    with jax.ensure_compile_time_eval(), jax.default_device(jax.devices("cpu")[0]):
        ws = [jnp.asarray(rng.integers(-127, 128, (layers, n, k), dtype=np.int8))
              for k, n in layer]
        ss = [jnp.full((layers, n, 1), 1e-3, jnp.float32) for _, n in layer]
        return {m: {size: _time_chain(functools.partial(_blocked_matmul, block_bytes=size),
                                      layer, m, ws, ss, repeats) for size in candidates}
                for m in rows}


def fastest(times: dict[int, dict[int, float]]) -> dict[int, int]:
    return {m: min(by_size, key=by_size.get) for m, by_size in times.items()}


def _time_chain(blocked, layer, m, ws, ss, repeats) -> float:
    widths = {k for k, _ in layer} | {n for _, n in layer}

    def one_layer(h, weights):
        h = dict(h)
        for (k, _), w, s in zip(layer, *weights):
            y = blocked(h[k], w, s)
            h[y.shape[1]] = y * 1e-3
        return h, None

    def chain(ws, ss):
        h = {w: jnp.full((m, w), 0.5, jnp.float32) for w in widths}
        return jax.lax.scan(one_layer, h, (ws, ss))[0]

    return best_seconds(jax.jit(chain), (ws, ss), repeats)


def best_seconds(run, args, repeats: int) -> float:
    """The fastest of `repeats` timed calls of `run(*args)`, after one untimed call."""
    jax.block_until_ready(run(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run(*args))
        best = min(best, time.perf_counter() - start)
    return best


def _parse(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1024:
        raise ConfigError(f"{ENV} must be a number of bytes >= 1024 (float bytes of one "
                          f"converted int8 block), got {text!r}")
    return value


def _read(path: Path) -> dict[str, dict[int, int]]:
    """The record, {machine key: {rows: bytes}}; an unreadable or malformed file is empty."""
    try:
        raw = json.loads(path.read_text())
        return {key: {int(r): int(b) for r, b in value.items()} for key, value in raw.items()
                if all(int(b) > 0 for b in value.values())}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def _write(path: Path, key: str, chosen: dict[int, int]) -> None:
    record = {k: {str(r): b for r, b in v.items()} for k, v in _read(path).items()}
    record[key] = {str(r): b for r, b in chosen.items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: keep the choice for this process only
