"""Simulated peaks read back, without torch: card verdicts and projections, the table shipped for the full-size
architectures, the user cache, and the preset `--vram N|auto` and `imagic-lite presets` choose for a model.

The simulation itself (fake tensors, the live-bytes counter) is imagic_lite.simulate; it is imported only when a
model, side and preset have no simulation yet.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import platform
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .config import Preset

GiB = 2**30
SCHEMA = 1
PARTS = ("weights", "trainable", "grads", "optimizer", "activations")
STAGES = ("encode", "A", "B", "C")


def model_path(model: str) -> Path:
    """The model's folder: `arch:NAME` directly (no torch), anything else through models.resolve_model."""
    if model.startswith("arch:"):
        path = Path(__file__).resolve().parent / "archs" / model[5:]
        if (path / "model_index.json").is_file():
            return path
    from .models import resolve_model

    return resolve_model(model)


def family_of_index(index: dict) -> str:
    """'sdxl' when the pipeline (its model_index.json) has a second text encoder, else 'sd'."""
    return "sdxl" if index.get("text_encoder_2", [None])[0] is not None else "sd"


def family_name(path: Path) -> str:
    return family_of_index(json.loads((path / "model_index.json").read_text()))


def config_fingerprint(path: Path) -> str:
    """Identity of an architecture: its UNet, VAE and text-encoder configs without the bookkeeping keys (`_name...`,
    `_diffusers_version`), so every fine-tune of one architecture shares it (memory does not depend on weights)."""
    digest = hashlib.sha256()
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        config = path / name / "config.json"
        if config.is_file():
            data = {k: v for k, v in json.loads(config.read_text()).items() if not k.startswith("_")}
            data.pop("transformers_version", None)
            digest.update(name.encode() + json.dumps(data, sort_keys=True).encode())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# Cards: what a verdict and a projection assume. Peak dense tensor TFLOPS with fp32 accumulation (what PyTorch's
# bf16/fp16 matmuls and convolutions use); H100 SXM, A100, RTX 4090 and T4 from FIELD-NOTES §4 (vendor sheets),
# RTX 3060 from its 112 tensor cores x 1.777 GHz x 128 FMA (the Ampere GA10x whitepaper's method, fp32-accumulate
# rate halved as on every GeForce). fp32 = non-tensor FP32 peak (datasheets), used for the fp32 presets.


@dataclass(frozen=True)
class Card:
    name: str
    memory_gib: float
    half_tflops: float  # bf16, or fp16 where the card has no bf16 (T4)
    fp32_tflops: float
    bf16: bool


CARDS = (
    Card("H100", 80, 989.0, 67.0, True),
    Card("A100", 40, 312.0, 19.5, True),
    Card("RTX 4090", 24, 165.2, 82.6, True),
    Card("RTX 3060", 12, 25.5, 12.7, True),
    Card("T4", 16, 65.0, 8.1, False),
)
# Share of the peak a run reaches. 0.35: diffusers' published SD 1.5 inference speeds (FIELD-NOTES §4: RTX 4090
# ~40 it/s, T4 ~7 it/s) against this simulation's FLOPs per step put the 4090 near 0.39 and the T4 near 0.17 (see
# `implied_fraction`); training steps at batch 1 launch more small kernels, so treat projections as optimistic.
FRACTION = 0.35
# The card must also hold what the allocator's max_memory_allocated does not count. ASSUMED until the first GPU
# session (benchmarks/gpu_check.sh) measures them: the CUDA context with lazy module loading (CUDA >= 11.7) plus
# cuBLAS handles ~0.5 GiB (the figure imagic-lite has used since its first memory model), and the caching
# allocator's rounding/fragmentation plus cuDNN and cuBLAS workspaces (allocated through the caching allocator but
# invisible here) at 15 % of the peak.
CONTEXT_BYTES = int(0.5 * GiB)
FRAGMENTATION = 0.15
CARD_GIB = (4, 6, 8, 12, 16, 24)


def card_need(peak_bytes: int) -> int:
    """Bytes a card must have for a run whose allocator peak is `peak_bytes`."""
    return int(peak_bytes * (1 + FRAGMENTATION)) + CONTEXT_BYTES


def smallest_card(peak_bytes: int) -> int | None:
    return next((gb for gb in CARD_GIB if card_need(peak_bytes) <= gb * GiB), None)


# ---------------------------------------------------------------------------------------------------------------
# A preset's verdict: whole-run peak, what dominates, which card, how long


def whole_run(entry: dict[str, Any]) -> dict[str, Any]:
    """The run's peak (the largest stage peak), the stage it is in, and the largest single transient."""
    stages = entry["stages"]
    top = max(stages, key=lambda s: stages[s]["peak_allocated_bytes"])
    big = max(stages, key=lambda s: stages[s]["largest_transient"]["bytes"])
    return {"peak_allocated_bytes": stages[top]["peak_allocated_bytes"], "peak_stage": top,
            "largest_transient": {"stage": big, **stages[big]["largest_transient"]}}


