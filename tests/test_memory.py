"""memory.py: measuring a stage's peak, reading results back; and that every memory knob of a preset is really on in
the loaded components (checkpointing, fp8, NF4, 8-bit AdamW, SDPA). Predicted peaks: test_simulate.py."""

from __future__ import annotations

import json
import time

import pytest
import torch

from imagic_lite import memory
from imagic_lite.config import MemorySettings
from imagic_lite.memory import PeakMemory

MiB = 2**20


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
    assert optimizer.state[small]["state1"].dtype == torch.float32  # bitsandbytes' min_8bit_size
    assert big.numel() == 4096


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
