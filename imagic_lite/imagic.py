"""The algorithm: Imagic's three stages as three plain loops over loaded Components and tensors.

A `optimize_embedding`, B `finetune`, C `generate`; A and B share `denoising_loss`. Nothing here prints:
progress goes to a callback, failures are our own exceptions.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .config import EmbedSettings, SampleSettings, TuneSettings
from .errors import ConfigError, Interrupted, OutOfMemory, TrainingDiverged
from .lora import add_lora, lora_config, lora_state_dict
from .models import Components, Cond, decode, unet_kwargs

Progress = Callable[[dict[str, Any]], None]


def _no_progress(_: dict[str, Any]) -> None:
    pass


@dataclass
class StageState:
    """Everything needed to continue a stage exactly where it stopped (written on Ctrl-C / SIGTERM)."""

    stage: str  # "A" or "B"
    step: int
    params: dict[str, torch.Tensor]  # e_opt (A) or trainable weights (B)
    optimizer: dict[str, Any]
    generator: torch.Tensor  # CPU generator state
    scaler: dict[str, Any] = field(default_factory=dict)  # GradScaler state (fp16); empty when not scaling


class StopFlag:
    """Set by SIGINT/SIGTERM; stage loops check it between steps so a step is never half-applied."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self, *_: Any) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    @contextmanager
    def installed(self) -> Iterator[StopFlag]:
        """Route SIGINT and SIGTERM to this flag for the duration (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self.set) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def denoising_loss(c: Components, latent: torch.Tensor, cond: Cond, generator: torch.Generator, draws: int = 1,
                   original: tuple[int, int] | None = None):
    """The paper's eq. (2): E_{t,noise} || f(x_t, t, e) - target ||^2 on the input's cached latent.

    Every constant comes from the components: timestep count and prediction type from the scheduler
    (epsilon for SD 1.x, v for SD 2.x-768), scaling already applied to `latent`. `draws` noise samples are
    batched through one UNet call. Noise comes from a seeded CPU generator, so runs reproduce across machines."""
    noise = torch.randn((draws, *latent.shape[1:]), generator=generator).to(c.device)
    t = torch.randint(0, c.num_train_timesteps, (draws,), generator=generator).to(c.device)
    x0 = latent.to(c.device).expand(draws, -1, -1, -1)
    noisy = c.scheduler.add_noise(x0, noise, t)
    if c.prediction_type == "epsilon":
        target = noise
    elif c.prediction_type == "v_prediction":
        target = c.scheduler.get_velocity(x0, noise, t)
    elif c.prediction_type == "sample":
        target = x0
    else:
        raise ConfigError(f"unsupported prediction type {c.prediction_type!r}")
    height, width = latent.shape[-2] * c.vae_scale, latent.shape[-1] * c.vae_scale
    with c.autocast():
        pred = c.unet(noisy, t, **unet_kwargs(c, cond.repeat(draws), height, width, original)).sample
    return F.mse_loss(pred.float(), target.float())


FIXED_DRAWS = 8  # (timestep, noise) pairs of fixed_loss: 8 UNet forwards, one at a time (batch 1 fits any preset)


@torch.no_grad()
def fixed_loss(c: Components, latent: torch.Tensor, cond: Cond, original: tuple[int, int] | None = None,
               draws: int = FIXED_DRAWS, seed: int = 0) -> float:
    """The denoising loss at the same `draws` seeded (timestep, noise) pairs every time it is called. One training
    step's loss mostly reflects its random timestep (a stage's first and last steps can show a falling loss
    rising); this one compares a stage's before and after."""
    generator = torch.Generator().manual_seed(seed)
    return sum(denoising_loss(c, latent, cond, generator, 1, original).item() for _ in range(draws)) / draws


def _check_finite(loss: torch.Tensor, stage: str, step: int, c: Components) -> None:
    if not torch.isfinite(loss):
        hint = "use --preset cpu or a preset with weights = 'bf16'/'fp32'" if c.dtype == torch.float16 else \
            "lower the learning rate"
        raise TrainingDiverged(f"stage {stage}: the loss became {loss.item()} at step {step}; nothing was saved "
                               f"from this stage ({hint})")


