"""Peak memory: measuring one stage (CUDA allocator peaks, or CPU peak RSS, which is not VRAM), a small model that
estimates the peak per stage and preset, and choosing a preset for a memory budget (`--vram auto`).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .config import Preset, all_presets
from .errors import ConfigError

if TYPE_CHECKING:
    import torch

GiB = 2**30
STAGES = ("A", "B", "C")

# ---------------------------------------------------------------------------------------------------------------
# Measuring one stage


@dataclass(frozen=True)
class Peak:
    """One stage's peak. `label` says what was measured: CUDA allocator bytes, or the CPU process's peak RSS."""

    label: str  # "cuda_max_allocated" | "cpu_peak_rss" (VmHWM) | "cpu_rss_sampled" (psutil thread)
    peak_bytes: int  # CUDA max_memory_allocated, or CPU peak resident set size of the whole process
    start_bytes: int  # allocated / RSS when the stage began (weights already resident)
    reserved_bytes: int | None = None  # CUDA max_memory_reserved (what the card really had to give)


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _reset_hwm() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS; False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def _trim_heap() -> None:
    """Give freed heap pages back to the OS so a stage's RSS does not start with the previous stage's garbage."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class _RssSampler:
    """Fallback where VmHWM cannot be reset: sample RSS every 2 ms in a thread (misses shorter spikes)."""

    def __init__(self) -> None:
        self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _rss())


class PeakMemory:
    """Context manager measuring one stage's peak on `device`; the result is in `.peak` after the block, also when
    the block raised (an OOM is a measurement too)."""

    def __init__(self, device: torch.device | str) -> None:
        import torch

        self.device = torch.device(device)
        self.peak: Peak | None = None
        self._start = 0
        self._sampler: _RssSampler | None = None

    def __enter__(self) -> PeakMemory:
        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            _trim_heap()
            self._start = _rss()
            if not _reset_hwm():
                self._sampler = _RssSampler()
        return self

    def __exit__(self, *exc) -> bool:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = Peak("cuda_max_allocated", torch.cuda.max_memory_allocated(self.device), self._start,
                             torch.cuda.max_memory_reserved(self.device))
        elif self._sampler is not None:
            self.peak = Peak("cpu_rss_sampled", self._sampler.stop(), self._start)
        else:
            self.peak = Peak("cpu_peak_rss", _status_kib("VmHWM") or _rss(), self._start)
        return False


# ---------------------------------------------------------------------------------------------------------------
# Architecture facts: parameter counts by kind, read from a model's configs on the meta device (no weights)


@dataclass(frozen=True)
class ArchFacts:
    """What the estimate needs to know about a model: parameter counts by storage class, and LoRA target shapes."""

    name: str
    family: str  # "sd" or "sdxl", as models.FAMILIES
    unet_linear: int  # nn.Linear weights (NF4/int8/fp8 candidates)
    unet_conv: int  # nn.Conv2d weights (fp8 candidates only)
    unet_rest: int  # biases, norms, embeddings: kept in compute dtype or fp32
    text_encoders: int
    vae: int
    vae_sample_size: int  # pixels; also the VAE's tile size when tiling is on
    attn_linears: tuple[tuple[str, int, int], ...]  # (name suffix, in, out) of attention Linears LoRA can target

    @property
    def unet(self) -> int:
        return self.unet_linear + self.unet_conv + self.unet_rest


def _suffix(name: str) -> str:
    """The name PEFT's `target_modules` matches: `to_q`, or `to_out.0` for an indexed child."""
    head, _, last = name.rpartition(".")
    return f"{head.rpartition('.')[2]}.{last}" if last.isdigit() else last


