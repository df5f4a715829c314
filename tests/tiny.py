"""Tiny randomly initialised diffusers pipelines built in code (as diffusers' own tests do), saved as real folders.

Kinds: `sd` (SD 1.x-style, epsilon), `sd-v` (SD 2.x-style, v-prediction), `sdxl` (two encoders, pooled, time ids).
"""

from __future__ import annotations

from pathlib import Path

import torch

ASSETS = Path(__file__).parent.parent / "imagic_lite" / "archs"


def _tokenizer():
    from transformers import CLIPTokenizer

    folder = ASSETS / "tokenizer"
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def _text_config(hidden: int = 32, projection: int | None = None):
    from transformers import CLIPTextConfig

    extra = {"projection_dim": projection} if projection else {}
    return CLIPTextConfig(
        bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_size=hidden, intermediate_size=37,
        layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2, vocab_size=514, hidden_act="gelu",
        max_position_embeddings=77, **extra,
    )


def build_tiny_pipeline(path: Path, kind: str = "sd", seed: int = 0, sample_size: int = 32) -> Path:
    """Write a tiny pipeline of `kind` to `path` (native resolution 2 x `sample_size` px) and return `path`."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    sdxl = kind == "sdxl"
    unet_extra = (
        {"addition_embed_type": "text_time", "addition_time_embed_dim": 8,
         "projection_class_embeddings_input_dim": 80, "cross_attention_dim": 64,
         "transformer_layers_per_block": (1, 2), "attention_head_dim": (2, 4), "use_linear_projection": True}
        if sdxl else {"cross_attention_dim": 32}
    )
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32, sample_size=sample_size, **unet_extra,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4, sample_size=2 * sample_size,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], norm_num_groups=32,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        prediction_type="v_prediction" if kind == "sd-v" else "epsilon",
    )
    if sdxl:
        pipe = StableDiffusionXLPipeline(
            vae=vae, unet=unet, scheduler=scheduler,
            text_encoder=CLIPTextModel(_text_config()), tokenizer=_tokenizer(),
            text_encoder_2=CLIPTextModelWithProjection(_text_config(projection=32)), tokenizer_2=_tokenizer(),
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=vae, unet=unet, scheduler=scheduler, text_encoder=CLIPTextModel(_text_config()),
            tokenizer=_tokenizer(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipe.save_pretrained(path, safe_serialization=True)
    return path
