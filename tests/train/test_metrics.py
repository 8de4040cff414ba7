"""The CPU peak behind MFU: read from the machine, an upper bound of what it can do."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.train.metrics import cpu_peak, total_peak_flops

XEON = """processor\t: 0
model name\t: Intel(R) Xeon(R) Processor
cpu MHz\t\t: 2599.998
flags\t\t: fpu sse sse2 fma avx avx2 avx512f avx512bw amx_bf16 amx_tile
"""
EPYC = """processor\t: 0
model name\t: AMD EPYC 7B12
cpu MHz\t\t: 2249.998
flags\t\t: fpu sse sse2 fma avx avx2
"""
GRAVITON = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp
"""


@pytest.mark.parametrize("text, cores, max_khz, gflops, isa", [
    # 2 cores x 2.6 GHz x (16 lanes x 2 (FMA) x 2 units = 64 FLOP/cycle) = 332.8 GFLOP/s
    (XEON, 2, 0, 2 * 2.599998 * 64, "AVX-512"),
    # the cpufreq maximum (3.5 GHz) wins over the current MHz: 8 x 3.5 x 32 = 896
    (EPYC, 8, 3_500_000, 8 * 3.5 * 32, "AVX2"),
    # no clock anywhere: 3 GHz assumed, NEON 4 lanes x 2 x 2 = 16: 4 x 3 x 16 = 192
    (GRAVITON, 4, 0, 4 * 3.0 * 16, "NEON"),
])
def test_cpu_peak_from_cpuinfo(text, cores, max_khz, gflops, isa):
    peak = cpu_peak(text, cores=cores, max_khz=max_khz)
    assert peak.isa == isa
    assert peak.flops / 1e9 == pytest.approx(gflops, rel=1e-9)
    assert f"{peak.flops / 1e9:.1f} GFLOP/s" in peak.describe()


def test_mfu_cannot_pass_100_percent_on_this_machine():
    """A large float32 matmul (the most FLOP-dense thing XLA runs) on every core stays
    below the peak MFU divides by, so no run here can report MFU above 100%."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((1024, 1024)), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    achieved = 2 * 1024 ** 3 / best
    peak = total_peak_flops()
    print(f"matmul {achieved / 1e9:.1f} GFLOP/s, peak {cpu_peak().describe()}")
    assert achieved < peak