def facts_from_modules(name: str, family: str, unet, vae, text_encoders) -> ArchFacts:
    """Count parameters of built modules (meta, CPU or CUDA alike)."""
    from torch import nn

    linear = sum(m.weight.numel() for m in unet.modules() if isinstance(m, nn.Linear))
    conv = sum(m.weight.numel() for m in unet.modules() if isinstance(m, nn.Conv2d))
    attn = tuple((_suffix(n), m.in_features, m.out_features)
                 for n, m in unet.named_modules() if isinstance(m, nn.Linear) and ".attn" in n)
    return ArchFacts(
        name=name, family=family, unet_linear=linear, unet_conv=conv,
        unet_rest=sum(p.numel() for p in unet.parameters()) - linear - conv,
        text_encoders=sum(p.numel() for e in text_encoders for p in e.parameters()),
        vae=sum(p.numel() for p in vae.parameters()), vae_sample_size=int(vae.config.sample_size), attn_linears=attn,
    )


FACTS_FILE = "imagic-lite-facts.json"  # beside an arch's model_index.json: its ArchFacts, so `presets` needs no torch


def arch_facts(model: str = "arch:sd15") -> ArchFacts:
    """Facts for `model` (`arch:NAME`, a folder, or a cached hub id), built on the meta device in seconds; for the
    shipped architectures read from their facts file (tests/test_first_minutes.py keeps it equal to the build)."""
    if model.startswith("arch:"):
        cached = Path(__file__).parent / "archs" / model[5:] / FACTS_FILE
        if cached.is_file():
            data = json.loads(cached.read_text())
            return ArchFacts(**{**data, "attn_linears": tuple(tuple(a) for a in data["attn_linears"])})
    return build_arch_facts(model)


def build_arch_facts(model: str) -> ArchFacts:
    """`arch_facts` without the cache: the model's configs built on the meta device (imports diffusers)."""
    import torch

    from .models import _build_random, detect_family, resolve_model

    path = resolve_model(model)
    family = detect_family(path)
    with torch.device("meta"):
        unet, vae, encoders, _, _ = _build_random(path, family)
    return facts_from_modules(model, family.name, unet, vae, encoders)


# ---------------------------------------------------------------------------------------------------------------
# The estimate. Calibrated constants are marked CALIBRATED with their source; the rest are byte counts or ASSUMED.

# Activation bytes per latent pixel (latent = image / 8) at fp32 without checkpointing, batch 1, SD 1.5: slopes of
# peak RSS between 128 and 256 px CPU runs, so weights, optimizer state and the process cancel out
# (benchmarks/results/calibration-cpu-sd15.json, from bench-cpu-sd15-{128,256}px-*.json). CALIBRATED.
# B-full grows less than A: in full fine-tuning the weight gradients fill memory as activations are freed.
ACT_FP32 = {"A": 578_000, "B-lora": 744_000, "B-full": 425_000, "C": 452_000}
CKPT_FACTOR = 0.40  # activation growth with / without gradient checkpointing (8gb vs cpu, both fp32). CALIBRATED.
# Half-precision / fp32 activation bytes under autocast. ASSUMED: convolution and linear inputs are saved in half,
# norms and softmax statistics stay fp32. Not measurable here (this CPU has no native bf16: a bf16 convolution ran
# ~150x slower than fp32 in an ad-hoc check); gpu_check.sh measures it (12gb vs cpu preset, no checkpointing).
HALF_FACTOR = 0.65
# Per latent pixel, relative to SD 1.5, by the same slope method (cpu preset): SDXL 1.69 (A/B/C 1.65/1.83/1.60),
# SD 2.1 0.97, so the "sd" family keeps 1.0 (benchmarks/results/calibration-cpu-{sdxl,sd21}.json). CALIBRATED.
FAMILY_ACT_SCALE = {"sd": 1.0, "sdxl": 1.69}
CPU_OVERHEAD_BYTES = 728_000_000  # RSS beyond what the model parts explain: median over the same runs. CALIBRATED.
CUDA_CONTEXT_BYTES = int(0.5 * GiB)  # CUDA context and library workspaces, outside the allocator. ASSUMED.
HEADROOM = 0.9  # use at most this share of a budget: allocator cache, fragmentation, estimate error. ASSUMED.
BNB_MIN_8BIT = 4096  # bitsandbytes keeps 32-bit Adam state for tensors smaller than this (its min_8bit_size)


