"""The bench engine behind `imagic-lite bench` and `benchmarks/`: N steps of stages A, B and C per preset, with peak
memory, seconds per step and the projected full run, each also as a ratio to the paper's full fine-tuning.

Result layout (one JSON document, `SCHEMA` below): `env`, run settings, and `presets[name]` with `stages[S]` for
S in encode/A/B/C = {fit, error, label, peak_bytes, reserved_bytes, start_bytes, wall_s, s_per_step, it_per_s,
steps_timed, simulated_bytes, simulated_error}, plus `projected_s` and `ratios` (to `paper`; None where it did
not fit).
Timing: a progress callback stamps `time.perf_counter()` after every step; s/step is the mean over the steps after
the first `warmup` ones (stage C also reports `decode_s`, the VAE decode after its last step).
"""

from __future__ import annotations

import contextlib
import gc
import json
import platform
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .config import Preset, apply_overrides, load_preset
from .errors import InputError, OutOfMemory
from .files import atomic_path
from .memory import GiB, PeakMemory

SCHEMA = 1
PAPER = "paper"
PROMPT = "a photo of a dog lying down"
Event = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Scenario:
    """One preset's measurement: everything `bench_preset` needs, fixed before it starts."""

    model: str
    preset: Preset
    resolution: int | None  # None: the model's native size
    steps: int
    warmup: int
    device: torch.device


@dataclass
class StepTimer:
    """A progress callback that stamps the time of every step (after the GPU has finished it: stage C's loop has
    no `.item()` that would wait for the kernels)."""

    sync: bool = False
    start: float = field(default_factory=time.perf_counter)
    stamps: list[float] = field(default_factory=list)

    def __call__(self, _: dict[str, Any]) -> None:
        if self.sync:
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())

    def per_step(self, warmup: int) -> list[float]:
        edges = [self.start, *self.stamps]
        return [b - a for a, b in zip(edges, edges[1:], strict=False)][warmup:]


