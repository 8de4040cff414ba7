"""What a run reports: FLOPs and MFU, metrics.jsonl, TensorBoard events, the progress bar.

MFU (model FLOPs utilization) = flops_per_token * tokens_per_s / (peak_flops * devices), with

    flops_per_token = 6 * N + 12 * L * H * Q * T        (PaLM, appendix B)

N: parameters that take part in a matmul (all but the input embedding table and
learned position table, plus the output projection: the embedding again when
it is tied); 6 = 2 (multiply-add) x 3 (forward, backward for activations,
backward for weights). 12 * L * H * Q * T: attention scores and the weighted
sum over T keys (L layers, H heads of size Q, T = sequence length; the causal
half is counted too, as is standard). Rematerialization's extra forward pass is
not counted (that would be hardware FLOPs utilization).

Peak: `log.peak_tflops` of the recipe when set, else `peak_flops()`: dense
bfloat16 peaks of known accelerators, and for a CPU its float32 vector peak
read from the machine (`cpu_peak`): usable cores x clock x FLOP/cycle, where
FLOP/cycle = vector lanes (16 with AVX-512, 8 with AVX/AVX2, 4 with SSE or NEON)
x 2 (fused multiply-add) x 2 FMA units per core. Two full-width FMA units is
the most any of these cores has, and the clock is the highest the kernel reports,
so the peak is an upper bound and MFU stays below 100% (on a core with one
AVX-512 unit, or AMD Zen 4's double-pumped 256-bit units, MFU reads low by up to
2x, never high). The CPU devices of one process share its cores (XLA can split a
CPU into several devices), so a CPU counts once per process: `total_peak_flops`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
from pathlib import Path
from typing import Any

import jax
import numpy as np

from flaxlm.model.config import ModelConfig

FMA_UNITS = 2        # full-width FMA pipes per core: the most any x86/Arm server core has
DEFAULT_GHZ = 3.0    # when the kernel reports no clock at all


@dataclasses.dataclass(frozen=True)
class CpuPeak:
    """A CPU's float32 vector peak: cores x ghz x flops_per_cycle."""

    cores: int
    ghz: float
    lanes: int           # float32 lanes of the widest vector unit
    isa: str
    clock_source: str

    @property
    def flops_per_cycle(self) -> int:
        return self.lanes * 2 * FMA_UNITS

    @property
    def flops(self) -> float:
        return self.cores * self.ghz * 1e9 * self.flops_per_cycle

    def describe(self) -> str:
        return (f"{self.cores} cores x {self.ghz:.2f} GHz ({self.clock_source}) x "
                f"{self.flops_per_cycle} float32 FLOP/cycle ({self.isa}: {self.lanes} lanes x "
                f"FMA x {FMA_UNITS} units) = {self.flops / 1e9:.1f} GFLOP/s")


def cpu_peak(cpuinfo: str | None = None, cores: int | None = None,
             max_khz: int | None = None) -> CpuPeak:
    """This machine's CPU peak from /proc/cpuinfo (flags, MHz), the cpufreq maximum and
    the cores this process may run on; arguments replace what is read (for tests)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    if cores is None:
        cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                 else os.cpu_count() or 1)
    if max_khz is None:
        try:
            max_khz = int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
                          .read_text())
        except (OSError, ValueError):
            max_khz = 0
    flags, mhz = set(), 0.0
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features"):
            flags |= set(value.split())
        elif key == "cpu mhz":
            try:
                mhz = max(mhz, float(value))
            except ValueError:
                pass
    if "avx512f" in flags:
        lanes, isa = 16, "AVX-512"
    elif "avx2" in flags or "avx" in flags:
        lanes, isa = 8, "AVX2" if "avx2" in flags else "AVX"
    elif "asimd" in flags or platform.machine().lower() in ("aarch64", "arm64"):
        lanes, isa = 4, "NEON"
    else:
        lanes, isa = 4, "SSE"
    if max_khz / 1e3 >= mhz and max_khz > 0:
        ghz, source = max_khz / 1e6, "cpufreq maximum"
    elif mhz > 0:
        ghz, source = mhz / 1e3, "/proc/cpuinfo"
    else:
        ghz, source = DEFAULT_GHZ, "assumed"
    return CpuPeak(cores=max(1, cores), ghz=ghz, lanes=lanes, isa=isa, clock_source=source)

# Dense bfloat16 peak FLOP/s per device, by substring of `device.device_kind`.
ACCELERATOR_PEAKS = (
    ("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("A100", 312e12),
    ("B200", 2250e12), ("L4", 121e12), ("A10", 125e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5", 197e12), ("TPU v4", 275e12),
)


def peak_flops(device: jax.Device, override_tflops: float = 0.0) -> float:
    """Peak FLOP/s of one device: the override, the table above, or the CPU assumption."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.platform == "cpu":
        return cpu_peak().flops
    for name, peak in ACCELERATOR_PEAKS:
        if name.lower() in device.device_kind.lower():
            return peak
    return math.nan  # unknown accelerator: set log.peak_tflops