def flops_per_step(entry: dict[str, Any]) -> dict[str, float | None]:
    """FLOPs of one A step, one B step, one DDIM step of a batch (with guidance), one decode, one encode."""
    st = entry["stages"]
    decode = st["C"].get("decode_flops") or 0
    return {"encode": st["encode"]["flops"], "A": st["A"]["flops"] / st["A"]["steps"],
            "B": st["B"]["flops"] / st["B"]["steps"], "C_step": (st["C"]["flops"] - decode) / st["C"]["steps"],
            "decode": decode}


def projected_seconds(entry: dict[str, Any], preset: Preset, card: Card) -> dict[str, float]:
    """Seconds per stage at the preset's real step counts if the card ran at FRACTION of its peak (a projection,
    not a measurement): bf16/fp16 peak for half-precision presets, FP32 peak for fp32 ones."""
    fl = flops_per_step(entry)
    fp32 = preset.memory.weights == "fp32" or preset.tune.mode == "full"
    rate = (card.fp32_tflops if fp32 else card.half_tflops) * 1e12 * FRACTION
    images = len(preset.sample.etas) * len(preset.sample.seeds)
    batches = math.ceil(images / preset.sample.batch)
    out = {"encode": fl["encode"] / rate, "A": fl["A"] * preset.embed.steps / rate,
           "B": fl["B"] * preset.tune.steps / rate,
           "C": batches * (fl["C_step"] * preset.sample.steps + fl["decode"]) / rate}
    out["total"] = sum(out.values())
    return {k: round(v, 1) for k, v in out.items()}


def verdict(entry: dict[str, Any], preset: Preset) -> dict[str, Any]:
    run = whole_run(entry)
    need = card_need(run["peak_allocated_bytes"])
    return {**run, "card_need_bytes": need, "smallest_card_gib": smallest_card(run["peak_allocated_bytes"]),
            "flops_per_step": flops_per_step(entry),
            "projected_s": {card.name: projected_seconds(entry, preset, card) for card in CARDS}}


def assumptions() -> dict[str, Any]:
    return {"context_bytes": CONTEXT_BYTES, "fragmentation": FRAGMENTATION, "fraction_of_peak": FRACTION,
            "card_need": "peak_allocated_bytes * (1 + fragmentation) + context_bytes",
            "cards": [c.__dict__ for c in CARDS],
            "sources": {"context_bytes": "assumed (CUDA context with lazy loading + cuBLAS handles); gpu_check.sh "
                                         "measures it", "fragmentation": "assumed; gpu_check.sh measures "
                                                                         "max_memory_reserved / max_memory_allocated",
                        "tflops": "FIELD-NOTES §4 (H100, A100, 4090, T4) and vendor datasheets (fp32, RTX 3060)",
                        "fraction_of_peak": "FIELD-NOTES §4 inference speeds against simulated FLOPs"}}


# ---------------------------------------------------------------------------------------------------------------
# Many presets, results files and the cache


def environment(command: str) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    env: dict[str, Any] = {"device": "simulated", "simulated_on": "fake tensors on CPU (no GPU)",
                           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command,
                           "python": platform.python_version(), "platform": platform.platform(),
                           "imagic-lite": __version__}
    for name in ("torch", "diffusers", "transformers", "peft", "bitsandbytes"):
        with contextlib.suppress(PackageNotFoundError):
            env[name] = version(name)
    return env


def preset_key(model_fingerprint: str, side: int, preset: Preset) -> str:
    """Cache identity: the architecture, the side, the preset's settings and the simulation's schema (bump SCHEMA
    when the simulation changes what it counts)."""
    settings = json.dumps(preset.to_dict(), sort_keys=True, default=str)
    raw = f"{SCHEMA}|{model_fingerprint}|{side}|{settings}"
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def cache_dir() -> Path:
    """`$IMAGIC_LITE_CACHE_DIR`, else `$XDG_CACHE_HOME/imagic-lite`, else ~/.cache/imagic-lite; then `simulated/`."""
    import os

    root = os.environ.get("IMAGIC_LITE_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or
                                                            Path.home() / ".cache") / "imagic-lite"
    return Path(root) / "simulated"


def shipped_table() -> dict[str, Any]:
    """Simulations shipped with the package for the full-size architectures (written by benchmarks/simulate.py)."""
    path = Path(__file__).resolve().parent / "archs" / "simulated.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _key_of(model: str, preset: Preset, resolution: int | None) -> tuple[str, Preset, int]:
    path = model_path(model)
    preset = preset.for_family(family_name(path))
    side = resolution or _native(path)
    return preset_key(config_fingerprint(path), side, preset), preset, side


def cached_entry(model: str, preset: Preset, resolution: int | None = None) -> dict[str, Any] | None:
    """A simulation already done for this architecture, side and settings (shipped, or in the user cache)."""
    key, _, _ = _key_of(model, preset, resolution)
    hit = shipped_table().get(key)
    file = cache_dir() / f"{key}.json"
    if hit is None and file.is_file():
        with contextlib.suppress(OSError, ValueError):
            hit = json.loads(file.read_text())
    return hit


