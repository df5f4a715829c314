"""Resumable checkpoints for stages A and B: tensors in safetensors, everything else as JSON metadata.

No pickle: optimizer state dicts are flattened into named tensors plus a JSON skeleton, and rebuilt on load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .errors import InputError
from .files import atomic_path
from .imagic import StageState
from .models import Cond

CHECKPOINT_NAME = "checkpoint.imagic-resume.safetensors"
FORMAT = "imagic-lite.checkpoint/1"
START_OVER = "pass --overwrite instead of --resume to start over (that discards the checkpoint)"


def _flatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested dict/list with a reference to a named entry of `tensors`."""
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous()
        return {"__tensor__": name}
    if isinstance(obj, dict):
        return {"__dict__": [[_flatten(k, tensors), _flatten(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, list | tuple):
        return {"__list__": [_flatten(v, tensors) for v in obj], "tuple": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, dict) and "__list__" in obj:
        items = [_unflatten(v, tensors) for v in obj["__list__"]]
        return tuple(items) if obj.get("tuple") else items
    return obj


def save_checkpoint(path: Path, state: StageState, run_key: str, e_opt: Cond | None) -> None:
    """Write the stage state (and e_opt once stage A is done) atomically: a kill mid-write leaves the old file."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    skeleton = {
        "stage": state.stage, "step": state.step,
        "params": _flatten(state.params, tensors),
        "optimizer": _flatten(state.optimizer, tensors),
        "generator": _flatten(state.generator, tensors),
        "scaler": _flatten(state.scaler, tensors),
        "e_opt": None if e_opt is None else _flatten({"embeds": e_opt.embeds, "pooled": e_opt.pooled}, tensors),
    }
    meta = {"format": FORMAT, "run_key": run_key, "state": json.dumps(skeleton)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_checkpoint(path: Path, run_key: str) -> tuple[StageState, Cond | None]:
    """Read a checkpoint written by `save_checkpoint` for the same run (same image, prompt, model, settings)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
        skeleton = json.loads(meta["state"])
    except Exception as exc:
        raise InputError(f"cannot resume: {path} is not a readable checkpoint ({type(exc).__name__}); {START_OVER}"
                         ) from None
    if meta.get("format") != FORMAT:
        raise InputError(f"cannot resume: {path} is not an imagic-lite checkpoint; {START_OVER}")
    if meta.get("run_key") != run_key:
        raise InputError(f"cannot resume: {path} belongs to a different image, prompt, model or settings; rerun "
                         f"with the same ones and --resume, or {START_OVER}")
    state = StageState(
        stage=skeleton["stage"], step=int(skeleton["step"]),
        params=_unflatten(skeleton["params"], tensors),
        optimizer=_unflatten(skeleton["optimizer"], tensors),
        generator=_unflatten(skeleton["generator"], tensors),
        scaler=_unflatten(skeleton.get("scaler") or {}, tensors),  # absent in checkpoints written before fp16 scaling
    )
    e_opt = None
    if skeleton["e_opt"] is not None:
        parts = _unflatten(skeleton["e_opt"], tensors)
        e_opt = Cond(parts["embeds"], parts["pooled"])
    return state, e_opt