CALIBRATED_FROM = "SD 1.5 on this project's CPU at 128 and 256 px (benchmarks/results/calibration-cpu-sd15.json)"
CONSTANT_SOURCES = {"ACT_FP32": CALIBRATED_FROM, "CKPT_FACTOR": CALIBRATED_FROM, "CPU_OVERHEAD_BYTES": CALIBRATED_FROM,
                    "FAMILY_ACT_SCALE": "SDXL and SD 2.1 vs SD 1.5 on the same CPU at 128 and 256 px "
                                        "(benchmarks/results/calibration-cpu-{sdxl,sd21}.json)",
                    "HALF_FACTOR": "assumed", "CUDA_CONTEXT_BYTES": "assumed", "HEADROOM": "assumed"}


def estimate_constants() -> dict[str, object]:
    """The estimate's constants and where each comes from, stored beside the estimates they produced."""
    return {"ACT_FP32": dict(ACT_FP32), "HALF_FACTOR": HALF_FACTOR, "CKPT_FACTOR": CKPT_FACTOR,
            "FAMILY_ACT_SCALE": dict(FAMILY_ACT_SCALE), "CPU_OVERHEAD_BYTES": CPU_OVERHEAD_BYTES,
            "CUDA_CONTEXT_BYTES": CUDA_CONTEXT_BYTES, "HEADROOM": HEADROOM, "sources": dict(CONSTANT_SOURCES)}


def compute_bytes(preset: Preset) -> int:
    """Bytes per element of frozen weights and activations: fp32 for `fp32` and for full fine-tuning, else 2."""
    return 4 if preset.memory.weights == "fp32" or preset.tune.mode == "full" else 2


def unet_weight_bytes(facts: ArchFacts, storage: str, elem: int) -> int:
    """Frozen UNet bytes: fp8 stores Linear and Conv weights in 1 byte, NF4 (~0.52 B with absmax) and int8 only
    Linear weights; everything else stays in the compute dtype."""
    if storage == "fp8":
        return facts.unet_linear + facts.unet_conv + facts.unet_rest * elem
    if storage == "nf4":
        return int(facts.unet_linear * (0.5 + 1 / 64)) + (facts.unet_conv + facts.unet_rest) * elem
    if storage == "int8":
        return facts.unet_linear + (facts.unet_conv + facts.unet_rest) * elem
    return facts.unet * elem


def trainable_sizes(facts: ArchFacts, preset: Preset) -> list[int]:
    """Element counts of stage B's trainable tensors: every LoRA A and B matrix, or the whole UNet."""
    if preset.tune.mode == "full":
        return [facts.unet]
    tune = preset.tune
    return [n for suffix, fan_in, fan_out in facts.attn_linears if suffix in tune.targets
            for n in (tune.rank * fan_in, tune.rank * fan_out)]


def training_parts(facts: ArchFacts, preset: Preset) -> dict[str, int]:
    """Stage B's extra bytes: LoRA weights (fp32), gradients (fp32) and optimizer state (AdamW 8 B/param;
    AdamW8bit 2 B/param for tensors of >= 4096 elements and 8 B below, as bitsandbytes does)."""
    sizes = trainable_sizes(facts, preset)
    if preset.tune.optimizer == "adamw8bit":
        state = sum(2 * n if n >= BNB_MIN_8BIT else 8 * n for n in sizes)
    else:
        state = 8 * sum(sizes)
    lora = 0 if preset.tune.mode == "full" else 4 * sum(sizes)  # full mode trains the UNet weights themselves
    return {"trainable": lora, "grads": 4 * sum(sizes), "optimizer": state}


