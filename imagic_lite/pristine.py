"""The base UNet kept restorable, so one loaded model serves many photos (`Imagic.fit` again, `batch`).

A LoRA is removed structurally (PEFT wrappers give back their base layers, which never train). A full fine-tune
rewrites every weight and casts the UNet to fp32, so before the first one a CPU copy of the UNet's state is kept:
once per loaded model, the UNet's size in its load dtype, paid only by full mode (benchmarks/batch_bench.py
measures it)."""

from __future__ import annotations

from .models import Components


def reset_unet(c: Components) -> None:
    """Put `c.unet` back to the weights, dtypes and structure it was loaded with."""
    from .lora import has_lora

    if has_lora(c.unet):
        c.unet.unload_lora()
    if c.pristine is not None and c.unet_changed:
        # assign=True takes the copies' dtypes (the load dtypes), where copy_ would keep fp32 from the fine-tune
        c.unet.load_state_dict({k: v.to(c.device, copy=True) for k, v in c.pristine.items()}, assign=True)
        c.unet_changed = False


def before_base_change(c: Components) -> None:
    """Call before anything writes the base weights (a full fine-tune, a full bundle): keep them first."""
    if c.pristine is None:
        c.pristine = {k: v.detach().to(c.host, copy=True) for k, v in c.unet.state_dict().items()}
    c.unet_changed = True


def pristine_bytes(c: Components) -> int:
    """Host memory the kept copy holds (0 until a full fine-tune or full bundle needed it)."""
    return sum(t.numel() * t.element_size() for t in (c.pristine or {}).values())
