"""Bundle size for full-size SD 1.5 with the default LoRA (rank 4, alpha 4, to_q/to_k/to_v/to_out.0).

The UNet is built on the `meta` device (no weights are allocated: only the LoRA shapes matter); a real bundle of
those shapes is then written with `save_bundle`, so the figure includes the header and metadata.
Usage: python benchmarks/bundle_size.py   -> benchmarks/results/bundle-size-sd15.json
"""

from __future__ import annotations

import json
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imagic_lite.bundle import Bundle, _versions, load_bundle, lora_shapes, save_bundle  # noqa: E402
from imagic_lite.config import TuneSettings  # noqa: E402
from imagic_lite.files import write_text_atomic  # noqa: E402
from imagic_lite.lora import lora_config  # noqa: E402
from imagic_lite.models import Cond  # noqa: E402

RESULT = Path(__file__).resolve().parent / "results" / "bundle-size-sd15.json"
SD15_UNET = {  # stable-diffusion-v1-5 unet/config.json, the fields that shape the attention layers
    "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2, "cross_attention_dim": 768,
    "attention_head_dim": 8, "sample_size": 64, "in_channels": 4, "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}


def measure() -> dict:
    """Write the SD 1.5 default-LoRA bundle to a temporary folder and report its size with and without thumbnail."""
    from diffusers import UNet2DConditionModel
    from PIL import Image

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    config = lora_config(TuneSettings())
    shapes = lora_shapes(unet, config)
    weights = {k: torch.full(s, 0.01) for k, s in shapes.items()}
    e = Cond(torch.zeros(1, 77, 768))
    meta = {"base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5", "unet_fingerprint": "0" * 16,
            "family": "sd", "prediction_type": "epsilon", "height": "512", "width": "512",
            "prompt": "a photo of a dog lying down on the grass", "preset": "8gb", "settings": "{}",
            "tune_mode": "lora"}
    noise = Image.effect_noise((512, 512), 64).convert("RGB")  # thumbnail bytes are raw uint8: content-independent
    bundle = Bundle(e, e, weights, "lora", config, meta, noise)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sd15.imagic.safetensors"
        without = save_bundle(path, bundle, thumbnail=False)
        with_thumb = save_bundle(path, bundle)
        tensors = len(load_bundle(path).weights) + 3
    lora_params = sum(torch.Size(s).numel() for s in shapes.values())
    return {
        "model": "SD 1.5 UNet (block_out_channels 320/640/1280/1280, cross_attention_dim 768)",
        "lora": config, "lora_parameters": lora_params, "lora_bytes_fp16": 2 * lora_params,
        "bytes_with_thumbnail": with_thumb, "bytes_without_thumbnail": without,
        "mib_with_thumbnail": round(with_thumb / 2**20, 3), "tensors": tensors,
        "target_bytes": 4 * 2**20, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(), "command": "python benchmarks/bundle_size.py",
    }


def main() -> None:
    result = measure()
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(RESULT, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
