"""bench.py: the documented result structure on the tiny model, ratios to `paper`, OOM as `fit: false`, the
projection at real step counts, and the writers (JSON, markdown)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from imagic_lite import bench
from imagic_lite.config import load_preset
from imagic_lite.errors import ConfigError, InputError, OutOfMemory

STAGES = ("encode", "A", "B", "C")
RECORD_KEYS = {"fit", "error", "label", "peak_bytes", "reserved_bytes", "start_bytes", "wall_s", "steps_timed",
               "s_per_step", "it_per_s", "decode_s"}


@pytest.fixture(scope="module")
def result(tiny_models):
    return bench.run_bench(str(tiny_models["sd"]), ["cpu"], None, steps=1, warmup=1, cap_gb=None, device="cpu",
                           command="pytest")


def test_run_bench_structure(result):
    assert result["schema"] == bench.SCHEMA
    assert list(result["presets"]) == ["paper", "cpu"]  # paper is added, first
    assert result["env"]["device"] == "cpu"
    assert {"torch", "diffusers", "bitsandbytes", "date", "command", "device_name"} <= set(result["env"])
    assert result["cap_applied"] is False
    for name, entry in result["presets"].items():
        assert entry["side"] == 64 and entry["compute_dtype"] == "float32", name
        assert list(entry["stages"]) == list(STAGES)
        for stage in STAGES:
            rec = entry["stages"][stage]
            assert set(rec) >= RECORD_KEYS or stage == "encode", (name, stage)
            assert rec["fit"] and rec["label"] == "cpu_peak_rss" and rec["peak_bytes"] > 0
        for stage in ("A", "B", "C"):
            rec = entry["stages"][stage]
            assert rec["steps_timed"] == 1 and rec["s_per_step"] > 0 and rec["it_per_s"] > 0
            assert "simulated_bytes" not in rec  # a CPU result gets no simulated column: RSS is not VRAM
        assert entry["stages"]["C"]["decode_s"] > 0
        assert set(entry["projected_s"]) == {"encode", "A", "B", "C", "total"}
        assert entry["projected_s"]["total"] > 0


def test_ratios_to_paper(result):
    paper, cpu = result["presets"]["paper"], result["presets"]["cpu"]
    assert paper["ratios"]["B"] == {"peak": 1.0, "s_per_step": 1.0}
    assert paper["ratios"]["projected_total"] == 1.0
    expected = cpu["stages"]["B"]["peak_bytes"] / paper["stages"]["B"]["peak_bytes"]
    assert cpu["ratios"]["B"]["peak"] == pytest.approx(expected)
    assert cpu["ratios"]["projected_total"] == pytest.approx(
        cpu["projected_s"]["total"] / paper["projected_s"]["total"])


def test_projection_uses_the_presets_step_counts():
    preset = load_preset("8gb")
    stage = {"s_per_step": 2.0, "decode_s": 3.0}
    entry = {"stages": {"encode": {"wall_s": 1.0}, "A": stage, "B": stage, "C": stage}}
    out = bench.projected_seconds(preset, entry)
    images = len(preset.sample.etas) * len(preset.sample.seeds)
    assert out["A"] == 2.0 * preset.embed.steps and out["B"] == 2.0 * preset.tune.steps
    assert out["C"] == images * (2.0 * preset.sample.steps + 3.0)
    assert out["total"] == pytest.approx(1.0 + out["A"] + out["B"] + out["C"])


def test_an_oom_is_recorded_as_no_fit(tiny_models, monkeypatch):
    def oom(*args, **kwargs):
        raise OutOfMemory("stage B ran out of GPU memory")

    monkeypatch.setattr("imagic_lite.imagic.finetune", oom)
    result = bench.run_bench(str(tiny_models["sd"]), ["cpu"], None, steps=1, warmup=0, cap_gb=8, device="cpu",
                             include_paper=False)
    stages = result["presets"]["cpu"]["stages"]
    assert stages["B"]["fit"] is False and "out of GPU memory" in stages["B"]["error"]
    assert stages["B"]["s_per_step"] is None
    assert stages["A"]["fit"] and stages["C"]["fit"]  # the other stages are still measured
    assert result["presets"]["cpu"]["projected_s"]["total"] is None
    assert result["presets"]["cpu"]["ratios"]["A"]["peak"] is None  # no paper in this run
    assert result["cap_gb"] == 8 and result["cap_applied"] is False  # a cap means nothing on the CPU


def test_bad_arguments_fail_before_any_model_is_built(tiny_models):
    with pytest.raises(InputError):
        bench.run_bench(str(tiny_models["sd"]), ["cpu"], None, steps=0, warmup=0, cap_gb=None, device="cpu")
    with pytest.raises(ConfigError):
        bench.run_bench(str(tiny_models["sd"]), ["nope"], None, steps=1, warmup=0, cap_gb=None, device="cpu")
    components = SimpleNamespace(native=512, multiple=64)
    assert bench._side(components, None) == 512 and bench._side(components, 256) == 256
    with pytest.raises(InputError, match="multiple of 64"):
        bench._side(components, 300)


def test_write_results_and_render_table(result, tmp_path):
    path = bench.write_results(result, tmp_path)
    assert path.name.startswith("bench-cpu-") and "-64px-" in path.name and path.suffix == ".json"
    assert json.loads(path.read_text())["presets"].keys() == result["presets"].keys()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    table = bench.render_table(result)
    assert "not VRAM" in table
    assert "| paper | A | yes |" in table and "| cpu | C | yes |" in table
    assert table.count("\n| ") == 1 + 2 * len(STAGES)  # the header, then one row per preset and stage


def test_half_precision_becomes_fp32_on_a_cpu_without_bf16(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(bench, "native_half", lambda device: False)
    preset, changes = bench.effective_preset(load_preset("4gb"), cpu)
    assert preset.memory.weights == "fp32" and "memory.weights" in changes
    assert preset.memory.storage == "fp8" and preset.memory.checkpointing  # every other knob stays
    assert bench.effective_preset(load_preset("cpu"), cpu) == (load_preset("cpu"), {})
    monkeypatch.setattr(bench, "native_half", lambda device: True)
    assert bench.effective_preset(load_preset("4gb"), cpu)[1] == {}
    assert bench.preset_of(json.loads(json.dumps({"settings": preset.to_dict()}))) == preset


def test_a_cap_verdict_from_the_uncapped_run():
    """run_bench.py --fit-matrix only runs under a cap what the uncapped peaks cannot settle."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "run_bench.py"
    spec = importlib.util.spec_from_file_location("run_bench_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    gib = 2**30

    def entry(allocated: float, reserved: float, fit: bool = True) -> dict:
        rec = {"fit": fit, "peak_bytes": int(allocated * gib), "reserved_bytes": int(reserved * gib)}
        return {"load": {"fit": True, "peak_bytes": gib, "reserved_bytes": gib}, "stages": {"A": rec, "B": rec}}

    limit = 8 * gib
    assert script.settled_by_uncapped(entry(5, 6), limit) == {"fit": True, "source": "inferred", "stage": None}
    assert script.settled_by_uncapped(entry(9, 10), limit)["fit"] is False  # live tensors above the limit
    assert script.settled_by_uncapped(entry(7, 9), limit) is None  # only the cache is above it: measure
    assert script.settled_by_uncapped(entry(1, 1, fit=False), limit) == {"fit": False, "source": "inferred",
                                                                          "stage": "A"}