@contextmanager
def _oom_guard(stage: str, c: Components) -> Iterator[None]:
    """Turn a recoverable CUDA OOM into our error; tensors are released once the traceback is dropped."""
    failed = False
    try:
        yield
    except torch.OutOfMemoryError:
        failed = True
    if failed:  # outside the except block, so the traceback no longer pins the stage's tensors
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise OutOfMemory(f"stage {stage} ran out of GPU memory with memory settings {c.memory}; "
                          "try a smaller --vram (e.g. --vram 4) or --preset 4gb")


def _scaler(c: Components) -> torch.amp.GradScaler:
    # fp16 gradients underflow without loss scaling; bf16 and fp32 do not need it. On every device (CPU too), so
    # the scaled path, its skipped steps and its resume are the same code wherever they run.
    return torch.amp.GradScaler(c.device.type, enabled=c.dtype == torch.float16)


def _make_optimizer(params: list[torch.nn.Parameter], lr: float, kind: str, weight_decay: float):
    if kind == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _train_loop(stage: str, c: Components, params: dict[str, torch.nn.Parameter], optimizer, loss_fn,
                steps: int, generator: torch.Generator, progress: Progress, stop: StopFlag | None,
                resume: StageState | None) -> list[float]:
    """The loop both A and B run: loss, finite check, (scaled) backward, step; stoppable between steps."""
    start = 0
    if resume is not None:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(resume.params[name])
        optimizer.load_state_dict(resume.optimizer)
        generator.set_state(resume.generator)
        start = resume.step
    scaler = _scaler(c)
    if resume is not None and resume.scaler and scaler.is_enabled():
        scaler.load_state_dict(resume.scaler)  # the loss scale and its growth counter: without them no exact resume
    losses: list[float] = []
    with _oom_guard(stage, c):
        for step in range(start, steps):
            if stop is not None and stop.is_set():
                state = {k: v.detach().cpu().clone() for k, v in params.items()}
                raise Interrupted.with_state(StageState(stage, step, state, optimizer.state_dict(),
                                                        generator.get_state(), scaler.state_dict()))
            loss = loss_fn()
            _check_finite(loss, stage, step, c)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            progress({"stage": stage, "step": step + 1, "total": steps, "loss": losses[-1]})
    return losses


def optimize_embedding(c: Components, latent: torch.Tensor, e_tgt: Cond, settings: EmbedSettings, *,
                       seed: int = 0, progress: Progress = _no_progress, stop: StopFlag | None = None,
                       resume: StageState | None = None,
                       original: tuple[int, int] | None = None) -> tuple[Cond, list[float]]:
    """Stage A: e_opt = argmin_e L(x, e) starting from e_tgt, with the UNet frozen (paper eq. 2)."""
    c.unet.requires_grad_(False)  # a public port forgot this and carried 3.4 GB of useless weight gradients
    c.unet.train()  # diffusers only checkpoints in train mode; the UNet has no dropout to worry about
    params = {"embeds": torch.nn.Parameter(e_tgt.embeds.clone().float().to(c.device))}
    if e_tgt.pooled is not None:
        params["pooled"] = torch.nn.Parameter(e_tgt.pooled.clone().float().to(c.device))
    optimizer = torch.optim.Adam(list(params.values()), lr=settings.lr)
    generator = torch.Generator().manual_seed(seed)

    def loss_fn() -> torch.Tensor:
        return denoising_loss(c, latent, Cond(params["embeds"], params.get("pooled")), generator,
                              settings.noise_draws, original)

    losses = _train_loop("A", c, params, optimizer, loss_fn, settings.steps, generator, progress, stop, resume)
    c.unet.eval()
    pooled = None if "pooled" not in params else params["pooled"].detach().to(c.host)
    e_opt = Cond(params["embeds"].detach().to(c.host), pooled)
    return e_opt, losses


