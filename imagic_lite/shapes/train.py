"""Trains the shapes text-to-image model from scratch on CPU and writes it as a diffusers StableDiffusion folder.

Stages, each resumable from files under --work: tokenizer, VAE, latent cache, then UNet + text encoder with EMA.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from imagic_lite.files import atomic_path, write_text_atomic

from . import TOKENIZER_DIR, world
from .checker import read

SPECIAL_TOKENS = {"bos": "<|startoftext|>", "eos": "<|endoftext|>", "unk": "<|unk|>"}
MODEL_MAX_LENGTH = 32  # the longest grammar caption (two shapes, every attribute) is 23 words + 2 specials


@dataclass
class Config:
    """Everything that decides the model; saved next to the checkpoints so a resume cannot silently differ."""

    seed: int = 0
    image_size: int = 64
    vae_channels: tuple[int, ...] = (16, 32, 64)
    vae_steps: int = 1200
    vae_batch: int = 16
    vae_lr: float = 1.5e-3
    vae_kl_weight: float = 1e-6
    decoder_steps: int = 600
    decoder_lr: float = 5e-4
    # Weight of an L1 term in the decoder polish. MSE alone leaves faint ghost rings beside every shape (a few grey
    # levels, so a tiny share of the MSE); L1 punishes small errors relatively more.
    decoder_l1: float = 0.0
    # Four levels (16x16 latents down to 2x2, where every cell touches a different border, so zero padding tells
    # it where it is): 6.91 M parameters. The three-level 4.22 M UNet shipped before scored lower on colour/shape.
    unet_channels: tuple[int, ...] = (32, 64, 128, 128)
    unet_attention: tuple[bool, ...] = (False, True, True, True)
    text_width: int = 128
    text_layers: int = 3
    steps: int = 2500
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 100
    ema_decay: float = 0.999
    p_uncond: float = 0.1
    p_second: float = 0.0
    # Chance that a cached scene has a non-gray (black or white) background. The world's default, 0.3, left colour
    # on black and white at 0.72-0.73 while gray was 1.00 (shapes-training/run16-eval.json); 0.6 alone did not
    # lift it (run18), object_loss_weight did.
    p_background: float = 0.3
    dataset_size: int = 12000
    # Scale latents by 1/latent_std instead of the cache's measured std (0 = measure). A fine-tune on a new cache
    # (say more two-shape scenes) then keeps the VAE scaling factor its starting checkpoint learned with.
    latent_std: float = 0.0
    checkpoint_every: int = 250
    probe_every: int = 500
    # Stable Diffusion's schedule, the defaults here (the shipped model's first stage, run6). It leaves 0.068 of x0 in
    # x_T, and the UNet learns to read the layout off that faint copy instead of the caption, so at sampling time
    # it reads a random layout off random noise: position at chance (0.15). The shipped model fixes this with zero
    # terminal SNR + v-prediction + trailing spacing and `terminal_fraction` (position 0.97 on 300 samples): see
    # benchmarks/results/shapes-training/README.md for the fine-tune chain and its configs.
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    timestep_spacing: str = "leading"
    train_timesteps: int = 1000
    prediction_type: str = "epsilon"
    rescale_betas_zero_snr: bool = False
    # Layout is decided in the first sampling steps, where the loss is a small share of uniform-t training: this
    # fraction of each batch draws t from [high_t_min, T) instead.
    high_t_fraction: float = 0.0
    high_t_min: int = 750
    # Score that high-t part of the batch by its x0 error (the epsilon error divided by the SNR) instead of its
    # epsilon error. Near t = T an epsilon model that ignores the caption's layout loses only ~SNR (0.005) of a
    # unit of loss. Tried, and not enough on its own: toy R^2 -10 after 400 steps, fine-tune R^2 0.08
    # (shapes-layout-toy-x0-from-epsilon.json, shapes-layout-run9-*.json); see terminal_fraction.
    high_t_x0_loss: bool = False
    # This fraction of each batch (after the high-t part) is trained at the last timestep. With zero terminal SNR
    # that is pure noise in and -x0 out (v-prediction): the one place where only the caption can say where the
    # shape goes. At any t with signal left, even SD's last one (SNR 0.005, but summed over a whole shape), the
    # UNet learns to read the layout off the noise instead (benchmarks/shapes/shapes_layout_toy.py: --input schedule vs
    # --input noise), and at sampling time it then reads a random layout off random noise.
    terminal_fraction: float = 0.0
    # Weight of the latent cells an object covers in the loss (1 = plain MSE), for colour on black and white
    # backgrounds: this VAE packs colours there about 2.5-3x closer together in latent space than on gray
    # (benchmarks/shapes/shapes_vae_colour_separation.py), so a colour mistake there costs the plain loss very little.
    object_loss_weight: float = 1.0


# ---------------------------------------------------------------------------------------------------------- tokenizer

def bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encode one word's symbols the way CLIP's BPE does: repeatedly merge the best-ranked pair."""
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, math.inf), pair) for pair in zip(symbols, symbols[1:], strict=False)]
        rank, best = min(pairs)
        if rank == math.inf:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def tokenizer_tables(words: tuple[str, ...] = world.VOCABULARY) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges under which every world word is exactly one token.

    Merges are appended (lowest priority) only while a word still splits, so earlier words keep their single token.
    Every intermediate symbol is in the vocabulary, as the `tokenizers` BPE requires.
    """
    ranks: dict[tuple[str, str], int] = {}
    symbols_seen: list[str] = []
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        symbols_seen += symbols
        while len(pieces := bpe(symbols, ranks)) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
            symbols_seen.append(pieces[0] + pieces[1])
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS.values())}
    for token in symbols_seen:
        vocab.setdefault(token, len(vocab))
    return vocab, sorted(ranks, key=ranks.get)


def write_tokenizer(directory: Path) -> None:
    """Write vocab.json, merges.txt and the configs a `CLIPTokenizer.from_pretrained(directory)` needs."""
    vocab, merges = tokenizer_tables()
    directory.mkdir(parents=True, exist_ok=True)
    write_text_atomic(directory / "vocab.json", json.dumps(vocab, indent=1) + "\n")
    write_text_atomic(directory / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    specials = {"bos_token": SPECIAL_TOKENS["bos"], "eos_token": SPECIAL_TOKENS["eos"],
                "unk_token": SPECIAL_TOKENS["unk"], "pad_token": SPECIAL_TOKENS["eos"]}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MODEL_MAX_LENGTH, "do_lower_case": True,
              "clean_up_tokenization_spaces": False, **specials}
    write_text_atomic(directory / "tokenizer_config.json", json.dumps(config, indent=1) + "\n")
    write_text_atomic(directory / "special_tokens_map.json", json.dumps(specials, indent=1) + "\n")


def load_tokenizer(directory: Path = TOKENIZER_DIR):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(directory))


# ------------------------------------------------------------------------------------------------------------ models

def make_vae(cfg: Config):
    from diffusers import AutoencoderKL

    levels = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=cfg.vae_channels, sample_size=cfg.image_size, mid_block_add_attention=False,
    )


def make_unet(cfg: Config):
    from diffusers import UNet2DConditionModel

    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.unet_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.unet_attention))
    latent_side = cfg.image_size // 2 ** (len(cfg.vae_channels) - 1)
    return UNet2DConditionModel(
        sample_size=latent_side, in_channels=4, out_channels=4, block_out_channels=cfg.unet_channels,
        down_block_types=down, up_block_types=up, layers_per_block=1, cross_attention_dim=cfg.text_width,
        attention_head_dim=8, norm_num_groups=16,
    )


def make_text_encoder(cfg: Config, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_width, intermediate_size=cfg.text_width * 4,
        num_hidden_layers=cfg.text_layers, num_attention_heads=4, max_position_embeddings=MODEL_MAX_LENGTH,
        projection_dim=cfg.text_width, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def make_scheduler(cfg: Config):
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=cfg.train_timesteps, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
        timestep_spacing=cfg.timestep_spacing, prediction_type=cfg.prediction_type,
        rescale_betas_zero_snr=cfg.rescale_betas_zero_snr,
    )


def to_tensor(images) -> torch.Tensor:
    """PIL images to an NCHW tensor in [-1, 1], the range the VAE is trained on."""
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------------------------------------ stages

class Logger:
    """Appends progress lines to work/train.log and echoes them."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, message: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {message}"
        print(line, flush=True)
        with open(self.path, "a") as fh:
            fh.write(line + "\n")


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    return peak * min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(step / total, 1.0))))