def total_peak_flops(override_tflops: float = 0.0) -> float:
    """Peak FLOP/s of all devices together (the MFU denominator): the per-device peak times
    the devices, or for CPUs (without an override) the cores' peak once per process."""
    device = jax.devices()[0]
    if device.platform == "cpu" and override_tflops <= 0:
        return peak_flops(device) * jax.process_count()
    return peak_flops(device, override_tflops) * jax.device_count()


def matmul_params(config: ModelConfig, num_params: int) -> int:
    """N of the formula: parameters used in matmuls per token (of a MoE layer's
    experts, only the experts_per_token a token is routed to)."""
    embed = config.vocab_size * config.embed_dim
    positions = config.max_seq_len * config.embed_dim if config.learned_positions else 0
    head = embed if config.tie_embeddings else 0
    idle_experts = config.num_experts - config.experts_per_token
    moe_layers = config.layer_kinds("mlp").count("moe")
    idle = moe_layers * idle_experts * 3 * config.embed_dim * config.expert_mlp_dim
    return num_params - embed - positions + head - idle


def flops_per_token(config: ModelConfig, num_params: int, seq_len: int) -> float:
    attention = 12 * config.num_layers * config.num_heads * config.head_dim * seq_len
    return 6 * matmul_params(config, num_params) + attention


class MetricsLog:
    """Appends one JSON line per log step to RUN_DIR/metrics.jsonl (flushed each time)
    and mirrors the numbers to TensorBoard event files in RUN_DIR/tensorboard. The FIELDS
    are always there (null when unknown); an objective's own metrics (DPO's rewards, ...)
    follow them."""

    FIELDS = ("step", "loss", "eval_loss", "eval_ppl", "lr", "grad_norm", "router_loss",
              "tokens_per_s", "mfu")

    def __init__(self, run_dir: Path, tensorboard: bool):
        self.path = run_dir / "metrics.jsonl"
        primary = jax.process_index() == 0  # one writer in a multi-process run
        self._file = open(self.path, "a", encoding="utf-8") if primary else None
        self._writer = None
        if tensorboard and primary:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        line = {key: _plain(record.get(key)) for key in self.FIELDS}
        line.update({key: _plain(v) for key, v in record.items() if key not in line})
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in line.items():
                if key != "step" and value is not None:
                    self._writer.add_scalar(f"train/{key}", value, line["step"])
            self._writer.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._writer is not None:
            self._writer.close()


def _plain(value: Any) -> Any:
    """A JSON number (or None) from a Python/NumPy/JAX scalar; NaN/Inf become None."""
    if value is None:
        return None
    value = float(np.asarray(value)) if not isinstance(value, int) else value
    return value if isinstance(value, int) or math.isfinite(value) else None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Progress:
    """A tqdm bar over steps showing loss and tokens/s (tqdm supplies rate and ETA)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self._bar = None
        if enabled and jax.process_index() == 0:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                             smoothing=0.1)

    def update(self, steps: int, loss: float | None = None, tokens_per_s: float | None = None):
        if self._bar is None:
            return
        if loss is not None:  # tokens/s is unknown while only the compiling step has run
            rate = {} if tokens_per_s is None else {"tok_s": f"{tokens_per_s:,.0f}"}
            self._bar.set_postfix(loss=f"{loss:.4f}", **rate, refresh=False)
        self._bar.update(steps)

    def write(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