def finetune(c: Components, latent: torch.Tensor, e_opt: Cond, settings: TuneSettings, *, seed: int = 0,
             progress: Progress = _no_progress, stop: StopFlag | None = None, resume: StageState | None = None,
             original: tuple[int, int] | None = None) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Stage B: fit the denoiser to the input with e_opt fixed; returns the trained weights (LoRA or full UNet)."""
    if settings.mode == "lora":
        add_lora(c.unet, lora_config(settings), seed=seed)
        named = {n: p for n, p in c.unet.named_parameters() if p.requires_grad}
    else:
        if c.memory.storage != "none":
            raise ConfigError("tune.mode = 'full' needs an unquantized base (memory.storage = 'none')")
        from .pristine import before_base_change

        before_base_change(c)
        c.unet.float()  # the paper's way: every weight trains, in fp32
        c.unet.requires_grad_(True)
        named = dict(c.unet.named_parameters())
    c.unet.train()
    optimizer = _make_optimizer(list(named.values()), settings.lr, settings.optimizer, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(seed + 1)
    cond = e_opt.to(c.device)

    def loss_fn() -> torch.Tensor:
        return denoising_loss(c, latent, cond, generator, settings.noise_draws, original)

    losses = _train_loop("B", c, named, optimizer, loss_fn, settings.steps, generator, progress, stop, resume)
    c.unet.eval()
    c.unet.requires_grad_(False)
    del optimizer
    weights = lora_state_dict(c.unet) if settings.mode == "lora" else \
        {k: v.detach().to(c.host).clone() for k, v in c.unet.state_dict().items()}
    return weights, losses


@dataclass(frozen=True)
class Sample:
    eta: float
    seed: int
    image: Any  # PIL.Image.Image


@torch.no_grad()
def generate(c: Components, e_tgt: Cond, e_opt: Cond, uncond: Cond, settings: SampleSettings, height: int,
             width: int, *, progress: Progress = _no_progress, stop: StopFlag | None = None,
             original: tuple[int, int] | None = None) -> list[Sample]:
    """Stage C: DDIM from e = eta*e_tgt + (1-eta)*e_opt with classifier-free guidance, for every (eta, seed).

    Each image's starting noise comes from its own seeded CPU generator, so an image does not depend on what
    else is in its batch (up to kernel numerics) and reproduces across machines."""
    from diffusers import DDIMScheduler

    from .images import from_tensor

    scheduler = DDIMScheduler.from_config(c.scheduler.config)  # fresh state for every call
    scheduler.set_timesteps(settings.steps)
    jobs = [(eta, seed) for seed in settings.seeds for eta in settings.etas]
    shape = (c.unet.config.in_channels, height // c.vae_scale, width // c.vae_scale)
    total = len(jobs) * settings.steps
    done = 0
    samples: list[Sample] = []
    with _oom_guard("C", c):
        for first in range(0, len(jobs), settings.batch):
            batch = jobs[first:first + settings.batch]
            n = len(batch)
            latents = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for _, s in batch])
            latents = (latents * scheduler.init_noise_sigma).to(c.device)
            cond = Cond.cat([e_tgt.lerp(e_opt, eta) for eta, _ in batch])
            both = Cond.cat([uncond.repeat(n), cond]).to(c.device)
            kwargs = unet_kwargs(c, both, height, width, original)
            for t in scheduler.timesteps:
                if stop is not None and stop.is_set():
                    raise Interrupted("stopped while sampling; the bundle is saved, rerun `imagic-lite edit` on it")
                model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
                with c.autocast():
                    pred = c.unet(model_in, t, **kwargs).sample.float()
                pred_uncond, pred_cond = pred.chunk(2)
                pred = pred_uncond + settings.guidance * (pred_cond - pred_uncond)
                latents = scheduler.step(pred, t, latents).prev_sample
                done += n
                progress({"stage": "C", "step": done, "total": total})
            images = from_tensor(decode(c, latents))
            samples += [Sample(eta, seed, img) for (eta, seed), img in zip(batch, images, strict=True)]
    return samples


