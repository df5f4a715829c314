"""memory.py: measuring a stage's peak, the estimate's ordering, preset choice, reading results back; and that every
memory knob of a preset is really on in the loaded components (checkpointing, fp8, NF4, 8-bit AdamW, SDPA)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from imagic_lite import memory
from imagic_lite.config import MemorySettings, load_preset
from imagic_lite.errors import ConfigError
from imagic_lite.memory import GiB, PeakMemory

MiB = 2**20


@pytest.fixture(scope="module")
def sd15():
    return memory.arch_facts("arch:sd15")


def _grow(mib: int) -> None:
    x = torch.ones(mib * MiB // 4)  # ones() touches every page, so it is resident
    time.sleep(0.05)  # long enough for the 2 ms sampler too
    del x


def test_peak_memory_cpu_sees_a_big_tensor():
    with PeakMemory("cpu") as idle:
        pass
    with PeakMemory("cpu") as busy:
        _grow(200)
    assert idle.peak.label == "cpu_peak_rss" and idle.peak.peak_bytes > 0
    assert busy.peak.peak_bytes - busy.peak.start_bytes >= 180 * MiB
    assert idle.peak.peak_bytes - idle.peak.start_bytes < 100 * MiB
    assert busy.peak.reserved_bytes is None


def test_peak_memory_falls_back_to_sampling(monkeypatch):
    monkeypatch.setattr(memory, "_reset_hwm", lambda: False)
    with PeakMemory("cpu") as pm:
        _grow(200)
    assert pm.peak.label == "cpu_rss_sampled"
    assert pm.peak.peak_bytes - pm.peak.start_bytes >= 180 * MiB


def test_peak_memory_records_even_when_the_block_raises():
    pm = PeakMemory("cpu")
    with pytest.raises(RuntimeError), pm:
        raise RuntimeError("boom")
    assert pm.peak is not None and pm.peak.peak_bytes > 0


def test_arch_facts_match_published_parameter_counts(sd15):
    assert round(sd15.unet / 1e6, 1) == 859.5
    assert round(sd15.vae / 1e6, 1) == 83.7
    assert round(sd15.text_encoders / 1e6, 1) == 123.1
    assert 0.68 < sd15.unet_conv / sd15.unet < 0.70  # FIELD-NOTES: 69 % of SD 1.5's UNet is convolutions
    assert {s for s, _, _ in sd15.attn_linears} >= {"to_q", "to_k", "to_v", "to_out.0"}


def test_estimate_orders_presets_for_stage_b(sd15):
    b = {n: memory.estimate(load_preset(n), sd15, 512, 512)["B"]["total"] for n in ("4gb", "6gb", "8gb", "12gb",
                                                                                    "paper")}
    assert b["4gb"] < b["6gb"] < b["8gb"] < b["12gb"] < b["paper"]
    assert b["paper"] > 14 * GiB  # fp32 weights + grads + AdamW: 16 bytes per UNet parameter alone


def test_estimate_storage_bytes(sd15):
    fp16 = memory.unet_weight_bytes(sd15, "none", 2)
    fp8 = memory.unet_weight_bytes(sd15, "fp8", 2)
    nf4 = memory.unet_weight_bytes(sd15, "nf4", 2)
    assert fp8 < nf4 < fp16  # NF4 leaves SD 1.5's convolutions (69 %) in half precision
    assert abs(fp8 / fp16 - 0.5) < 0.01


def test_estimate_parts_add_up_and_cpu_keeps_encoders(sd15):
    preset = load_preset("8gb")
    for device in ("cuda", "cpu"):
        for stage, parts in memory.estimate(preset, sd15, 512, 512, device).items():
            assert parts["total"] == sum(v for k, v in parts.items() if k != "total"), stage
    assert memory.estimate(preset, sd15, 512, 512, "cuda")["A"]["encoders"] == 0  # offloaded
    assert memory.estimate(preset, sd15, 512, 512, "cpu")["A"]["encoders"] > 0
    small = memory.estimate(preset, sd15, 256, 256)["B"]["activations"]
    assert memory.estimate(preset, sd15, 512, 512)["B"]["activations"] == pytest.approx(4 * small, rel=0.01)


def test_eight_bit_adam_state_only_for_large_tensors(sd15):
    """bitsandbytes keeps fp32 state below 4096 elements, so rank-4 LoRA gains little from AdamW8bit."""
    lora = memory.training_parts(sd15, load_preset("6gb"))
    plain = memory.training_parts(sd15, load_preset("8gb"))
    assert lora["optimizer"] < plain["optimizer"]
    assert lora["optimizer"] > plain["optimizer"] / 4 * 1.5  # far from the 4x a large tensor would get


def test_choose_preset_for_budget(sd15):
    assert memory.choose_preset_for_budget(80, sd15).name == "24gb"
    for gb in (2.5, 4, 6, 8, 12, 24):
        chosen = memory.choose_preset_for_budget(gb, sd15)
        assert memory.peak_estimate(chosen, sd15, 512, 512) <= gb * GiB * memory.HEADROOM
    picks = [memory.choose_preset_for_budget(gb, sd15).vram_gb for gb in (2.5, 4, 6, 8, 12, 24)]
    assert picks == sorted(picks)  # more memory never gets a slower preset
    sdxl = memory.arch_facts("arch:sdxl")
    assert memory.choose_preset_for_budget(12, sdxl, 1024).vram_gb < memory.choose_preset_for_budget(12, sd15).vram_gb
    with pytest.raises(ConfigError, match="smallest preset"):
        memory.choose_preset_for_budget(0.5, sd15)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA answer")
def test_auto_vram_without_cuda_is_none():
    assert memory.auto_vram() is None


def test_measured_peaks_reads_cuda_results_only(tmp_path):
    assert memory.measured_peaks(tmp_path) == {}

    def result(device: str, peak: int, cap=None) -> dict:
        stage = {"fit": True, "peak_bytes": peak}
        return {"model": "arch:sd15", "cap_gb": cap, "env": {"device": device},
                "presets": {"8gb": {"stages": {"A": stage, "B": {"fit": False, "peak_bytes": 1}}}}}

    (tmp_path / "bench-cpu-sd15-1.json").write_text(json.dumps(result("cpu", 5)))
    (tmp_path / "bench-cuda-sd15-1.json").write_text(json.dumps(result("cuda", 7)))
    (tmp_path / "bench-cuda-sd15-cap8gb-1.json").write_text(json.dumps(result("cuda", 9, cap=8)))
    (tmp_path / "bench-broken.json").write_text("{")
    assert memory.measured_peaks(tmp_path) == {"8gb": {"A": 7}}
    assert memory.measured_peaks(tmp_path, device_type="cpu") == {"8gb": {"A": 5}}


# ---------------------------------------------------------------------------------------------------------------
# Each memory knob is really on


def _load(tiny_sd, **memory_settings):
    from imagic_lite.models import load_components

    settings = MemorySettings(**{"weights": "fp32", **memory_settings})
    return load_components(str(tiny_sd), settings, torch.device("cpu"))


def test_checkpointing_knob(tiny_sd):
    assert _load(tiny_sd, checkpointing=True).unet.is_gradient_checkpointing
    assert not _load(tiny_sd, checkpointing=False).unet.is_gradient_checkpointing


def test_fp8_storage_knob(tiny_sd):
    from torch import nn

    unet = _load(tiny_sd, weights="bf16", storage="fp8").unet
    layers = [m for m in unet.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    assert any(isinstance(m, nn.Conv2d) for m in layers) and any(isinstance(m, nn.Linear) for m in layers)
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in layers)


def test_nf4_storage_knob(tiny_sd):
    import bitsandbytes as bnb
    from torch import nn

    unet = _load(tiny_sd, weights="bf16", storage="nf4").unet
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in unet.modules())
    assert not any(type(m) is nn.Linear for m in unet.modules())


def test_eight_bit_adamw_knob():
    from imagic_lite.imagic import _make_optimizer

    big = torch.nn.Parameter(torch.randn(64, 64))  # 4096 elements: the smallest bitsandbytes quantizes
    small = torch.nn.Parameter(torch.randn(4, 32))
    optimizer = _make_optimizer([big, small], 1e-3, "adamw8bit", weight_decay=0.0)
    (big.sum() + small.sum()).backward()
    optimizer.step()
    assert optimizer.state[big]["state1"].dtype == torch.uint8
    assert optimizer.state[big]["state2"].dtype == torch.uint8
    assert optimizer.state[small]["state1"].dtype == torch.float32  # why memory.BNB_MIN_8BIT exists
    assert big.numel() == memory.BNB_MIN_8BIT


def test_attention_knob(tiny_sd):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    sdpa = _load(tiny_sd, attention="sdpa").unet.attn_processors.values()
    plain = _load(tiny_sd, attention="default").unet.attn_processors.values()
    assert sdpa and all(type(p) is AttnProcessor2_0 for p in sdpa)
    assert plain and all(type(p) is AttnProcessor for p in plain)


def test_offload_encoders_is_a_no_op_on_cpu(tiny_sd):
    from imagic_lite.models import encode

    c = _load(tiny_sd, offload_encoders=True)
    encode(c, torch.zeros(1, 3, 64, 64), "a dog")
    assert {p.device.type for m in (c.vae, *c.text_encoders) for p in m.parameters()} == {"cpu"}