def save_checkpoint(path: Path, state: dict) -> None:
    """Write next to the old checkpoint and rename over it, so a kill never loses the last good one."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def train_vae(cfg: Config, work: Path, log: Logger):
    """Reconstruction (MSE) plus a tiny KL, on freshly rendered random scenes; returns the trained VAE."""
    from diffusers import AutoencoderKL

    final = work / "vae"
    if (final / "config.json").exists():
        log(f"vae: using {final}")
        return AutoencoderKL.from_pretrained(str(final))
    vae = make_vae(cfg)
    with torch.no_grad():
        # Start the posterior nearly deterministic (std ~0.02): with the default std of 1 the decoder sees only
        # noise for hundreds of steps and learns nothing but the mean image.
        vae.quant_conv.bias[vae.config.latent_channels:].fill_(-8.0)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    rng, step = random.Random(cfg.seed + 1), 0
    ckpt = work / "vae-ckpt.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rng.setstate(state["rng"])
        step = state["step"]
        log(f"vae: resumed at step {step}")
    vae.train()
    started, running = time.time(), 0.0
    while step < cfg.vae_steps:
        lr = learning_rate(step, cfg.vae_steps, cfg.vae_lr, cfg.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        scenes = [world.random_scene(rng, p_second=0.3) for _ in range(cfg.vae_batch)]
        x = to_tensor([world.render(scene, cfg.image_size) for scene in scenes])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(recon, x)
        loss = mse + cfg.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        step += 1
        running = mse.item() if step == 1 else 0.98 * running + 0.02 * mse.item()
        if step % 50 == 0 or step == cfg.vae_steps:
            log(f"vae step {step}/{cfg.vae_steps} mse {running:.5f} lr {lr:.2e} "
                f"{(time.time() - started) / 50:.2f}s/step")
            started = time.time()
        if step % cfg.checkpoint_every == 0 or step == cfg.vae_steps:
            save_checkpoint(ckpt, {"model": vae.state_dict(), "optimizer": optimizer.state_dict(),
                                   "rng": rng.getstate(), "step": step})
    vae.eval()
    vae.save_pretrained(str(final))
    return vae


def polish_decoder(cfg: Config, vae, work: Path, log: Logger):
    """Fine-tune only the decoder on posterior means, the latents the UNet learns to produce.

    The encoder is frozen, so the latent cache and any UNet trained on it stay valid: this stage may run (or rerun)
    alongside UNet training and only sharpens what the pipeline decodes.
    """
    from diffusers import AutoencoderKL

    final = work / "vae-polished"
    if (final / "config.json").exists():
        log(f"decoder: using {final}")
        return AutoencoderKL.from_pretrained(str(final))
    if cfg.decoder_steps <= 0:
        return vae
    vae.requires_grad_(False)
    decoder_params = list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())
    for param in decoder_params:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(decoder_params, lr=cfg.decoder_lr, weight_decay=0.0)
    rng, started, running = random.Random(cfg.seed + 5), time.time(), 0.0
    vae.train()
    for step in range(1, cfg.decoder_steps + 1):
        lr = learning_rate(step - 1, cfg.decoder_steps, cfg.decoder_lr, cfg.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = to_tensor([world.render(world.random_scene(rng, p_second=0.3), cfg.image_size)
                       for _ in range(cfg.vae_batch)])
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.mean
        recon = vae.decode(latents).sample
        mse = F.mse_loss(recon, x)
        loss = mse + cfg.decoder_l1 * F.l1_loss(recon, x) if cfg.decoder_l1 else mse
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder_params, 1.0)
        optimizer.step()
        running = mse.item() if step == 1 else 0.98 * running + 0.02 * mse.item()
        if step % 50 == 0 or step == cfg.decoder_steps:
            log(f"decoder step {step}/{cfg.decoder_steps} mse {running:.5f} lr {lr:.2e} "
                f"{(time.time() - started) / 50:.2f}s/step")
            started = time.time()
    vae.eval().requires_grad_(False)
    vae.save_pretrained(str(final))
    return vae


def build_latent_cache(cfg: Config, vae, work: Path, log: Logger) -> tuple[torch.Tensor, list[world.Scene], float]:
    """Render and encode a fixed set of scenes once (posterior means); returns latents, scenes and 1/latent std."""
    path = work / "latents.pt"
    if path.exists():
        state = torch.load(path, weights_only=False)
    else:
        rng = random.Random(cfg.seed + 2)
        scenes = [world.random_scene(rng, p_second=cfg.p_second, p_background=cfg.p_background)
                  for _ in range(cfg.dataset_size)]
        chunks = []
        with torch.no_grad():
            for start in range(0, len(scenes), 256):
                x = to_tensor([world.render(scene, cfg.image_size) for scene in scenes[start:start + 256]])
                chunks.append(vae.encode(x).latent_dist.mean)
        latents = torch.cat(chunks)
        state = {"latents": latents, "scenes": [asdict(s) for s in scenes], "std": latents.std().item(),
                 "mean": latents.mean().item()}
        save_checkpoint(path, state)
    scenes = [world.Scene(**{**s, "second": world.Thing(**s["second"]) if s["second"] else None})
              for s in state["scenes"]]
    log(f"latents: {tuple(state['latents'].shape)} mean {state['mean']:.3f} std {state['std']:.3f}"
        + (f", scaled by 1/{cfg.latent_std} (config latent_std)" if cfg.latent_std else ""))
    return state["latents"], scenes, 1.0 / (cfg.latent_std or state["std"])


def training_caption(scene: world.Scene, rng: random.Random) -> str:
    """A caption with some attributes left out, so the model also learns what unnamed attributes look like."""
    p_background = 0.2 if scene.background == world.DEFAULT_BACKGROUND else 0.9
    return world.caption(scene, rng, p_size=0.8, p_position=0.85, p_background=p_background, p_there_is=0.2)


def denoising_loss(cfg: Config, pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, a: torch.Tensor,
                   n_high: int = 0, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error against the schedule's target; the first `n_high` samples scored in x0 if asked.

    `weight` (N, 1, H, W), if given, weights each latent cell: a weighted mean per sample, so its scale is kept.

    `a` is alpha-bar per sample. x0_hat - x0 is -sqrt((1-a)/a) times the epsilon error and -sqrt(1-a) times the
    v error, so the x0 error is the target's error times (1-a)/a or (1-a).
    """
    a4 = a.view(-1, 1, 1, 1)
    target = noise if cfg.prediction_type == "epsilon" else a4.sqrt() * noise - (1 - a4).sqrt() * x0
    squared = (pred - target).pow(2)
    if weight is None:
        errors = squared.mean(dim=(1, 2, 3))
    else:
        errors = (squared * weight).mean(dim=(1, 2, 3)) / weight.mean(dim=(1, 2, 3))
    if cfg.high_t_x0_loss and n_high:
        high = a[:n_high]
        to_x0 = (1 - high) / high if cfg.prediction_type == "epsilon" else 1 - high
        errors = torch.cat([errors[:n_high] * to_x0, errors[n_high:]])
    return errors.mean()