def activation_bytes(facts: ArchFacts, preset: Preset, stage: str, latent_px: int) -> int:
    """Activation bytes: a calibrated per-latent-pixel coefficient, scaled by dtype, checkpointing and family."""
    key = stage if stage != "B" else ("B-full" if preset.tune.mode == "full" else "B-lora")
    per_px = ACT_FP32[key] * (HALF_FACTOR if compute_bytes(preset) == 2 else 1.0)
    per_px *= FAMILY_ACT_SCALE.get(facts.family, 1.0)
    if stage != "C" and preset.memory.checkpointing:
        per_px *= CKPT_FACTOR
    if stage == "C":  # a batch decodes together unless sliced; tiling bounds the decoded area by the tile size
        per_px *= 1 if preset.memory.vae_slicing else preset.sample.batch
        if preset.memory.vae_tiling:
            latent_px = min(latent_px, (facts.vae_sample_size // 8) ** 2)
    return int(per_px * latent_px)


def estimate(preset: Preset, facts: ArchFacts, height: int, width: int, device: str = "cuda") -> dict[str, dict]:
    """Estimated peak bytes per stage, split into parts that add up to `total`. On `cuda` the total is what the
    card must hold (allocator peak + context); on `cpu` it is peak RSS, with the encoders resident. Pass the preset
    as the model will run it: `preset.for_family(facts.family)`."""
    elem = compute_bytes(preset)
    latent_px = (height // 8) * (width // 8)
    unet = unet_weight_bytes(facts, "none" if preset.tune.mode == "full" else preset.memory.storage, elem)
    resident = device == "cpu" or not preset.memory.offload_encoders
    base = {"unet": unet, "encoders": (facts.text_encoders + facts.vae) * elem if resident else 0,
            "overhead": CPU_OVERHEAD_BYTES if device == "cpu" else CUDA_CONTEXT_BYTES}
    out: dict[str, dict] = {}
    for stage in STAGES:
        parts = {**base, "activations": activation_bytes(facts, preset, stage, latent_px)}
        if stage == "B":
            parts.update(training_parts(facts, preset))
        if stage == "C" and not resident:
            parts["encoders"] = facts.vae * elem  # the VAE comes back to decode
            if preset.memory.sample_offload:  # and the UNet leaves meanwhile: the larger of the two phases
                parts["unet"] = max(0, unet - parts["activations"] - parts["encoders"])
        parts["total"] = sum(parts.values())
        out[stage] = parts
    return out


def peak_estimate(preset: Preset, facts: ArchFacts, height: int, width: int, device: str = "cuda") -> int:
    return max(part["total"] for part in estimate(preset, facts, height, width, device).values())


# ---------------------------------------------------------------------------------------------------------------
# Choosing a preset for a budget


def auto_vram() -> float | None:
    """Free CUDA memory in GiB, or None without CUDA (the CLI then uses the `cpu` preset)."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info()
    return free / GiB


def choose_preset_for_budget(gb: float, facts: ArchFacts | None = None, resolution: int | None = None) -> Preset:
    """For `--vram auto`: the fastest card preset (largest `vram_gb`: a larger card's preset trades memory for speed)
    whose estimated peak fits in `gb` GiB of free memory with HEADROOM to spare."""
    facts = facts or arch_facts("arch:sd15")
    size = resolution or facts.vae_sample_size
    cards = sorted((p.for_family(facts.family) for p in all_presets() if p.vram_gb is not None),
                   key=lambda p: p.vram_gb)
    fitting = [p for p in cards if peak_estimate(p, facts, size, size) <= gb * GiB * HEADROOM]
    if not fitting:
        need = peak_estimate(cards[0], facts, size, size) / GiB / HEADROOM
        raise ConfigError(f"{gb:.1f} GB is below the estimated need of the smallest preset "
                          f"({cards[0].name}: {need:.1f} GB at {size} px); use --preset cpu or a smaller --resolution")
    return fitting[-1]


# ---------------------------------------------------------------------------------------------------------------
# Reading measurements back


def measured_peaks(results_dir: str | Path, model: str = "arch:sd15", device_type: str = "cuda") -> dict[str, dict]:
    """Measured peak bytes per preset and stage from bench JSON files (the newest uncapped run wins); {} if none.
    Only `device_type` runs count: CPU peak RSS is not VRAM."""
    peaks: dict[str, dict] = {}
    for path in sorted(Path(results_dir).glob("bench-*.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if result.get("model") != model or result.get("cap_gb") or result.get("env", {}).get("device") != device_type:
            continue
        for name, entry in result.get("presets", {}).items():
            stages = {s: r["peak_bytes"] for s, r in entry.get("stages", {}).items() if r.get("fit")}
            if stages:
                peaks[name] = stages
    return peaks
