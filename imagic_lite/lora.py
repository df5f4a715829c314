"""LoRA on the UNet through PEFT: add an adapter from TuneSettings, read its weights out, put them back.

Key names are PEFT's (`down_blocks.0....to_q.lora_A.weight`), the layout diffusers' `load_lora_weights` reads.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .config import TuneSettings

ADAPTER = "default"


def lora_config(tune: TuneSettings) -> dict[str, Any]:
    """The adapter's shape as plain data (stored in bundles; `init` is not part of the shape)."""
    return {"r": tune.rank, "lora_alpha": tune.alpha, "target_modules": sorted(tune.targets)}


def add_lora(unet: nn.Module, config: dict[str, Any], seed: int = 0) -> list[nn.Parameter]:
    """Add a LoRA adapter and return its parameters, in fp32 whatever the base dtype.

    A is Kaiming-uniform from a seeded generator and B is zero, so the adapter starts as the identity and a run
    is reproducible. Over a half-precision or fp8 base A is drawn in fp32 after the upcast, not rounded to the
    base's dtype."""
    from peft import LoraConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(
            LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"], target_modules=list(config["target_modules"])),
            adapter_name=ADAPTER,
        )
    named = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(seed)
    for name, p in named:
        rounded = p.dtype != torch.float32  # PEFT initialised it in fp32, then cast it to the base's fp16/bf16/fp8
        p.data = p.data.float()  # trainables stay fp32 even over an fp16/fp8/NF4 base
        if rounded and ".lora_A." in name:
            # Over fp8 the cast left 60 distinct values of 256: draw A again after the upcast, as PEFT draws it
            # (Kaiming-uniform, a = sqrt(5)), on the CPU so the values do not depend on the device.
            weight = torch.empty(p.shape)
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
            p.data = weight.to(p.device)
    return [p for _, p in named]


def has_lora(unet: nn.Module) -> bool:
    return bool(getattr(unet, "_hf_peft_config_loaded", False))


def lora_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(unet).items()}


def expected_lora_shapes(unet: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in lora_state_dict(unet).items()}


def load_lora(unet: nn.Module, config: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """Add an adapter of `config`'s shape and load `state` into it; names and shapes must match exactly."""
    from peft.utils import set_peft_model_state_dict

    if has_lora(unet):
        unet.delete_adapters(ADAPTER)
    add_lora(unet, config)
    expected = expected_lora_shapes(unet)
    if set(expected) != set(state):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ValueError(f"LoRA keys do not match the model (missing {missing[:2]}, unexpected {extra[:2]})")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(f"LoRA tensor {key} has shape {tuple(state[key].shape)}, the model needs {shape}")
    device = next(p for p in unet.parameters() if p.requires_grad).device
    set_peft_model_state_dict(unet, {k: v.float().to(device) for k, v in state.items()}, adapter_name=ADAPTER)
    unet.requires_grad_(False)