def object_masks(scenes: list[world.Scene], image_size: int, latent_size: int) -> torch.Tensor:
    """(N, 1, latent_size, latent_size) share of each latent cell that an object covers (shapes never take a
    background's colour, so every pixel off the background colour is an object's)."""
    masks = []
    for scene in scenes:
        pixels = np.asarray(world.render(scene, image_size), dtype=np.int16)
        masks.append(np.abs(pixels - np.array(world.BACKGROUNDS[scene.background])).max(axis=2) > 24)
    covered = torch.from_numpy(np.stack(masks).astype(np.float32))[:, None]
    return torch.nn.functional.adaptive_avg_pool2d(covered, latent_size)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for ema_p, p in zip(ema.parameters(), model.parameters(), strict=True):
        ema_p.lerp_(p, 1.0 - decay)


def make_pipeline(vae, unet, text_encoder, tokenizer, scheduler):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def probe_accuracy(pipe, seed: int, steps: int = 25, guidance: float = 6.0) -> dict[str, float]:
    """Sample one big shape per grid position and score it with the checker: a cheap progress signal."""
    rng = random.Random(seed)
    scenes = [world.Scene(rng.choice(world.SHAPES), rng.choice(tuple(world.COLOURS)), rng.choice(world.SIZES), p)
              for p in world.POSITIONS]
    prompts = [world.full_caption(scene) for scene in scenes]
    generator = torch.Generator().manual_seed(seed)
    images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                  output_type="pil").images
    hits = {"colour": 0, "shape": 0, "size": 0, "position": 0}
    for scene, image in zip(scenes, images, strict=True):
        found = read(image).main
        for field in hits:
            hits[field] += found is not None and getattr(found, field) == getattr(scene, field)
    return {field: count / len(scenes) for field, count in hits.items()}