def free_device_memory(device: torch.device) -> None:
    """Give what dropped tensors held back to the card (the caching allocator keeps it otherwise)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _run_stage(device: torch.device, warmup: int, fn: Callable[[StepTimer], Any]) -> tuple[Any, dict]:
    """Run one stage under PeakMemory; an OOM becomes `fit: false` (tensors are released once we leave `except`)."""
    timer, out, error = StepTimer(sync=device.type == "cuda"), None, None
    with PeakMemory(device) as pm:
        timer.start = time.perf_counter()
        try:
            out = fn(timer)
        except (OutOfMemory, torch.OutOfMemoryError) as exc:
            error = str(exc).splitlines()[0][:300]
        end = time.perf_counter()
    steps = timer.per_step(warmup)  # (the next PeakMemory collects this stage's garbage before it starts)
    record = {
        "fit": error is None, "error": error, "label": pm.peak.label, "peak_bytes": pm.peak.peak_bytes,
        "reserved_bytes": pm.peak.reserved_bytes, "start_bytes": pm.peak.start_bytes, "wall_s": end - timer.start,
        "steps_timed": len(steps), "s_per_step": sum(steps) / len(steps) if steps and error is None else None,
        "decode_s": end - timer.stamps[-1] if timer.stamps and error is None else None,
    }
    record["it_per_s"] = 1 / record["s_per_step"] if record["s_per_step"] else None
    return out, record


def _side(components, resolution: int | None) -> int:
    side = resolution or components.native
    if side % components.multiple:
        raise InputError(f"--resolution {side} must be a multiple of {components.multiple} for this model")
    return side


def native_half(device: torch.device) -> bool:
    """Whether half precision runs at full speed: CUDA, or a CPU whose oneDNN has bf16 (AVX512-BF16 / AMX)."""
    with contextlib.suppress(AttributeError, RuntimeError):
        return device.type != "cpu" or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def effective_preset(preset: Preset, device: torch.device) -> tuple[Preset, dict[str, str]]:
    """The preset as benchmarked here: on a CPU without native bf16 (on an AVX2-only EPYC a bf16 convolution ran
    ~150x slower than fp32 in an ad-hoc check) half-precision weights become fp32; every other knob stays.
    Returns the changes made."""
    if preset.memory.weights == "fp32" or native_half(device):
        return preset, {}
    return replace(preset, memory=replace(preset.memory, weights="fp32")), {
        "memory.weights": "fp32 (this CPU has no native bf16)"}


def preset_of(entry: dict) -> Preset:
    """The settings a result entry was measured with, as a Preset again."""
    data = json.loads(json.dumps(entry["settings"]))  # tuples become the lists a TOML table would hold
    return apply_overrides(Preset(), {k: v for k, v in data.items() if v is not None}, "bench result")


def bench_preset(scn: Scenario, on_event: Event) -> dict:
    """Load the model with the preset's memory knobs, encode a random image, then run A, B and C."""
    from .imagic import finetune, generate, optimize_embedding
    from .models import encode, load_components

    preset, overrides = effective_preset(scn.preset, scn.device)
    device, total = scn.device, scn.warmup + scn.steps
    entry: dict[str, Any] = {"settings": preset.to_dict(), "overrides": overrides, "stages": {}}
    t0 = time.perf_counter()
    c, load = _run_stage(device, 0, lambda _: load_components(scn.model, preset.memory, device))
    entry.update(load_s=time.perf_counter() - t0, load=load)
    if c is None:
        return entry
    side = _side(c, scn.resolution)
    entry.update(side=side, compute_dtype=str(c.dtype).removeprefix("torch."), notes=list(c.notes))
    pixels = torch.rand((1, 3, side, side), generator=torch.Generator().manual_seed(0)) * 2 - 1
    stages = entry["stages"]
    enc, stages["encode"] = _run_stage(device, 0, lambda _: encode(c, pixels, PROMPT))
    on_event({"preset": preset.name, "stage": "encode", **stages["encode"]})
    if enc is None:
        return entry
    e_opt, stages["A"] = _run_stage(device, scn.warmup, lambda t: optimize_embedding(
        c, enc.latent, enc.e_tgt, replace(preset.embed, steps=total), progress=t))
    on_event({"preset": preset.name, "stage": "A", **stages["A"]})
    e_opt = e_opt[0] if e_opt is not None else enc.e_tgt  # after an OOM, B and C still get measured
    _, stages["B"] = _run_stage(device, scn.warmup, lambda t: finetune(
        c, enc.latent, e_opt, replace(preset.tune, steps=total), progress=t)[1])
    on_event({"preset": preset.name, "stage": "B", **stages["B"]})
    sample = replace(preset.sample, steps=total, etas=(1.0,), seeds=(0,), batch=1)
    _, stages["C"] = _run_stage(device, scn.warmup, lambda t: len(generate(
        c, enc.e_tgt, e_opt, enc.uncond, sample, side, side, progress=t)))
    on_event({"preset": preset.name, "stage": "C", **stages["C"]})
    return entry  # the components go with this frame; run_bench collects them before the next preset


def projected_seconds(preset: Preset, entry: dict) -> dict[str, float | None]:
    """The whole run at the preset's real step counts: A and B steps, and every (eta, seed) image of stage C
    (steps + decode; batching is not credited). None where a stage did not fit."""
    stages = entry.get("stages", {})
    per = {s: stages.get(s, {}).get("s_per_step") for s in ("A", "B", "C")}
    images = len(preset.sample.etas) * len(preset.sample.seeds)
    out: dict[str, float | None] = {
        "encode": stages.get("encode", {}).get("wall_s"),
        "A": None if per["A"] is None else per["A"] * preset.embed.steps,
        "B": None if per["B"] is None else per["B"] * preset.tune.steps,
        "C": None if per["C"] is None else images * (per["C"] * preset.sample.steps + stages["C"]["decode_s"]),
    }
    out["total"] = None if None in out.values() else sum(out.values())
    return out


def add_ratios(result: dict) -> None:
    """Every figure as a ratio to `paper` (peak bytes, s/step, projected time); None where either side is missing."""
    paper = result["presets"].get(PAPER) or {}

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    for entry in result["presets"].values():
        ratios: dict[str, Any] = {}
        for stage, rec in entry.get("stages", {}).items():
            ref = paper.get("stages", {}).get(stage, {}) if rec.get("fit") else {}
            ratios[stage] = {key: ratio(rec.get(k), ref.get(k)) if ref.get("fit") else None
                             for key, k in (("peak", "peak_bytes"), ("s_per_step", "s_per_step"))}
        ratios["projected_total"] = ratio(entry.get("projected_s", {}).get("total"),
                                          paper.get("projected_s", {}).get("total"))
        entry["ratios"] = ratios