def simulate_cached(model: str, preset: Preset, resolution: int | None = None,
                    on_miss: Callable[[str], None] | None = None) -> dict[str, Any]:
    """One preset's simulation from the shipped table or the user cache, else run it and cache it."""
    from .files import write_text_atomic

    hit = cached_entry(model, preset, resolution)
    if hit is not None:
        return hit
    key, preset, side = _key_of(model, preset, resolution)
    if on_miss is not None:
        on_miss(preset.name)
    from .simulate import simulate_preset

    entry = simulate_preset(model, preset, side)
    file = cache_dir() / f"{key}.json"
    file.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(file, json.dumps(entry))
    return entry


def _native(path: Path) -> int:
    """The model's native side in pixels from its configs (as Components.native, without building anything)."""
    unet = json.loads((path / "unet" / "config.json").read_text())
    vae = json.loads((path / "vae" / "config.json").read_text())
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def results_name(result: dict[str, Any]) -> str:
    arch = result["model"].removeprefix("arch:").replace("/", "_").replace(":", "_")
    stamp = result["env"]["date"][:19].replace(":", "").replace("-", "")
    return f"sim-{arch}-{result['resolution']}px-{stamp}.json"


def write_results(result: dict[str, Any], out_dir: str | Path) -> Path:
    from .files import write_text_atomic

    path = Path(out_dir) / results_name(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(result, indent=1) + "\n")
    return path


def _gib(x: float | None) -> str:
    return "-" if x is None else f"{x / GiB:.2f}"


def render_table(result: dict[str, Any]) -> str:
    """Markdown: per preset and stage the simulated peak and its parts; per preset the card verdict."""
    a = result["assumptions"]
    lines = [f"### {result['model']} at {result['resolution']} px, simulated (fake tensors; not a GPU measurement)",
             "",
             f"Peak allocated GiB per stage (what `torch.cuda.max_memory_allocated` would report); a card of N GiB "
             f"fits when peak x {1 + a['fragmentation']:.2f} + {a['context_bytes'] / GiB:.1f} GiB (CUDA context; "
             f"both assumed until a GPU measures them) <= N. {result['env']['date']}, torch {result['env']['torch']}, "
             f"diffusers {result['env']['diffusers']}.", "",
             "| preset | encode | A | B | C | whole run | at the peak: weights / trainable / grads / optimizer / "
             "activations | largest transient | card |", "|---|---|---|---|---|---|---|---|---|"]
    for name, entry in result["presets"].items():
        st, v = entry["stages"], entry["verdict"]
        parts = st[v["peak_stage"]]["parts_at_peak"]
        big = v["largest_transient"]
        card = f"{v['smallest_card_gib']} GB" if v["smallest_card_gib"] else "> 24 GB"
        lines.append(f"| {name} | " + " | ".join(_gib(st[s]["peak_allocated_bytes"]) for s in STAGES)
                     + f" | **{_gib(v['peak_allocated_bytes'])}** ({v['peak_stage']}) | "
                     + " / ".join(_gib(parts[p]) for p in PARTS)
                     + f" | {big['bytes'] / 2**20:.0f} MiB `{big['op']}` in {big['where']} | {card} |")
    notes = sorted({n for e in result["presets"].values() for n in e.get("stand_ins", [])})
    lines += ["", *[f"Stand-in: {n}." for n in notes]]
    lines += ["", f"Projected seconds for the whole run (encode + A + B + C at the preset's step counts) at "
                  f"{a['fraction_of_peak']:.0%} of each card's peak: projections, not measurements.", "",
              "| preset | GFLOP per B step | " + " | ".join(c["name"] for c in a["cards"]) + " |",
              "|---|---|" + "---|" * len(a["cards"])]
    for name, entry in result["presets"].items():
        v = entry["verdict"]
        lines.append(f"| {name} | {v['flops_per_step']['B'] / 1e9:.0f} | "
                     + " | ".join(f"{v['projected_s'][c['name']]['total']:.0f}" for c in a["cards"]) + " |")
    return "\n".join(lines) + "\n"


def choose_preset_for_card(gb: float, model: str, resolution: int | None = None,
                           on_miss: Callable[[str], None] | None = None) -> tuple[Preset, int]:
    """For `--vram N|auto`: the fastest card preset (the largest `vram_gb`; a larger card's preset trades memory for
    speed) whose simulated whole run for `model` at `resolution`, plus the card allowance, fits `gb` GiB. Returns it
    with its simulated peak."""
    from .config import all_presets
    from .errors import ConfigError

    cards = sorted((p for p in all_presets() if p.vram_gb is not None), key=lambda p: p.vram_gb, reverse=True)
    needs = []
    for preset in cards:
        peak = whole_run(simulate_cached(model, preset, resolution, on_miss))["peak_allocated_bytes"]
        if card_need(peak) <= gb * GiB:
            return preset, peak
        needs.append(f"{preset.name} {card_need(peak) / GiB:.1f}")
    raise ConfigError(f"{gb:.1f} GB is below what every preset needs for {model} (simulated, GiB: "
                      f"{', '.join(needs)}); use --preset cpu or a smaller --resolution")