def initial_weights(init_from: Path) -> dict:
    """UNet and text-encoder weights to fine-tune from: a trainer checkpoint (ckpt.pt), or a pipeline folder such as
    the shipped model, for when the run's checkpoints are gone. A folder holds no EMA, so the EMA starts from the
    same weights; the UNet's float16 file is upcast to float32 for training."""
    if not init_from.is_dir():
        return torch.load(init_from, weights_only=False)
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    # use_safetensors: never fall back to unpickling a .bin that sits beside a broken .safetensors file.
    unet = UNet2DConditionModel.from_pretrained(str(init_from / "unet"), use_safetensors=True).state_dict()
    text = CLIPTextModel.from_pretrained(str(init_from / "text_encoder"), use_safetensors=True).state_dict()
    unet, text = ({k: v.float() for k, v in weights.items()} for weights in (unet, text))
    return {"unet": unet, "text": text, "ema_unet": unet, "ema_text": text, "step": f"pipeline {init_from.name}"}


def train_unet(cfg: Config, work: Path, vae, latents: torch.Tensor, scenes: list[world.Scene], scaling: float,
               log: Logger, init_from: Path | None = None):
    """Joint UNet + text-encoder training (epsilon or v target, classifier-free dropout); returns the EMA models."""
    tokenizer = load_tokenizer()
    scheduler = make_scheduler(cfg)
    torch.manual_seed(cfg.seed)
    unet, text_encoder = make_unet(cfg), make_text_encoder(cfg, tokenizer)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    generator, rng, step = torch.Generator().manual_seed(cfg.seed + 3), random.Random(cfg.seed + 4), 0
    ckpt = work / "ckpt.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        for module, key in ((unet, "unet"), (text_encoder, "text"), (ema_unet, "ema_unet"), (ema_text, "ema_text")):
            module.load_state_dict(state[key])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        rng.setstate(state["rng"])
        step = state["step"]
        log(f"unet: resumed at step {step}")
    elif init_from is not None:
        state = initial_weights(init_from)
        for module, key in ((unet, "unet"), (text_encoder, "text"), (ema_unet, "ema_unet"), (ema_text, "ema_text")):
            module.load_state_dict(state[key])
        log(f"unet: initialised from {init_from} (its step {state['step']}), fine-tuning from step 0")
    n_unet = sum(p.numel() for p in unet.parameters())
    n_text = sum(p.numel() for p in text_encoder.parameters())
    log(f"unet {n_unet / 1e6:.2f}M params, text encoder {n_text / 1e6:.2f}M params, steps {cfg.steps}")
    alphas = scheduler.alphas_cumprod
    cell_weight = None
    if cfg.object_loss_weight != 1.0:
        cell_weight = 1.0 + (cfg.object_loss_weight - 1.0) * object_masks(scenes, cfg.image_size, latents.shape[-1])
        log(f"object cells weighted {cfg.object_loss_weight}x in the loss "
            f"(mean cell weight {cell_weight.mean().item():.3f})")
    unet.train()
    text_encoder.train()
    started, running = time.time(), 0.0
    while step < cfg.steps:
        lr = learning_rate(step, cfg.steps, cfg.lr, cfg.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.randint(len(scenes), (cfg.batch,), generator=generator)
        x0 = latents[index] * scaling
        captions = [training_caption(scenes[i], rng) if rng.random() >= cfg.p_uncond else "" for i in index.tolist()]
        ids = tokenizer(captions, padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=True,
                        return_tensors="pt").input_ids
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(cfg.train_timesteps, (cfg.batch,), generator=generator)
        n_high = round(cfg.high_t_fraction * cfg.batch)
        if n_high:
            t[:n_high] = torch.randint(cfg.high_t_min, cfg.train_timesteps, (n_high,), generator=generator)
        n_terminal = round(cfg.terminal_fraction * cfg.batch)
        t[n_high:n_high + n_terminal] = cfg.train_timesteps - 1
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = unet(noisy, t, text_encoder(ids)[0]).sample
        loss = denoising_loss(cfg, pred, x0, noise, a.view(-1), n_high,
                              None if cell_weight is None else cell_weight[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text_encoder, decay)
        running = loss.item() if step == 1 else 0.98 * running + 0.02 * loss.item()
        if step % 25 == 0 or step == cfg.steps:
            seconds = (time.time() - started) / 25
            log(f"unet step {step}/{cfg.steps} loss {running:.4f} lr {lr:.2e} {seconds:.2f}s/step")
            started = time.time()
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_checkpoint(ckpt, {"unet": unet.state_dict(), "text": text_encoder.state_dict(),
                                   "ema_unet": ema_unet.state_dict(), "ema_text": ema_text.state_dict(),
                                   "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                                   "rng": rng.getstate(), "step": step})
        if step % cfg.probe_every == 0 or step == cfg.steps:
            probe_started = time.time()
            pipe = make_pipeline(vae, ema_unet, ema_text, tokenizer, scheduler)
            pipe.set_progress_bar_config(disable=True)
            accuracy = probe_accuracy(pipe, seed=step)
            log(f"probe step {step}: {json.dumps(accuracy)} ({time.time() - probe_started:.0f}s)")
            started = time.time()
    return ema_unet, ema_text, tokenizer, scheduler


def export(out: Path, vae, unet, text_encoder, tokenizer, scheduler, fp16: bool) -> None:
    """Save the pipeline to a temporary folder beside `out`, then swap it in: `out` is never half-written."""
    pipe = make_pipeline(vae, unet, text_encoder, tokenizer, scheduler)
    # diffusers upcasts float16 files to float32 on load but transformers keeps their dtype, so only the UNet
    # and VAE (most of the bytes) are stored in float16; the text encoder stays float32.
    halved = (unet, vae) if fp16 else ()
    for module in halved:
        module.to(torch.float16)
    tmp, old = out.with_name(f".{out.name}.tmp"), out.with_name(f".{out.name}.old")
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):  # tokenizers-free loaders (older transformers) read these
        shutil.copy(TOKENIZER_DIR / name, tmp / "tokenizer" / name)
    for module in halved:
        module.to(torch.float32)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="pipeline folder to write")
    parser.add_argument("--work", type=Path, default=Path("shapes-train"), help="checkpoints, caches and the log")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints in --work")
    parser.add_argument("--steps", type=int, help="total UNet steps (raise it on --resume to train longer)")
    parser.add_argument("--vae-steps", type=int)
    parser.add_argument("--lr", type=float, help="peak UNet + text encoder learning rate")
    parser.add_argument("--init-from", type=Path,
                        help="start the UNet and text encoder from this checkpoint or pipeline folder "
                        "(a fine-tuning run)")
    parser.add_argument("--decoder-steps", type=int, help="decoder-only polish steps (0 skips the stage)")
    parser.add_argument("--dataset-size", type=int)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 is far faster than 2 on a busy 2-core machine")
    parser.add_argument("--fp32", action="store_true", help="ship float32 weights instead of float16")
    parser.add_argument("--only-decoder", action="store_true",
                        help="train the VAE and polish its decoder, then stop (can run beside UNet training)")
    parser.add_argument("--cache-only", action="store_true",
                        help="stop after the VAE stages and the latent cache (render and encode the dataset)")
    parser.add_argument("--write-tokenizer", action="store_true", help="only (re)write the packaged tokenizer files")
    args = parser.parse_args(argv)
    if args.write_tokenizer:
        write_tokenizer(TOKENIZER_DIR)
        print(f"wrote {TOKENIZER_DIR}")
        return
    if args.out is None:
        parser.error("--out is required")
    torch.set_num_threads(args.threads)
    work = args.work
    config_path = work / "config.json"
    if work.exists() and any(work.iterdir()) and not args.resume:
        parser.error(f"{work} is not empty: pass --resume to continue it, or choose another --work")
    work.mkdir(parents=True, exist_ok=True)
    # Work folders written before the schedule fields existed trained epsilon on SD's schedule: keep that on resume.
    legacy = {"prediction_type": "epsilon", "rescale_betas_zero_snr": False}
    cfg = Config(**{**legacy, **json.loads(config_path.read_text())}) if config_path.exists() else Config()
    if cfg.prediction_type == "epsilon" and cfg.rescale_betas_zero_snr:
        # At zero SNR epsilon is the input itself (nothing to learn) and the x0 weighting divides by zero.
        parser.error("rescale_betas_zero_snr needs prediction_type = v_prediction")
    overrides = {"steps": args.steps, "lr": args.lr, "vae_steps": args.vae_steps, "decoder_steps": args.decoder_steps,
                 "dataset_size": args.dataset_size}
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg, key, value)
    write_text_atomic(config_path, json.dumps(asdict(cfg), indent=1) + "\n")
    log = Logger(work / "train.log")
    log(f"config {json.dumps(asdict(cfg))}")
    started = time.time()
    vae = train_vae(cfg, work, log)
    vae.eval().requires_grad_(False)
    log(f"vae ready after {time.time() - started:.0f}s")
    vae = polish_decoder(cfg, vae, work, log)
    if args.only_decoder:
        return
    latents, scenes, scaling = build_latent_cache(cfg, vae, work, log)
    if args.cache_only:
        return
    vae.register_to_config(scaling_factor=scaling)
    unet, text_encoder, tokenizer, scheduler = train_unet(cfg, work, vae, latents, scenes, scaling, log,
                                                          init_from=args.init_from)
    export(args.out, vae, unet, text_encoder, tokenizer, scheduler, fp16=not args.fp32)
    log(f"wrote {args.out} after {time.time() - started:.0f}s in this run")


if __name__ == "__main__":
    main()
