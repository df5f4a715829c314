"""The three stages on tiny SD-1 (epsilon), SD-2 (v-prediction) and SDXL pipelines, and the memory knobs."""

from __future__ import annotations

import pytest
import torch

from imagic_lite.config import EmbedSettings, MemorySettings, SampleSettings, TuneSettings
from imagic_lite.errors import Interrupted
from imagic_lite.imagic import (
    StopFlag,
    _make_optimizer,
    denoising_loss,
    finetune,
    generate,
    optimize_embedding,
)
from imagic_lite.lora import has_lora
from imagic_lite.models import Cond, encode, load_components, unet_kwargs

CPU = torch.device("cpu")


def _load(path, **memory):
    return load_components(str(path), MemorySettings(weights=memory.pop("weights", "fp32"), **memory), CPU)


def _pixels(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((1, 3, 64, 64), generator=g) * 2 - 1


def _eval_loss(c, latent, cond: Cond) -> float:
    """Loss on a fixed set of noise draws, so before/after comparisons are not luck."""
    with torch.no_grad():
        return denoising_loss(c, latent, cond, torch.Generator().manual_seed(1234), draws=16).item()


def _base_state(unet) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in unet.state_dict().items() if "lora_" not in k}


@pytest.mark.parametrize("kind", ["sd", "sd-v", "sdxl"])
def test_stage_a_lowers_loss_and_leaves_unet_untouched(tiny_models, kind):
    c = _load(tiny_models[kind])
    enc = encode(c, _pixels(), "a red disc")
    before = _base_state(c.unet)
    e_opt, losses = optimize_embedding(c, enc.latent, enc.e_tgt, EmbedSettings(steps=15, lr=0.1, noise_draws=4))
    assert len(losses) == 15
    assert _eval_loss(c, enc.latent, e_opt) < _eval_loss(c, enc.latent, enc.e_tgt)
    assert not torch.equal(e_opt.embeds, enc.e_tgt.embeds)
    assert (e_opt.pooled is not None) == (kind == "sdxl")
    after = c.unet.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items()), "stage A must not change the UNet"
    assert all(p.grad is None for p in c.unet.parameters())


def test_sdxl_time_ids_carry_the_photos_original_size(tiny_models):
    c = _load(tiny_models["sdxl"])
    enc = encode(c, _pixels(), "a red disc")
    ids = unet_kwargs(c, enc.e_tgt, 64, 64, original=(3024, 4032))["added_cond_kwargs"]["time_ids"]
    assert ids.tolist() == [[3024, 4032, 0, 0, 64, 64]]  # original size, crop (0, 0) as we never crop, target size
    assert unet_kwargs(c, enc.e_tgt, 64, 48)["added_cond_kwargs"]["time_ids"].tolist() == [[64, 48, 0, 0, 64, 48]]
    # the UNet really conditions on it: same draws, different original size, different loss
    small, big = (denoising_loss(c, enc.latent, enc.e_tgt, torch.Generator().manual_seed(0), 2, original=size).item()
                  for size in (None, (3024, 4032)))
    assert small != big


@pytest.mark.parametrize("kind", ["sd", "sd-v", "sdxl"])
def test_stage_b_lowers_loss_trains_only_lora_and_keeps_base(tiny_models, kind):
    c = _load(tiny_models[kind])
    enc = encode(c, _pixels(), "a red disc")
    before = _base_state(c.unet)
    loss_before = _eval_loss(c, enc.latent, enc.e_tgt)
    weights, losses = finetune(c, enc.latent, enc.e_tgt, TuneSettings(steps=15, lora_lr=1e-2, noise_draws=4))
    assert has_lora(c.unet)
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k), "B must have moved from zero"
    assert _eval_loss(c, enc.latent, enc.e_tgt) < loss_before
    after = {k: v for k, v in c.unet.state_dict().items() if "lora_" not in k}
    for k, v in before.items():  # PEFT renames wrapped layers to `.base_layer.`; compare by value
        key = k if k in after else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(v, after[key]), f"base weight {k} changed"


def test_stage_b_full_mode_trains_every_weight(tiny_sd):
    c = _load(tiny_sd)
    enc = encode(c, _pixels(), "a red disc")
    loss_before = _eval_loss(c, enc.latent, enc.e_tgt)
    weights, _ = finetune(c, enc.latent, enc.e_tgt, TuneSettings(mode="full", steps=10, full_lr=1e-4))
    assert not has_lora(c.unet)
    assert len(weights) == len(c.unet.state_dict())
    assert _eval_loss(c, enc.latent, enc.e_tgt) < loss_before


