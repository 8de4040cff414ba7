"""The int8 matmul's CPU block size: measured once per machine, recorded, overridable."""

import json

import pytest

from flaxlm.model import int8_blocks
from flaxlm.model.errors import ConfigError


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """No override, an empty cache home, and the process-level choice forgotten."""
    monkeypatch.delenv(int8_blocks.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    int8_blocks.choices.cache_clear()
    yield tmp_path
    int8_blocks.choices.cache_clear()


def _fake_probe(monkeypatch, times):
    calls = []

    def measure():
        calls.append(1)
        return times
    monkeypatch.setattr(int8_blocks, "measure", measure)
    return calls


def test_probe_times_every_candidate_and_row_count():
    times = int8_blocks.measure(layer=((64, 96), (96, 64)), layers=2, rows=(1, 5),
                                candidates=(1 << 10, 1 << 14), repeats=1)
    assert set(times) == {1, 5} and all(set(t) == {1 << 10, 1 << 14} for t in times.values())
    assert all(s > 0 for t in times.values() for s in t.values())
    chosen = int8_blocks.fastest(times)
    assert all(times[m][chosen[m]] == min(times[m].values()) for m in times)


def test_choice_is_measured_once_then_read_from_the_record(fresh, monkeypatch):
    times = {1: {1 << 17: 2.0, 1 << 22: 3.0}, 4: {1 << 17: 2.0, 1 << 22: 1.0},
             32: {1 << 17: 5.0, 1 << 22: 4.0}}
    calls = _fake_probe(monkeypatch, times)
    assert int8_blocks.choices() == {1: 1 << 17, 4: 1 << 22, 32: 1 << 22}
    record = json.loads((fresh / "flaxlm" / "int8_blocks.json").read_text())
    assert record == {int8_blocks.machine_key(): {"1": 1 << 17, "4": 1 << 22, "32": 1 << 22}}
    int8_blocks.choices.cache_clear()  # a new process: reads the record, measures nothing
    assert int8_blocks.choices() == {1: 1 << 17, 4: 1 << 22, 32: 1 << 22}
    assert len(calls) == 1
    # a matmul uses the choice of the largest probed row count not above its rows
    assert [int8_blocks.block_bytes(r) for r in (1, 3, 4, 31, 32, 500)] == [
        1 << 17, 1 << 17, 1 << 22, 1 << 22, 1 << 22, 1 << 22]


def test_another_machines_record_or_a_broken_file_is_measured_again(fresh, monkeypatch):
    path = fresh / "flaxlm" / "int8_blocks.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"Some Other CPU | 64 cores | jaxlib 0.1": {"1": 999}}))
    calls = _fake_probe(monkeypatch, {m: {1 << 18: 1.0} for m in int8_blocks.PROBE_ROWS})
    assert set(int8_blocks.choices().values()) == {1 << 18} and len(calls) == 1
    assert set(json.loads(path.read_text())) == {"Some Other CPU | 64 cores | jaxlib 0.1",
                                                  int8_blocks.machine_key()}
    path.write_text("{not json")
    int8_blocks.choices.cache_clear()
    assert set(int8_blocks.choices().values()) == {1 << 18} and len(calls) == 2


def test_an_unwritable_cache_home_still_gives_a_choice(fresh, monkeypatch):
    (fresh / "flaxlm").write_text("a file where the directory should be")
    _fake_probe(monkeypatch, {m: {1 << 20: 1.0} for m in int8_blocks.PROBE_ROWS})
    assert set(int8_blocks.choices().values()) == {1 << 20}


def test_the_environment_fixes_the_size_without_a_probe(fresh, monkeypatch):
    calls = _fake_probe(monkeypatch, {})
    monkeypatch.setenv(int8_blocks.ENV, "524288")
    assert int8_blocks.block_bytes(1) == int8_blocks.block_bytes(64) == 524288
    assert not calls and not (fresh / "flaxlm").exists()
    for bad in ("4MiB", "0", "-5"):
        monkeypatch.setenv(int8_blocks.ENV, bad)
        int8_blocks.choices.cache_clear()
        with pytest.raises(ConfigError, match=f"{int8_blocks.ENV} must be a number of bytes"):
            int8_blocks.block_bytes(1)
