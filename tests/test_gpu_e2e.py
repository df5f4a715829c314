"""benchmarks/gpu_e2e.py, the end-to-end part of gpu_check.sh: its arguments and its failure reports, on CPU.

On a card it runs full-size architectures under caps; here the same code runs a tiny pipeline on the CPU.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_e2e.py"


def _driver():
    spec = importlib.util.spec_from_file_location("gpu_e2e", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


e2e = _driver()


def test_arguments():
    args = e2e.parse([])
    assert args.model == "arch:sd15" and args.presets == e2e.ALL_PRESETS.split(",") and not args.no_cap
    assert e2e.parse(["--presets", "8gb, 4gb,"]).presets == ["8gb", "4gb"]
    for bad in (["--steps", "0"], ["--presets", ","], ["--sample-steps", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            e2e.parse(bad)
        assert exit_info.value.code == 2


def test_unknown_preset_fails_before_any_run(tmp_path):
    from imagic_lite.errors import ConfigError

    with pytest.raises(ConfigError):
        e2e.main(["--presets", "cpu,huge", "--device", "cpu", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_any_exception_is_reported_with_preset_and_stage(tiny_models_16, tmp_path, monkeypatch, capsys):
    from imagic_lite import api, models

    calls = []

    def broken_stage(*args, **kwargs):  # not an OOM: any exception must fail the check
        calls.append(1)
        raise RuntimeError("expected scalar type Half but found Float")

    real = api.Imagic._stage
    monkeypatch.setattr(api, "optimize_embedding", broken_stage)
    code = e2e.main(["--model", str(tiny_models_16["sd"]), "--presets", "cpu,paper", "--device", "cpu",
                     "--steps", "1", "--sample-steps", "1", "--out", str(tmp_path / "results")])
    assert code == 1 and len(calls) == 2  # the second preset still ran after the first failed
    assert api.Imagic._stage is real  # the stage tracker is removed again, and so is the build cache
    assert models._build_random.__name__ == "_build_random"
    out = capsys.readouterr().out
    assert "!! FAILED" in out and "preset cpu at stage A: RuntimeError: expected scalar type Half" in out
    [results] = list((tmp_path / "results").glob("e2e-cpu-*.json"))
    entries = json.loads(results.read_text())["presets"]
    assert [(e["preset"], e["ok"], e["stage"]) for e in entries] == [("cpu", False, "A"), ("paper", False, "A")]
    assert "broken_stage" in entries[0]["traceback"]


def test_a_clean_run_is_recorded(tiny_models_16, tmp_path, capsys):
    code = e2e.main(["--model", str(tiny_models_16["sd"]), "--presets", "cpu", "--device", "cpu", "--steps", "1",
                     "--sample-steps", "1", "--weights", "bf16", "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().out
    [results] = list(tmp_path.glob("e2e-cpu-*-bf16-*.json"))
    [entry] = json.loads(results.read_text())["presets"]
    assert entry["ok"] and entry["cap_gb"] is None and not entry["cap_applied"]
    assert entry["compute_dtype"] == "bfloat16"  # --weights reached the run
    assert list(entry["stages"]) == ["load", "encode", "A", "B", "C", "eta"]  # the run ends with --auto-eta
    assert "FAILED" not in capsys.readouterr().out


def test_random_builds_are_drawn_once_and_copied(monkeypatch):
    import torch

    from imagic_lite import models

    drawn = []

    def fake_build(path, family):
        drawn.append(path)
        return (torch.nn.Linear(2, 2), ["tokenizer"])

    monkeypatch.setattr(models, "_build_random", fake_build)  # teardown restores the real one
    restore = e2e.cache_random_builds()
    sd = models.FAMILIES["sd"]
    first, second = models._build_random(Path("sd15"), sd), models._build_random(Path("sd15"), sd)
    assert drawn == [Path("sd15")]
    assert first[0] is not second[0] and torch.equal(first[0].weight, second[0].weight)
    with torch.device("meta"):
        models._build_random(Path("sd15"), sd)
    assert len(drawn) == 2  # not from the cache: the simulation wants meta tensors
    restore()
    assert models._build_random is fake_build
