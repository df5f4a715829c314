"""simulate.py: the live-bytes counter, CUDA's autocast policy on the CPU key, the bitsandbytes stand-ins, and the
proof that the same counter on the same stages gives the same peaks on real and on fake tensors."""

from __future__ import annotations

import json

import pytest
import torch

from imagic_lite import simulate, vram
from imagic_lite.config import load_preset
from imagic_lite.simulate import LiveBytes, SimSettings


def test_counter_follows_storages_not_views():
    counter = LiveBytes("cpu")
    with counter:
        a = torch.ones(1024)  # 4 KiB
        view = a[:10]
        b = a * 2
        assert counter.now == 8192
        del b
        assert counter.now == 4096
        del a
        assert counter.now == 4096  # the view keeps the storage alive
        del view
    assert counter.now == 0 and counter.peak == 8192
    assert counter.largest[0] == 4096


def test_counter_parts_move_when_retagged():
    counter = LiveBytes("cpu")
    with counter:
        w = torch.zeros(256)
        counter.retag(w, "weights")
        g = torch.zeros(512)
    assert counter.parts["weights"] == 1024 and counter.parts["activations"] == 2048
    del g
    assert counter.parts["activations"] == 0 and counter.peak_parts["activations"] == 2048


def test_cuda_autocast_policy_runs_norms_in_fp32_only_while_open():
    x = torch.randn(1, 32, 4, 4, dtype=torch.bfloat16)
    gn = torch.nn.GroupNorm(8, 32)
    lin = torch.nn.Linear(4, 4)
    with simulate.cuda_autocast_policy(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert gn(x).dtype == torch.float32  # CUDA's autocast lists group_norm as fp32
        assert torch.softmax(x, -1).dtype == torch.float32
        assert lin(x.float()).dtype == torch.bfloat16  # and linear layers as lower precision, like the CPU's
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gn(x).dtype == torch.bfloat16  # the CPU's own policy is back


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_stand_in_holds_what_bitsandbytes_stores(kind):
    from torch import nn

    from imagic_lite.quant import quantize_bnb

    model = nn.Sequential(nn.Linear(320, 640), nn.Linear(640, 77))
    quantize_bnb(model, kind, torch.bfloat16, torch.device("cpu"))
    for layer, (rows, cols) in zip(model, ((640, 320), (77, 640)), strict=True):
        stored = [layer.weight]
        state = getattr(layer.weight, "quant_state", None)
        if state is not None:
            stored += [state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]
        if kind == "int8":
            stored.append(layer.weight.SCB)
        real = sum(t.numel() * t.element_size() for t in stored)
        layout = (simulate.nf4_bytes if kind == "nf4" else simulate.int8_bytes)(rows, cols)
        stand_in = sum(torch.empty(shape, dtype=dtype).nbytes for shape, dtype in layout.values())
        assert stand_in == real
    stored = simulate.StoredLinear(nn.Linear(320, 640), kind, torch.bfloat16)
    held = sum(t.nbytes for t in (*stored.parameters(), *stored.buffers()))
    layout = (simulate.nf4_bytes if kind == "nf4" else simulate.int8_bytes)(640, 320)
    assert held == sum(torch.empty(s, dtype=d).nbytes for s, d in layout.values()) + 640 * 2  # + the bf16 bias


def test_real_and_fake_tensors_give_the_same_peaks(tiny_sd):
    """The proof: the same stages (fp8 base, checkpointing, 8-bit AdamW, tiled VAE) and the same counter, once on
    real CPU tensors, once on fake ones; every stage's peak within 1 % and the same FLOPs."""
    settings = SimSettings(embed_steps=1, tune_steps=1, sample_steps=1)
    preset = load_preset("4gb")
    real = simulate.measure_real(str(tiny_sd), preset, 32, settings)
    fake = simulate.simulate_preset(str(tiny_sd), preset, 32, settings, host="cpu")
    for stage in vram.STAGES:
        r, f = real["stages"][stage], fake["stages"][stage]
        assert f["peak_allocated_bytes"] == pytest.approx(r["peak_allocated_bytes"], rel=0.01), stage
        assert f["flops"] == r["flops"] > 0, stage
    b = fake["stages"]["B"]["parts_at_peak"]
    assert b["weights"] > 0 and b["trainable"] > 0  # one B step: its optimizer state comes after the peak


def test_bench_simulate_json_contract(tiny_sd, tmp_path, capsys, monkeypatch):
    from imagic_lite.cli import main

    monkeypatch.setattr(simulate, "SimSettings", lambda: SimSettings(embed_steps=1, tune_steps=1))  # time

    with pytest.raises(SystemExit) as done:
        # --debug: the CLI otherwise quiets the libraries' logging for the whole process, which later tests read
        main(["--debug", "bench", "--simulate", "--model", str(tiny_sd), "--presets", "8gb", "--resolution", "32",
              "--out", str(tmp_path), "--json"])
    assert done.value.code == 0
    result = json.loads(capsys.readouterr().out)
    stages = result["presets"]["8gb"]["stages"]
    assert set(stages) == set(vram.STAGES)
    for rec in stages.values():
        assert isinstance(rec["peak_allocated_bytes"], int) and rec["peak_allocated_bytes"] > 0
        assert sum(rec["parts_at_peak"].values()) == rec["peak_allocated_bytes"]
    verdict = result["presets"]["8gb"]["verdict"]
    assert verdict["peak_allocated_bytes"] == max(r["peak_allocated_bytes"] for r in stages.values())
    assert verdict["projected_s"]["T4"]["total"] >= verdict["projected_s"]["H100"]["total"]
    assert list(tmp_path.glob("sim-*.json"))


def _entry(peak_gib: float, stage: str = "B") -> dict:
    stages = {s: {"peak_allocated_bytes": int(0.5 * 2**30), "largest_transient": {"bytes": 1, "op": "x", "where": ""}}
              for s in vram.STAGES}
    stages[stage]["peak_allocated_bytes"] = int(peak_gib * 2**30)
    return {"stages": stages}


def test_vram_choice_takes_the_fastest_preset_whose_simulated_run_fits(monkeypatch):
    from imagic_lite.errors import ConfigError

    peaks = {"24gb": 13.0, "12gb": 7.0, "8gb": 3.2, "6gb": 2.5, "4gb": 1.5}
    monkeypatch.setattr(vram, "simulate_cached", lambda model, p, res=None, on_miss=None: _entry(peaks[p.name]))
    choose = vram.choose_preset_for_card
    assert choose(80, "arch:sd15")[0].name == "24gb"
    assert choose(12, "arch:sd15")[0].name == "12gb"  # 7 x 1.15 + 0.5 = 8.55 GiB
    assert choose(8, "arch:sd15")[0].name == "8gb"
    assert choose(4, "arch:sd15") == (load_preset("6gb"), int(2.5 * 2**30))  # 2.5 x 1.15 + 0.5 = 3.4 GiB
    with pytest.raises(ConfigError, match="below what every preset needs"):
        choose(2, "arch:sd15")


def test_cache_is_keyed_by_architecture_side_and_settings(tmp_path, monkeypatch, tiny_sd):
    monkeypatch.setenv("IMAGIC_LITE_CACHE_DIR", str(tmp_path))
    runs = []
    monkeypatch.setattr("imagic_lite.simulate.simulate_preset",
                        lambda model, p, side, settings=None, host="meta": runs.append((p.name, side)) or _entry(1))
    vram.simulate_cached(str(tiny_sd), load_preset("8gb"), 64)
    vram.simulate_cached(str(tiny_sd), load_preset("8gb"), 64)  # cached
    vram.simulate_cached(str(tiny_sd), load_preset("8gb"), 32)
    vram.simulate_cached(str(tiny_sd), load_preset("4gb"), 64)
    assert runs == [("8gb", 64), ("8gb", 32), ("4gb", 64)]
    assert len(list((tmp_path / "simulated").glob("*.json"))) == 3
    fingerprint = vram.config_fingerprint(tiny_sd)
    assert fingerprint == vram.config_fingerprint(tiny_sd) and len(fingerprint) == 16


def test_presets_reads_the_shipped_simulations_and_starts_none(capsys, monkeypatch):
    from imagic_lite.cli import main

    def refuse(*args, **kwargs):
        raise AssertionError("presets must not simulate without --simulate")

    monkeypatch.setattr("imagic_lite.simulate.simulate_preset", refuse)
    with pytest.raises(SystemExit) as done:
        main(["presets", "--json"])
    assert done.value.code == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    shipped = [r for r in rows.values() if r["simulated_peak_bytes"]]
    assert shipped, "the package ships simulations for arch:sd15 at 512 px"
    for r in shipped:
        assert r["side"] == 512 and r["card_need_bytes"] > r["simulated_peak_bytes"]
        assert r["simulated_peak_bytes"] == max(r["simulated"].values())


@pytest.mark.parametrize("preset_name", ["4gb", pytest.param("8gb", marks=pytest.mark.slow)])  # 4gb: offloaded
# encoders and sample_offload both
def test_auto_eta_search_runs_on_a_simulated_card_within_stage_c_memory(tiny_sd, preset_name):
    """--auto-eta after stage C on fake tensors with the host a different device (meta), as a card and its host are:
    a module left on the wrong side fails here as it would on CUDA. The search must need no more than C."""
    from imagic_lite.config import load_preset

    settings = simulate.SimSettings(auto_eta=True)
    stages = simulate.simulate_preset(str(tiny_sd), load_preset(preset_name), 32, settings)["stages"]
    assert stages["eta"]["peak_allocated_bytes"] <= stages["C"]["peak_allocated_bytes"]
