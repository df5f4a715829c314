"""The Python API, which the CLI itself uses: `Imagic.from_pretrained(model, preset)`, `.fit(image, prompt)`,
`.generate(...)`. It resolves settings, runs the stages in order and records time and peak memory per stage.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .config import (
    Preset,
    SampleSettings,
    apply_overrides,
    check_resolved,
    load_preset,
    preset_for_vram,
    read_toml,
)
from .errors import ConfigError, Interrupted
from .eta import AutoEtaSettings, choose_eta, make_judge
from .imagic import (
    Progress,
    Sample,
    StageState,
    StopFlag,
    _no_progress,
    finetune,
    fixed_loss,
    generate,
    optimize_embedding,
)
from .models import DEFAULT_MODEL, Components, Cond, encode, encode_uncond, load_components, pick_device, resolve_model

MODEL_RECOMMENDATIONS = "imagic-lite.toml"  # a model folder may ship stage settings that suit it


def versions() -> dict[str, str]:
    import diffusers
    import peft
    import transformers

    return {"imagic-lite": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def device_info(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": props.name, "total_gb": round(props.total_memory / 2**30, 2),
                "cuda": torch.version.cuda}
    import platform

    name = platform.processor() or platform.machine()
    return {"type": device.type, "name": name, "threads": torch.get_num_threads()}


def choose_preset(preset: str | None, vram: str | None, device: torch.device,
                  model: str = DEFAULT_MODEL) -> tuple[Preset, list[str]]:
    """--preset wins; else on CUDA --vram N (or auto: the free memory) against the simulated whole-run peak of each
    preset for `model` at its native size (imagic_lite.simulate, cached per architecture); without CUDA the `cpu`
    preset."""
    notes: list[str] = []
    gb = None if vram in (None, "auto") else _parse_vram(vram)
    if preset:
        return load_preset(preset), notes
    if device.type != "cuda":
        if gb is not None:
            preset_for_vram(gb)  # still refuse a budget below every preset
            notes.append("no CUDA device: using the cpu preset (--vram applies to GPUs)")
        return load_preset("cpu"), notes
    from .memory import auto_vram
    from .vram import choose_preset_for_card

    budget = auto_vram() if gb is None else gb

    def simulating(name: str) -> None:
        notes.append(f"simulated preset {name} for this model (once; cached)")

    chosen, peak = choose_preset_for_card(budget, model, on_miss=simulating)
    said = f"{budget:.1f} GB free on the GPU" if gb is None else f"{budget:g} GB"
    notes.append(f"--vram {vram}: {said}; preset {chosen.name} (simulated peak {peak / 2**30:.2f} GiB)")
    return chosen, notes


def _parse_vram(vram: str) -> float:
    try:
        gb = float(vram)
    except ValueError:
        raise ConfigError(f"--vram takes a number of GB or 'auto', got {vram!r}") from None
    if not 0 < gb < 1024:
        raise ConfigError(f"--vram must be a positive number of GB, got {vram}")
    return gb


def resolve_settings(model_dir: Path | None, preset: Preset, config_file: str | None, overrides: dict[str, Any], *,
                     family: str | None = None, tune_lr: float | None = None) -> Preset:
    """defaults < preset < the model's recommendations < --config file < flags, for the model's family.

    Each layer's [family.*] table (e.g. [sdxl.memory]) is applied right after that layer's plain tables, so it
    beats them and every earlier layer, and a later layer still beats it. `tune_lr` (--tune-lr) sets the rate of
    the mode the layers end up with; cross-section rules are checked last, before anything is loaded."""
    if family is None:
        from .models import detect_family

        family = detect_family(model_dir).name
    settings = preset.for_family(family)
    layers: list[tuple[dict[str, Any], str, str]] = []
    recommended = model_dir / MODEL_RECOMMENDATIONS if model_dir is not None else None  # None: not local yet
    if recommended is not None and recommended.is_file():
        layers.append((*read_toml(recommended), str(recommended)))
    if config_file:
        layers.append((*read_toml(Path(config_file)), config_file))
    if overrides:
        layers.append((overrides, "", "command-line flags"))
    for data, text, source in layers:
        settings = apply_overrides(settings, data, source, text).for_family(family)
    if tune_lr is not None:
        key = "full_lr" if settings.tune.mode == "full" else "lora_lr"
        settings = apply_overrides(settings, {"tune": {key: tune_lr}}, "--tune-lr")
    return check_resolved(settings)


def check_settings(model: str, preset: str | None, vram: str | None, device: str | None,
                   config_file: str | None, overrides: dict[str, Any], tune_lr: float | None = None) -> None:
    """The settings checks of `from_pretrained` that need no download: a bad --device, --vram, --preset, --config
    or flag fails (exit 2) before the output folder is looked at. A model already on disk adds its own TOML and
    family; a hub id is checked as SD 1/2 (the family tables are validated either way)."""
    pick_device(device)
    chosen, _ = choose_preset(preset, vram, torch.device("cpu"), model)  # as on a CPU: no free-memory probe
    local = model == "shapes" or model.startswith("arch:") or Path(model).expanduser().exists()
    model_dir = resolve_model(model) if local else None
    resolve_settings(model_dir, chosen, config_file, overrides, family=None if local else "sd", tune_lr=tune_lr)


@dataclass
class StageRecord:
    stage: str
    seconds: float
    steps: int
    peak: dict[str, Any]
    loss_first: float | None = None  # mean over the stage's first tenth of steps (see _ends)
    loss_last: float | None = None  # mean over its last tenth
    loss_before: float | None = None  # at fixed (timestep, noise) draws before the stage (imagic.fixed_loss)
    loss_after: float | None = None  # the same draws after it: a comparison that means something


def run_key(pixels: torch.Tensor, prompt: str, fingerprint: str, preset: Preset, seed: int,
            original: tuple[int, int] | None = None) -> str:
    """Identity of a run, so --resume refuses a checkpoint from a different one (sample settings excluded)."""
    digest = hashlib.sha256(pixels.numpy().tobytes())
    settings = {k: v for k, v in preset.to_dict().items() if k not in ("sample", "name", "description")}
    identity = [prompt, fingerprint, settings, seed] + ([list(original)] if original else [])
    digest.update(json.dumps(identity, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:24]


class Imagic:
    """One loaded model with resolved settings; `fit` runs stages A and B, `generate` runs stage C."""

    def __init__(self, components: Components, preset: Preset, notes: list[str] | None = None) -> None:
        self.components = components
        self.preset = preset
        self.notes = list(notes or []) + components.notes
        self.records: list[StageRecord] = []
        self.input_fit: dict[str, Any] | None = None  # how the last photo was cropped and sized (run.json)
        self._applied: object | None = None  # the bundle whose weights are in the UNet
        self.eta_choice = None  # set by generate(auto_eta=...)

    @classmethod
    def from_pretrained(cls, model: str = DEFAULT_MODEL, preset: str | Preset | None = None, *,
                        vram: str | None = None, device: str | None = None, config_file: str | None = None,
                        overrides: dict[str, Any] | None = None, tune_lr: float | None = None,
                        chatter: bool = False) -> Imagic:
        """Load `model` with settings resolved as in `resolve_settings`; `tune_lr` is the stage B learning rate
        of whichever tune mode the settings end up with (--tune-lr); `chatter=True` lets diffusers/transformers
        print while loading."""
        dev = pick_device(device)
        notes: list[str] = []
        if isinstance(preset, Preset):
            chosen = preset
        else:
            chosen, notes = choose_preset(preset, vram, dev, model)
        settings = resolve_settings(resolve_model(model), chosen, config_file, overrides or {}, tune_lr=tune_lr)
        start = time.perf_counter()
        components = load_components(model, settings.memory, dev, chatter=chatter)
        self = cls(components, settings, notes)
        self.records.append(StageRecord("load", time.perf_counter() - start, 0, {}))
        return self

    def _stage(self, name: str, steps: int, fn: Callable[[], Any]) -> Any:
        from .memory import PeakMemory

        start = time.perf_counter()
        with PeakMemory(self.components.device) as peak:
            result = fn()
        self.records.append(StageRecord(name, time.perf_counter() - start, steps, asdict(peak.peak)))
        return result

    def fit(self, image: str | Path | Any, prompt: str, *, seed: int = 0, progress: Progress = _no_progress,
            stop: StopFlag | None = None, checkpoint: Path | None = None, resume: bool = False,
            thumbnail: bool = True):
        """Stages A and B on one image; returns the Bundle (embeddings + tuned weights) with its weights applied.

        With `checkpoint`, a stop (Ctrl-C/SIGTERM via `stop`) saves a resumable state there before raising
        Interrupted; with `resume`, an existing checkpoint continues the run to the same result."""
        from .bundle import Bundle, apply_bundle
        from .checkpoint import load_checkpoint, save_checkpoint
        from .images import fit_crop, load_image, prepare, to_tensor
        from .pristine import reset_unet

        c, p = self.components, self.preset
        reset_unet(c)  # stage A must see the base model, not the previous photo's tuning
        self._applied = None
        if isinstance(image, str | Path):
            loaded = load_image(image)
            self.notes += list(loaded.notes)
            image = loaded.image
        size, box = fit_crop(image.width, image.height, c.native, c.multiple)
        original = (image.height, image.width)  # after EXIF orientation; SDXL's time ids are told this size
        self.input_fit = {"photo": [image.width, image.height], "mode": "centre crop, then resize",
                          "crop_box": list(box), "working_size": list(size)}
        if (box[2] - box[0], box[3] - box[1]) != image.size:
            cut = image.width - (box[2] - box[0]) or image.height - (box[3] - box[1])
            sides = "left and right" if box[0] else "top and bottom"
            self.notes.append(f"the photo is {image.width}x{image.height}; this model takes sides in multiples of "
                              f"{c.multiple} px, so {size[0]}x{size[1]} px: {cut} px were cut from the {sides} "
                              f"(centred) to keep the aspect ratio")
        fitted = prepare(image, c.native, c.multiple)
        pixels = to_tensor(fitted)
        key = run_key(pixels, prompt, c.fingerprint, p, seed, original)
        state, e_opt = (None, None)
        if resume and checkpoint is not None and checkpoint.is_file():
            state, e_opt = load_checkpoint(checkpoint, key)
            self.notes.append(f"resuming stage {state.stage} at step {state.step}")

        encoded = self._stage("encode", 0, lambda: encode(c, pixels, prompt))
        if encoded.truncated:
            self.notes.append(f"the prompt is longer than the text encoder's limit; these words were cut: "
                              f"{encoded.truncated!r}")

        def guarded(fn: Callable[[], Any], e_opt_done: Cond | None) -> Any:
            try:
                return fn()
            except Interrupted as exc:
                if checkpoint is not None and isinstance(exc.state, StageState):
                    save_checkpoint(checkpoint, exc.state, key, e_opt_done)
                    exc.args = (f"{exc.args[0]}; saved {checkpoint.name}, continue with --resume",)
                raise

        def fixed(cond: Cond) -> float:
            return fixed_loss(c, encoded.latent, cond, original)

        losses_a: list[float] = []
        if state is None or state.stage == "A":
            e_opt, losses_a = self._stage("A", p.embed.steps, lambda: guarded(lambda: optimize_embedding(
                c, encoded.latent, encoded.e_tgt, p.embed, seed=seed, progress=progress, stop=stop,
                resume=state, original=original), None))
            state = None
            self.records[-1].loss_before = fixed(encoded.e_tgt)
        self.records[-1].loss_first, self.records[-1].loss_last = _ends(losses_a)
        loss_b_before = fixed(e_opt)  # the frozen UNet with e_opt: also stage A's "after"
        if self.records[-1].stage == "A":
            self.records[-1].loss_after = loss_b_before
        weights, losses_b = self._stage("B", p.tune.steps, lambda: guarded(lambda: finetune(
            c, encoded.latent, e_opt, p.tune, seed=seed, progress=progress, stop=stop, resume=state,
            original=original), e_opt))
        record_b = self.records[-1]
        record_b.loss_first, record_b.loss_last = _ends(losses_b)
        record_b.loss_before = loss_b_before

        from .lora import lora_config

        height, width = pixels.shape[-2], pixels.shape[-1]
        meta = {
            "base_model": c.model_id, "unet_fingerprint": c.fingerprint, "family": c.family.name,
            "prediction_type": c.prediction_type, "height": str(height), "width": str(width), "prompt": prompt,
            "preset": p.name, "settings": json.dumps(asdict(p), default=str), "tune_mode": p.tune.mode,
            "versions": json.dumps(versions()), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seed": str(seed), "original_height": str(original[0]), "original_width": str(original[1]),
        }
        bundle = Bundle(e_tgt=encoded.e_tgt, e_opt=e_opt, weights=weights, mode=p.tune.mode,
                        lora=lora_config(p.tune) if p.tune.mode == "lora" else None, meta=meta,
                        thumbnail=fitted if thumbnail else None)
        bundle = _rounded(bundle)
        apply_bundle(bundle, c)  # sample from exactly what the bundle stores, so `edit` reproduces the pixels
        record_b.loss_after = fixed(e_opt)
        self._applied = bundle
        self._uncond = encoded.uncond
        return bundle

    def generate(self, bundle=None, *, sample: SampleSettings | None = None, progress: Progress = _no_progress,
                 stop: StopFlag | None = None, auto_eta: bool | str | AutoEtaSettings = False) -> list[Sample]:
        """Stage C for `bundle` (default: the one `fit` produced) with the preset's or the given sample settings.

        With `auto_eta` (True: the built-in judge; "clip:PATH"; or AutoEtaSettings) the rendered etas are judged
        and refined after stage C ("eta" stage); the chosen samples have `chosen=True` and `self.eta_choice` says
        which eta and why."""
        from .bundle import apply_bundle, bundle_original_size

        c = self.components
        bundle = bundle if bundle is not None else self._applied
        if bundle is None:
            raise ConfigError("nothing to generate from: call fit() first or pass a bundle")
        if bundle is not self._applied:
            apply_bundle(bundle, c)
            self._applied = bundle
            self._uncond = None
        if getattr(self, "_uncond", None) is None:
            self._uncond = encode_uncond(c)
        settings = sample or self.preset.sample
        height, width = int(bundle.meta["height"]), int(bundle.meta["width"])
        original = bundle_original_size(bundle.meta)
        samples = self._stage("C", settings.steps * len(settings.etas) * len(settings.seeds), lambda: generate(
            c, bundle.e_tgt, bundle.e_opt, self._uncond, settings, height, width, progress=progress, stop=stop,
            original=original))
        self.eta_choice = None
        if auto_eta is False:
            return samples
        auto = auto_eta if isinstance(auto_eta, AutoEtaSettings) else \
            AutoEtaSettings(judge="diffusion" if auto_eta is True else str(auto_eta))

        def search():
            judge, name, calls = make_judge(c, bundle.e_tgt, bundle.e_opt, bundle.meta.get("prompt", ""), auto,
                                            original, batch=2 * settings.batch)
            return choose_eta(c, bundle.e_tgt, bundle.e_opt, self._uncond, settings, height, width, samples, judge,
                              calls, name, auto, progress=progress, stop=stop, original=original)

        choice = self._stage("eta", 0, search)
        self.records[-1].steps = choice.unet_calls
        self.eta_choice = choice
        return [replace(s, chosen=s.eta == choice.eta) for s in samples]

    def report(self) -> dict[str, Any]:
        """What run.json records: settings, versions, device, and per stage seconds and peak memory."""
        c = self.components
        return {
            "model": c.model_id, "family": c.family.name, "unet_fingerprint": c.fingerprint,
            "prediction_type": c.prediction_type, "native_resolution": c.native, "preset": self.preset.to_dict(),
            "device": device_info(c.device), "compute_dtype": str(c.dtype).replace("torch.", ""),
            "versions": versions(), "notes": self.notes, "stages": [asdict(r) for r in self.records],
            "input_fit": self.input_fit,
            **({"auto_eta": self.eta_choice.to_dict()} if self.eta_choice else {}),
        }


def _ends(losses: list[float]) -> tuple[float | None, float | None]:
    """Mean loss over the first and the last tenth of a stage's steps (at least one step each): one step's loss
    depends mostly on its random timestep, so the first and last single values can show a falling loss rising."""
    if not losses:
        return None, None
    k = max(1, len(losses) // 10)
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


def _rounded(bundle):
    """The bundle as it will be stored (weights in fp16), so the run samples from the saved values."""
    weights = {k: v.to(torch.float16).to(torch.float32) for k, v in bundle.weights.items()}
    return replace(bundle, weights=weights)
