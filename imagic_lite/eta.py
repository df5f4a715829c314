"""Auto-eta: the tool picks the edit strength eta itself, with the diffusion model as its own zero-shot judge.

Pure functions over loaded Components and tensors; nothing here prints (progress goes to the callback).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch

from .config import SampleSettings
from .errors import ConfigError
from .imagic import Progress, Sample, StopFlag, _no_progress, generate, prediction_target
from .lora import has_lora
from .models import Components, Cond, unet_kwargs, vae_turn

Judge = Callable[[list[Sample]], list[dict[str, float]]]  # images -> {"alignment", "fidelity"} each


@dataclass(frozen=True)
class AutoEtaSettings:
    """How the search judges and chooses. Defaults argued in README (measurements: benchmarks/results/)."""

    judge: str = "diffusion"  # "diffusion" (the model itself, no extra weights) or "clip:PATH" (a local CLIPModel)
    timesteps: tuple[float, ...] = (0.35, 0.55, 0.75)  # judge timesteps, as fractions of the training schedule
    noises: int = 2  # noise draws per timestep (the same draws for every image and text)
    seed: int = 0  # of those draws: the choice reproduces for a bundle
    fraction: float = 0.75  # the knee (CLIP, or no eta judged past zero): the smallest eta reaching this share of
    # the best alignment gain over eta 0
    past: int = 1  # then this many tried etas further, so the edit is clearly made (dev suites: README)

    def __post_init__(self) -> None:
        if not (self.judge == "diffusion" or self.judge.startswith("clip:") and len(self.judge) > 5):
            raise ConfigError(f"--auto-eta takes nothing (the built-in judge) or clip:PATH, got {self.judge!r}")
        if not self.timesteps or not all(0 < t < 1 for t in self.timesteps):
            raise ConfigError("auto-eta timesteps must be fractions in (0, 1)")
        if not 1 <= self.noises <= 64 or not 0 < self.fraction <= 1 or not 0 <= self.past <= 8:
            raise ConfigError("auto-eta needs noises 1..64, a fraction in (0, 1] and past 0..8")


@dataclass(frozen=True)
class EtaChoice:
    """The search's result: the chosen eta, why, and every tried eta's scores (mean over seeds)."""

    eta: float
    judge: str  # what judged, in words
    reason: str
    scores: dict[float, dict[str, float]]
    unet_calls: int  # image-sized UNet evaluations the search added to stage C (eta 0's render + the judge)

    def to_dict(self) -> dict[str, Any]:
        return {"eta": self.eta, "judge": self.judge, "reason": self.reason, "unet_calls": self.unet_calls,
                "scores": {f"{eta:g}": s for eta, s in sorted(self.scores.items())}}


@contextmanager
def base_judge(c: Components) -> Iterator[str]:
    """The UNet with its LoRA switched off for the duration (Li et al. 2023 judge with the model as shipped).

    Yields what judges: "base" (LoRA off) or "tuned" (a full fine-tune has no adapter to switch off, so the
    fine-tuned UNet itself judges)."""
    if not has_lora(c.unet):
        yield "tuned"
        return
    c.unet.disable_adapters()
    try:
        yield "base"
    finally:
        c.unet.enable_adapters()


@torch.no_grad()
def denoising_errors(c: Components, latents: torch.Tensor, conds: list[Cond], timesteps: tuple[int, ...],
                     noises: int, seed: int, original: tuple[int, int] | None = None, batch: int = 2) -> torch.Tensor:
    """Li et al. 2023's classifier statistic: ||f(x_t, t, e) - target||^2 of every latent under every condition, for
    each fixed (timestep, noise) pair; shape (images, conds, pairs).

    The pairs are the same for every image and condition (one seeded CPU generator), so differences between
    conditions or images are paired comparisons and their noise mostly cancels. At most `batch` evaluations go
    through one UNet call (stage C's uncond + cond per image: the judge needs no more memory than sampling)."""
    generator = torch.Generator().manual_seed(seed)
    shape, host = latents.shape[1:], latents.device  # the host's memory; only the UNet's inputs visit the device
    noise = torch.randn((noises, *shape), generator=generator).to(host).repeat(len(timesteps), 1, 1, 1)
    t = torch.tensor(timesteps, dtype=torch.long).to(host).repeat_interleave(noises)
    pairs = len(t)
    height, width = shape[-2] * c.vae_scale, shape[-1] * c.vae_scale
    x0 = latents.float().repeat_interleave(pairs, dim=0)  # (images * pairs, ...), image-major
    noise_all, t_all = noise.repeat(len(latents), 1, 1, 1), t.repeat(len(latents))
    noisy = c.scheduler.add_noise(x0, noise_all, t_all)
    target = prediction_target(c, x0, noise_all, t_all).float()
    jobs = [(j, k) for j in range(len(conds)) for k in range(len(x0))]  # (condition, noisy latent)
    errors = torch.empty(len(conds), len(x0), device=host)
    for first in range(0, len(jobs), batch):
        chunk = jobs[first:first + batch]
        rows = torch.tensor([k for _, k in chunk])
        cond = Cond.cat([conds[j] for j, _ in chunk]).to(c.device)
        with c.autocast():
            pred = c.unet(noisy[rows].to(c.device), t_all[rows].to(c.device),
                          **unet_kwargs(c, cond, height, width, original)).sample
        error = (pred.float().to(host) - target[rows]).pow(2).mean(dim=(1, 2, 3))
        for (j, k), value in zip(chunk, error, strict=True):
            errors[j, k] = value
    return errors.view(len(conds), len(latents), pairs).transpose(0, 1)


@torch.no_grad()
def image_latents(c: Components, images: list) -> torch.Tensor:
    """PIL images -> the VAE posterior means, scaled (the latents the judge reads); images at the working size.
    The VAE takes its turn on the device as for stage C's decode (offloaded encoders, `sample_offload`), and encodes
    one image at a time: never more at once than stage C decodes."""
    from .images import to_tensor

    with vae_turn(c) as vae_dtype:
        return torch.cat([(c.vae.encode(to_tensor(im).to(c.device, vae_dtype)).latent_dist.mean
                           * c.scaling_factor).float().to(c.host) for im in images])


def diffusion_judge(c: Components, e_tgt: Cond, e_opt: Cond, settings: AutoEtaSettings,
                    original: tuple[int, int] | None = None, batch: int = 2) -> tuple[Judge, str, int]:
    """The model as its own zero-shot judge (Li et al. 2023) between the two texts Imagic already has.

    alignment = err(x, e_opt) - err(x, e_tgt) under the base model (LoRA off): positive when the target text
    explains the image better than the embedding that reconstructs the input. Returns the judge, what judges in
    words, and its UNet evaluations per image."""
    steps = c.num_train_timesteps
    timesteps = tuple(min(steps - 1, round(f * steps)) for f in settings.timesteps)

    def judge(samples: list[Sample]) -> list[dict[str, float]]:
        latents = image_latents(c, [s.image for s in samples])
        with base_judge(c):
            errors = denoising_errors(c, latents, [e_tgt, e_opt], timesteps, settings.noises, settings.seed,
                                      original, batch)
        margin = (errors[:, 1] - errors[:, 0]).mean(dim=1)
        return [{"alignment": float(m)} for m in margin]

    what = "base model (LoRA off)" if has_lora(c.unet) else "the fine-tuned UNet (full mode: no base to switch to)"
    return judge, f"diffusion: {what}, {len(timesteps)} timesteps x {settings.noises} noises", \
        2 * len(timesteps) * settings.noises


def _by_eta(samples: list[Sample], scores: list[dict[str, float]]) -> dict[float, dict[str, float]]:
    """Each eta's scores averaged over its seeds."""
    table: dict[float, dict[str, float]] = {}
    for eta in sorted({s.eta for s in samples}):
        rows = [sc for s, sc in zip(samples, scores, strict=True) if s.eta == eta]
        table[eta] = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    return table


def knee(scores: dict[float, dict[str, float]], fraction: float) -> tuple[float, float]:
    """The smallest eta > 0 whose alignment reaches `fraction` of the way from eta 0's (the reconstruction) to the
    best tried; returns it and the threshold. If no eta scores above eta 0, the smallest (least changed) one."""
    tried = sorted(e for e in scores if e != 0.0)
    zero = scores[0.0]["alignment"]
    best = max(scores[e]["alignment"] for e in tried)
    if best <= zero:
        return tried[0], zero
    threshold = zero + fraction * (best - zero)
    return next(e for e in tried if scores[e]["alignment"] >= threshold), threshold


def pick(scores: dict[float, dict[str, float]], settings: AutoEtaSettings, decides: bool) -> tuple[float, str]:
    """The rule: the first tried eta > 0 the judge counts as edited, then `settings.past` tried etas further.

    With a judge whose zero is a decision (`decides`: the diffusion judge, a classifier between the target text and
    the embedding that reconstructs the photo) "edited" is the first alignment above zero; otherwise (CLIP), or if
    no tried eta gets there, the knee. Why a step past it: where the judge first flips, edits are often half made
    (shapes half moved, hues halfway); one step further scored best on the dev suites (README). Returns the eta and
    the reason in words."""
    tried = sorted(e for e in scores if e != 0.0)
    first = next((e for e in tried if scores[e]["alignment"] > 0), None) if decides else None
    if first is not None:
        why = (f"eta {first:g} is the first the base model judges closer to the target text than to the photo "
               f"(alignment {scores[first]['alignment']:.4g} > 0)")
    else:
        first, threshold = knee(scores, settings.fraction)
        why = (("no tried eta is judged closer to the target text than to the photo; " if decides else "")
               + f"eta {first:g} is the first whose alignment ({scores[first]['alignment']:.4g}) reaches "
               f"{settings.fraction:g} of the way from eta 0 ({scores[0.0]['alignment']:.4g}) to the best tried "
               f"(threshold {threshold:.4g})")
    eta = tried[min(len(tried) - 1, tried.index(first) + settings.past)]
    if eta != first:
        why += f"; then {settings.past} tried eta(s) further, so the edit is clearly made: eta {eta:g}"
    return eta, why


def choose_eta(c: Components, e_tgt: Cond, e_opt: Cond, uncond: Cond, sample: SampleSettings, height: int,
               width: int, samples: list[Sample], judge: Judge, judge_calls: int, judge_name: str,
               settings: AutoEtaSettings, *, progress: Progress = _no_progress, stop: StopFlag | None = None,
               original: tuple[int, int] | None = None) -> EtaChoice:
    """After stage C rendered `samples` (the grid), judge them and eta 0 (the bundle's reconstruction of the
    photo: the judge's reference, rendered here and not kept) and pick (`pick`).

    Why no finer search between the tried etas: the rule's "one step further" is a margin, not a point to refine;
    the grid's spacing sets it (measurements in README)."""
    zero = generate(c, e_tgt, e_opt, uncond, replace(sample, etas=(0.0,)), height, width, progress=progress,
                    stop=stop, original=original)
    judged = [*zero, *samples]
    scores = _by_eta(judged, judge(judged))
    eta, reason = pick(scores, settings, decides=settings.judge == "diffusion")
    calls = len(sample.seeds) * 2 * sample.steps + len(judged) * judge_calls  # stage C runs uncond + cond
    return EtaChoice(eta, judge_name, reason, scores, calls)


def clip_judge(path: str, prompt: str, device: torch.device) -> tuple[Judge, str, int]:
    """CLIP score (cosine of image and prompt embeddings) from a local transformers CLIPModel folder."""
    from pathlib import Path

    from transformers import CLIPModel, CLIPProcessor

    folder = Path(path).expanduser()
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise ConfigError(f"--auto-eta clip:{path}: not a CLIP folder (a local transformers CLIPModel folder with "
                          "config.json, e.g. one saved by CLIPModel.save_pretrained)")
    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).to(device).eval()
        processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--auto-eta clip:{path}: cannot load it as a CLIPModel with safetensors weights "
                          f"({str(exc).splitlines()[0][:160]})") from None

    @torch.no_grad()
    def judge(samples: list[Sample]) -> list[dict[str, float]]:
        inputs = processor(text=[prompt], images=[s.image for s in samples], return_tensors="pt", padding=True,
                           truncation=True).to(device)
        image = _features(model.get_image_features(pixel_values=inputs["pixel_values"]))
        text = _features(model.get_text_features(input_ids=inputs["input_ids"],
                                                 attention_mask=inputs["attention_mask"]))
        return [{"alignment": float(a)} for a in (image @ text.T)[:, 0]]

    return judge, f"clip: {folder.name} (CLIP score of the prompt)", 0


def _features(out) -> torch.Tensor:
    """CLIP's projected embedding, unit length: transformers 5 returns it as `pooler_output`, 4.x as a tensor."""
    features = out if isinstance(out, torch.Tensor) else out.pooler_output
    return torch.nn.functional.normalize(features, dim=-1)


def make_judge(c: Components, e_tgt: Cond, e_opt: Cond, prompt: str, settings: AutoEtaSettings,
               original: tuple[int, int] | None = None, batch: int = 2) -> tuple[Judge, str, int]:
    """The judge `settings.judge` names: the built-in diffusion judge (at most `batch` evaluations per UNet
    call), or CLIP from a local folder."""
    if settings.judge.startswith("clip:"):
        return clip_judge(settings.judge[len("clip:"):], prompt, c.device)
    return diffusion_judge(c, e_tgt, e_opt, settings, original, batch)