def add_simulated(result: dict) -> None:
    """On CUDA results: the simulated peak (imagic_lite.simulate, from the shipped table or the user cache only; a
    bench never starts a simulation) beside each measured one, and simulated / measured - 1."""
    if result["env"]["device"] != "cuda":
        return  # CPU peak RSS is not what the simulation predicts
    from .vram import cached_entry

    for entry in result["presets"].values():
        if "side" not in entry:
            continue
        sim = cached_entry(result["model"], preset_of(entry), entry["side"])
        for stage, rec in entry["stages"].items():
            simulated = None if sim is None else sim["stages"][stage]["peak_allocated_bytes"]
            rec["simulated_bytes"] = simulated
            rec["simulated_error"] = simulated / rec["peak_bytes"] - 1 if simulated and rec.get("fit") else None


def environment(device: torch.device, command: str) -> dict[str, Any]:
    """Where and with what a result was measured."""
    from importlib.metadata import PackageNotFoundError, version

    import psutil

    versions = {}
    for name in ("torch", "diffusers", "transformers", "peft", "bitsandbytes"):
        with contextlib.suppress(PackageNotFoundError):
            versions[name] = version(name)
    env: dict[str, Any] = {
        "device": device.type, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command,
        "python": platform.python_version(), "platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
        "ram_bytes": psutil.virtual_memory().total, "load_average": list(psutil.getloadavg()), **versions,
    }
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        env.update(device_name=torch.cuda.get_device_name(device), total_bytes=total, cuda=torch.version.cuda,
                   driver=_command_line("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"),
                   context_bytes=total - free - torch.cuda.memory_reserved(device))
    else:
        env["device_name"] = _command_line("sh", "-c", "grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2") or "cpu"
    return env


def _command_line(*argv: str) -> str | None:
    """The first line a command prints, or None when it cannot run."""
    import subprocess

    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out else None


def apply_cap(cap_gb: float | None, device: torch.device) -> dict[str, Any]:
    """Emulate a smaller card: the allocator may use the cap minus the CUDA context this process already holds."""
    if cap_gb is None or device.type != "cuda":
        return {"cap_gb": cap_gb, "cap_applied": False}
    torch.cuda.init()
    free, total = torch.cuda.mem_get_info(device)
    context = total - free - torch.cuda.memory_reserved(device)
    allowed = max(0, int(cap_gb * GiB) - context)
    torch.cuda.set_per_process_memory_fraction(min(1.0, allowed / total), device)
    return {"cap_gb": cap_gb, "cap_applied": True, "context_bytes": context, "allocator_limit_bytes": allowed}


def run_bench(model: str, presets: list[str], resolution: int | None, steps: int, warmup: int,
              cap_gb: float | None, device: torch.device | str | None = None, *, include_paper: bool = True,
              command: str | None = None, on_event: Event | None = None) -> dict:
    """Measure every preset in turn (the paper's full fine-tuning first, unless `include_paper` is False)."""
    from .models import detect_family, pick_device, resolve_model

    if steps < 1 or warmup < 0:
        raise InputError(f"--steps must be >= 1 and --warmup >= 0 (got {steps}, {warmup})")
    device = pick_device(str(device)) if device is not None else pick_device()
    names = ([PAPER] if include_paper and PAPER not in presets else []) + list(dict.fromkeys(presets))
    loaded = [load_preset(n) for n in names]  # unknown names fail here, before any model is built
    family = detect_family(resolve_model(model)).name
    loaded = [p.for_family(family) for p in loaded]  # e.g. the NF4 base some presets use for SDXL
    result: dict[str, Any] = {
        "schema": SCHEMA, "model": model, "family": family, "resolution": resolution, "steps": steps, "warmup": warmup,
        "env": environment(device, command if command is not None else " ".join(sys.argv)), "presets": {}}
    result.update(apply_cap(cap_gb, device))
    try:
        for preset in loaded:
            scn = Scenario(model, preset, resolution, steps, warmup, device)
            entry = bench_preset(scn, on_event or (lambda _: None))
            entry["projected_s"] = projected_seconds(preset, entry)
            result["presets"][preset.name] = entry
            free_device_memory(device)
    finally:
        if result["cap_applied"]:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    add_ratios(result)
    add_simulated(result)
    return result


