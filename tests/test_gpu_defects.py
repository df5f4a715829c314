"""Issue 16's GPU-path defects that a CPU can still show: bf16 only on cards that compute it, SDXL's zero
unconditional embedding, LoRA A drawn after the upcast over fp8. (Defect 1 and the fp16 resume: test_cuda_rules.py.)
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from imagic_lite import models
from imagic_lite.config import MemorySettings


@pytest.mark.parametrize("capability, expected", [((7, 5), torch.float16), ((6, 1), torch.float16),
                                                  ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_half_is_bf16_only_where_the_chosen_card_computes_it(monkeypatch, capability, expected):
    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # a T4 says so: emulation counts
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    assert models.compute_dtype("half", torch.device("cuda:1")) == expected
    assert asked == [torch.device("cuda:1")]  # the --device card, not the current one
    assert models.compute_dtype("bf16", torch.device("cuda:1")) == torch.bfloat16  # asked for explicitly
    assert models.compute_dtype("half", torch.device("cpu")) == torch.bfloat16


@pytest.mark.parametrize("capability, dtype, device, said", [((7, 5), torch.bfloat16, "cuda:0", True),
                                                             ((8, 6), torch.bfloat16, "cuda:0", False),
                                                             ((7, 5), torch.float16, "cuda:0", False),
                                                             ((7, 5), torch.bfloat16, "cpu", False)])
def test_explicit_bf16_on_a_card_without_it_gets_a_note(monkeypatch, capability, dtype, device, said):
    """weights = "bf16" is honoured when asked for (PyTorch emulates it below 8.0), with a note that "half" would
    have picked the faster fp16 there."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    note = models.emulated_bf16_note(dtype, torch.device(device))
    assert (note is not None) == said
    assert note is None or "compute capability 7.5" in note and '"half" picks fp16' in note


def _components(path, **memory) -> models.Components:
    return models.load_components(str(path), MemorySettings(weights="fp32", **memory), torch.device("cpu"))


def test_sdxl_unconditional_embedding_is_zeros_when_the_model_says_so(tiny_models_16, tmp_path):
    sdxl = _components(tiny_models_16["sdxl"])
    assert models.model_index(tiny_models_16["sdxl"])["force_zeros_for_empty_prompt"] is True
    uncond = models.encode(sdxl, torch.zeros(1, 3, 16, 16), "a dog").uncond
    assert uncond.pooled is not None
    assert not uncond.embeds.any() and not uncond.pooled.any()  # sequence and pooled, as diffusers' SDXL pipeline
    assert models.encode_text(sdxl, "")[0].embeds.any()  # not what the empty prompt encodes to

    other = shutil.copytree(tiny_models_16["sdxl"], tmp_path / "sdxl-no-zeros")
    index = models.model_index(other)
    (other / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    assert models.encode_uncond(_components(other)).embeds.any()
    assert models.encode_uncond(_components(tiny_models_16["sd"])).embeds.any()  # SD pipelines never zero it


def test_lora_a_over_fp8_is_drawn_after_the_upcast(tiny_models_16):
    from imagic_lite.lora import add_lora

    def first_a(storage: str, seed: int) -> torch.Tensor:
        unet = _components(tiny_models_16["sd"], storage=storage).unet
        add_lora(unet, {"r": 4, "lora_alpha": 4.0, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}, seed)
        name, a = next((n, p) for n, p in unet.named_parameters() if ".lora_A." in n)
        assert a.dtype == torch.float32 and a.requires_grad
        return a.detach()

    a = first_a("fp8", seed=0)
    assert a.unique().numel() == a.numel()  # PEFT's fp8 cast left 60 distinct values of 256
    assert not torch.equal(a, a.to(torch.float8_e4m3fn).float())
    assert a.abs().max() <= 1 / a.shape[1] ** 0.5  # Kaiming-uniform with a = sqrt(5): bound 1/sqrt(fan_in)
    assert torch.equal(a, first_a("fp8", seed=0)) and not torch.equal(a, first_a("fp8", seed=1))
    fp32 = first_a("none", seed=0)  # over an fp32 base PEFT's own draw is kept: fp32 runs reproduce as before
    assert fp32.unique().numel() == fp32.numel()