@pytest.mark.parametrize("storage", ["fp8", "nf4", "int8"])
def test_quantized_bases_run_stage_b_on_cpu(tiny_sd, storage):
    c = _load(tiny_sd, weights="bf16", storage=storage, checkpointing=True)
    if storage == "fp8":
        convs = [m for m in c.unet.modules() if isinstance(m, torch.nn.Conv2d)]
        linears = [m for m in c.unet.modules() if isinstance(m, torch.nn.Linear)]
        assert convs and all(m.weight.dtype == torch.float8_e4m3fn for m in convs)
        assert linears and all(m.weight.dtype == torch.float8_e4m3fn for m in linears)
    else:
        import bitsandbytes as bnb

        kind = bnb.nn.Linear4bit if storage == "nf4" else bnb.nn.Linear8bitLt
        assert any(isinstance(m, kind) for m in c.unet.modules())
    enc = encode(c, _pixels(), "a red disc")
    weights, losses = finetune(c, enc.latent, enc.e_tgt, TuneSettings(steps=3, lora_lr=1e-3))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(v.dtype == torch.float32 for v in weights.values())


def test_checkpointing_and_attention_knobs_are_really_on(tiny_sd):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    c = _load(tiny_sd, checkpointing=True, attention="sdpa")
    assert c.unet.is_gradient_checkpointing
    assert all(isinstance(p, AttnProcessor2_0) for p in c.unet.attn_processors.values())
    c = _load(tiny_sd, checkpointing=False, attention="default")
    assert not c.unet.is_gradient_checkpointing
    assert all(isinstance(p, AttnProcessor) for p in c.unet.attn_processors.values())


def test_half_precision_weights_keep_trainables_fp32(tiny_sd):
    c = _load(tiny_sd, weights="bf16")
    assert c.unet.conv_in.weight.dtype == torch.bfloat16
    assert all(m.weight.dtype == torch.float32 for m in c.unet.modules() if isinstance(m, torch.nn.GroupNorm))
    enc = encode(c, _pixels(), "a red disc")
    finetune(c, enc.latent, enc.e_tgt, TuneSettings(steps=1))
    lora = [p for n, p in c.unet.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)


def test_adamw8bit_state_is_uint8():
    big = torch.nn.Parameter(torch.randn(128, 64))  # bitsandbytes keeps tensors under 4096 elements in fp32
    opt = _make_optimizer([big], 1e-3, "adamw8bit", weight_decay=0.0)
    big.grad = torch.randn_like(big)
    opt.step()
    state = opt.state[big]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8


def test_generate_is_deterministic_and_batch_shaped(tiny_models):
    c = _load(tiny_models["sd-v"])
    enc = encode(c, _pixels(), "a red disc")
    e_opt = Cond(enc.e_tgt.embeds + 0.1)
    settings = SampleSettings(steps=4, etas=(0.5, 1.0), seeds=(0, 1), batch=3)
    first = generate(c, enc.e_tgt, e_opt, enc.uncond, settings, 64, 48)
    second = generate(c, enc.e_tgt, e_opt, enc.uncond, settings, 64, 48)
    assert [(s.eta, s.seed) for s in first] == [(0.5, 0), (1.0, 0), (0.5, 1), (1.0, 1)]
    assert first[0].image.size == (48, 64)
    assert all(a.image.tobytes() == b.image.tobytes() for a, b in zip(first, second, strict=True))
    assert first[0].image.tobytes() != first[2].image.tobytes()  # different seeds differ


def test_stop_flag_interrupts_with_resumable_state(tiny_sd):
    c = _load(tiny_sd)
    enc = encode(c, _pixels(), "a red disc")
    stop = StopFlag()
    calls = []

    def progress(event):
        calls.append(event["step"])
        if event["step"] == 3:
            stop.set()

    with pytest.raises(Interrupted) as info:
        optimize_embedding(c, enc.latent, enc.e_tgt, EmbedSettings(steps=10), progress=progress, stop=stop)
    assert info.value.state.stage == "A" and info.value.state.step == 3
    assert calls == [1, 2, 3]


def test_empty_prompt_is_refused(tiny_sd):
    from imagic_lite.errors import InputError

    c = _load(tiny_sd)
    with pytest.raises(InputError, match="prompt is empty"):
        encode(c, _pixels(), "   ")


def test_long_prompt_reports_cut_words(tiny_sd):
    c = _load(tiny_sd)
    enc = encode(c, _pixels(), "a dog " + "very " * 30 + "fluffy tail")
    assert enc.truncated.endswith("tail") or "tail" in enc.truncated.replace(" ", "")


def test_fingerprint_does_not_depend_on_load_dtype(tiny_models):
    fingerprints = {_load(tiny_models["sd"], weights=w).fingerprint for w in ("fp32", "bf16", "fp16")}
    assert len(fingerprints) == 1
    assert _load(tiny_models["sdxl"]).fingerprint not in fingerprints


def test_vae_tiling_really_tiles_at_native_resolution(tiny_sd):
    c = _load(tiny_sd, vae_tiling=True)
    assert c.vae.use_tiling and c.vae.tile_sample_min_size < c.native
    from imagic_lite.models import decode

    images = decode(c, torch.randn(1, 4, 32, 32))
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()