def results_name(result: dict) -> str:
    env = result["env"]
    gpu = re.sub(r"[^a-z0-9]+", "-", env.get("device_name", "gpu").lower()).strip("-")
    where = "cpu" if env["device"] == "cpu" else f"cuda-{gpu}"
    arch = result["model"].removeprefix("arch:").replace("/", "_").replace(":", "_")
    size = f"-{side_of(result)}px" if side_of(result) else ""
    cap = f"-cap{result['cap_gb']:g}gb" if result.get("cap_gb") else ""
    stamp = env["date"][:19].replace(":", "").replace("-", "")
    return f"bench-{where.lower()}-{arch}{size}{cap}-{stamp}.json"


def write_results(result: dict, out_dir: str | Path) -> Path:
    """Write the result JSON atomically under `out_dir`; returns its path."""
    path = Path(out_dir) / results_name(result)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(result, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    return path


def _fmt(value: float | None, kind: str) -> str:
    """Table cells: GiB, a ratio, seconds or a signed percentage; '-' for a missing value."""
    if value is None:
        return "-"
    return {"gib": f"{value / GiB:.2f}", "x": f"{value:.2f}x", "pct": f"{value:+.0%}",
            "s": f"{value:.2f}" if value < 100 else f"{value:.0f}"}[kind]


def side_of(result: dict) -> int | None:
    return next((e["side"] for e in result["presets"].values() if "side" in e), result.get("resolution"))


def render_table(result: dict) -> str:
    """The result as a markdown table; the memory column says what it measured (CPU RSS is not VRAM)."""
    env = result["env"]
    cpu = env["device"] == "cpu"
    what = "peak RSS of the process (CPU; not VRAM)" if cpu else "CUDA max_memory_allocated"
    lines = [
        f"### {result['model']} at {side_of(result)} px on {env.get('device_name', env['device'])}"
        + (f", capped at {result['cap_gb']:g} GiB" if result.get("cap_applied") else ""),
        "",
        f"{result['warmup']} warm-up + {result['steps']} timed steps per stage; memory = {what}; "
        f"torch {env['torch']}, diffusers {env['diffusers']}, bitsandbytes {env['bitsandbytes']}; {env['date']}"
        + (f"; load average {env['load_average'][0]:.1f} on {env['cpu_threads']} threads (shared machine: timings "
           "are noisy)." if cpu and env.get("load_average") else "."),
        "",
        *[f"On this device {name} ran with {k} = {v}." for name, e in result["presets"].items()
          for k, v in e.get("overrides", {}).items()],
        "",
        "| preset | stage | fit | peak GiB | x paper | simulated GiB | sim. error | s/step | x paper | projected run "
        "|",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in result["presets"].items():
        total = entry.get("projected_s", {}).get("total")
        if not entry.get("stages"):
            lines.append(f"| {name} | load | no | - | - | - | - | - | - | - |")
        for stage, rec in entry.get("stages", {}).items():
            ratio = entry.get("ratios", {}).get(stage, {})
            run = f"{_fmt(total, 's')} s ({_fmt(entry['ratios']['projected_total'], 'x')})" if stage == "C" else ""
            cells = [(rec["peak_bytes"], "gib"), (ratio.get("peak"), "x"), (rec.get("simulated_bytes"), "gib"),
                     (rec.get("simulated_error"), "pct"), (rec.get("s_per_step"), "s"), (ratio.get("s_per_step"), "x")]
            row = " | ".join(_fmt(v, kind) for v, kind in cells)
            lines.append(f"| {name} | {stage} | {'yes' if rec['fit'] else 'no'} | {row} | {run} |")
    if result["env"]["device"] == "cuda":
        lines += ["", "simulated = `imagic-lite bench --simulate` for the same settings (shipped or cached; '-' where "
                  "none was), against CUDA max_memory_allocated; sim. error = simulated / measured - 1."]
    return "\n".join(lines) + "\n"
