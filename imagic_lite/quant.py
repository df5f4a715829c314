"""Frozen-base storage formats: fp8 for every Linear and Conv2d layer, or bitsandbytes NF4/int8 for Linear layers.

diffusers' layerwise casting is inference-only: it recasts weights in place after each layer, which corrupts the
weights autograd saved for the backward pass. Ours saves only the fp8 copy and re-dequantizes it in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel scaling: SD weights are ~1e-2, where unscaled e4m3 keeps one or two bits."""
    w = weight.detach().float()
    amax = w.reshape(w.shape[0], -1).abs().amax(dim=1).clamp(min=1e-12)
    scale = (amax / FP8_MAX).reshape(-1, *([1] * (w.dim() - 1)))
    return (w / scale).to(FP8), scale


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _Fp8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w8, scale, bias):
        dtype = _compute_dtype(x)
        ctx.save_for_backward(w8, scale)
        ctx.x_dtype, ctx.dtype = x.dtype, dtype
        w = (w8.to(dtype) * scale.to(dtype))
        return F.linear(x.to(dtype), w, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        w8, scale = ctx.saved_tensors
        w = w8.to(grad.dtype) * scale.to(grad.dtype)
        return (grad @ w).to(ctx.x_dtype), None, None, None


class _Fp8ConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w8, scale, bias, stride, padding, dilation, groups):
        dtype = _compute_dtype(x)
        ctx.save_for_backward(w8, scale)
        ctx.conf = (x.shape, x.dtype, stride, padding, dilation, groups)
        w = w8.to(dtype) * scale.to(dtype)
        return F.conv2d(x.to(dtype), w, None if bias is None else bias.to(dtype), stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        w8, scale = ctx.saved_tensors
        shape, x_dtype, stride, padding, dilation, groups = ctx.conf
        w = w8.to(grad.dtype) * scale.to(grad.dtype)
        grad_x = torch.nn.grad.conv2d_input(shape, w, grad, stride, padding, dilation, groups)
        return grad_x.to(x_dtype), None, None, None, None, None, None, None


class Fp8Linear(nn.Linear):
    """nn.Linear whose frozen weight is stored in fp8 (PEFT still recognises it as a Linear to wrap)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Fp8LinearFn.apply(x, self.weight, self.weight_scale, self.bias)


class Fp8Conv2d(nn.Conv2d):
    """nn.Conv2d with fp8 weight storage; SD 1.5's UNet is 69 % convolution weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            raise NotImplementedError("fp8 storage supports zero padding only")
        return _Fp8ConvFn.apply(
            x, self.weight, self.weight_scale, self.bias, self.stride, self.padding, self.dilation, self.groups
        )


def _to_fp8(layer: nn.Module) -> None:
    w8, scale = _quantize_fp8(layer.weight)
    layer.weight = nn.Parameter(w8, requires_grad=False)
    layer.register_buffer("weight_scale", scale.to(torch.float32))
    layer.__class__ = Fp8Linear if type(layer) is nn.Linear else Fp8Conv2d


def store_fp8(model: nn.Module) -> int:
    """Convert every plain Linear/Conv2d weight of `model` to fp8 storage in place; returns layers converted."""
    count = 0
    for module in model.modules():
        if type(module) in (nn.Linear, nn.Conv2d):
            _to_fp8(module)
            count += 1
    return count


def quantize_bnb(model: nn.Module, kind: str, compute_dtype: torch.dtype, device: torch.device) -> int:
    """Replace Linear layers with bitsandbytes NF4 (`kind="nf4"`) or int8 layers, quantized on `device`."""
    try:
        import bitsandbytes as bnb
    except ImportError as exc:  # pragma: no cover - bitsandbytes is a dependency
        raise ConfigError(f"memory.storage = {kind!r} needs bitsandbytes: pip install bitsandbytes ({exc})") from None
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        weight = linear.weight.detach().to(compute_dtype).cpu()
        if kind == "nf4":
            new = bnb.nn.Linear4bit(
                linear.in_features, linear.out_features, bias=linear.bias is not None,
                compute_dtype=compute_dtype, quant_type="nf4", device="meta",
            )
            new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        elif kind == "int8":
            new = bnb.nn.Linear8bitLt(
                linear.in_features, linear.out_features, bias=linear.bias is not None,
                has_fp16_weights=False, threshold=6.0, device="meta",
            )
            new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        else:
            raise ConfigError(f"unknown quantization {kind!r}")
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach().to(compute_dtype).cpu(), requires_grad=False)
        setattr(parent, child, new.to(device))
    return len(targets)


def storage_bytes(model: nn.Module) -> int:
    """Bytes held by a model's parameters and buffers, whatever their storage format."""
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        total += t.numel() * t.element_size()
    return total


NORMS = (nn.GroupNorm, nn.LayerNorm)


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast weights to `dtype` but keep normalisation layers in fp32, for a module that only runs under autocast
    (the UNet): autocast runs norms in fp32 and the CPU kernels refuse fp32 input with half-precision norm weights;
    the norms are a negligible share of bytes. Outside autocast CUDA's norms refuse the mix: cast those modules
    whole."""
    model.to(dtype)
    if dtype != torch.float32:
        for module in model.modules():
            if isinstance(module, NORMS):
                module.float()
