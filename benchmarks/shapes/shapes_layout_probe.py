"""Does a shapes model know *where* to put the shape at the first sampling step?

Sampling decides layout in its first steps, from (almost) pure noise. This probe asks the model for its x0 estimate
there, for full captions at every grid position, and compares it with the data: the caption's conditional mean
latent m_c (renders of that caption with the world's jitter) and the unconditional mean m_u (random scenes).

    layout R^2 = 1 - |x0_hat - m_c|^2 / |m_u - m_c|^2

1 means the model's first step already holds the captioned layout; 0 means it predicts the unconditional mean and
the layout is left to the noise, so position words cannot work. Writes benchmarks/results/shapes-layout-NAME.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from imagic_lite.files import write_text_atomic
from imagic_lite.images import to_tensor
from imagic_lite.shapes import world
from imagic_lite.shapes.evaluate import load_pipeline

RESULTS = Path(__file__).resolve().parents[1] / "results"


@torch.no_grad()
def latents_of(pipe, scenes: list[world.Scene]) -> torch.Tensor:
    """Scaled posterior means, the latents the UNet was trained to produce."""
    x = torch.cat([to_tensor(world.render(s)) for s in scenes])
    return pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor


@torch.no_grad()
def first_step_x0(pipe, prompt: str, draws: int, steps: int, seed: int) -> tuple[torch.Tensor, int]:
    """The model's x0 estimate at the first DDIM timestep from pure noise, averaged over `draws` noise samples."""
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps)
    t = scheduler.timesteps[0]
    a = scheduler.alphas_cumprod[t]
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    emb = pipe.text_encoder(ids)[0].repeat(draws, 1, 1)
    side = pipe.unet.config.sample_size
    noise = torch.randn((draws, 4, side, side), generator=torch.Generator().manual_seed(seed))
    x_t = noise  # the sampler's start: scaled by init_noise_sigma = 1 for DDIM
    out = pipe.unet(x_t, t, emb).sample
    if scheduler.config.prediction_type == "v_prediction":
        x0 = a.sqrt() * x_t - (1 - a).sqrt() * out
    else:
        x0 = (x_t - (1 - a).sqrt() * out) / a.sqrt()
    return x0.mean(0), int(t)


def probe(pipe, renders: int, draws: int, steps: int, seed: int) -> dict:
    rng = random.Random(seed)
    unconditional = latents_of(pipe, [world.random_scene(rng) for _ in range(256)]).mean(0)
    rows = []
    for position in world.POSITIONS:
        base = world.Scene(rng.choice(world.SHAPES), rng.choice(tuple(world.COLOURS)), "big", position)
        jittered = []
        for _ in range(renders):
            thing = world._random_thing(rng, position)
            jittered.append(replace(base, dx=thing.dx, dy=thing.dy, scale=thing.scale))
        renders_latents = latents_of(pipe, jittered)
        conditional = renders_latents.mean(0)
        prompt = world.full_caption(base)
        x0, t = first_step_x0(pipe, prompt, draws, steps, seed)
        spread = (unconditional - conditional).pow(2).mean().item()
        r2 = 1 - (x0 - conditional).pow(2).mean().item() / spread
        r2_unconditional = 1 - (x0 - unconditional).pow(2).mean().item() / spread
        rows.append({"prompt": prompt, "timestep": t, "layout_r2": round(r2, 4),
                     "r2_against_unconditional_mean": round(r2_unconditional, 4),
                     # how far the caption moves the data's mean, against how much renders of it vary
                     "caption_spread": round(spread, 4),
                     "within_caption_variance": round(renders_latents.var(0).mean().item(), 4)})
    means = {f"mean_{key}": round(statistics.fmean(r[key] for r in rows), 4)
             for key in ("layout_r2", "caption_spread", "within_caption_variance")}
    return {"per_prompt": rows, **means}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="pipeline folder (default: the shipped model)")
    parser.add_argument("--name", default="shipped", help="names the results file")
    parser.add_argument("--renders", type=int, default=16, help="jittered renders per caption for m_c")
    parser.add_argument("--draws", type=int, default=64, help="noise draws averaged for the model's estimate")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps (sets the first timestep)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", action="append", default=[])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from imagic_lite.shapes import MODEL_DIR

    model = Path(args.model) if args.model else MODEL_DIR
    pipe = load_pipeline(model)
    result = probe(pipe, args.renders, args.draws, args.steps, args.seed)
    result |= {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": str(model),
        "scheduler": {k: pipe.scheduler.config[k] for k in ("prediction_type", "timestep_spacing",
                                                             "rescale_betas_zero_snr", "beta_schedule")},
        "command": " ".join(["python", "benchmarks/shapes/shapes_layout_probe.py", *(argv or sys.argv[1:])]),
        "device": f"{platform.machine()} cpu, 1 thread", "torch": torch.__version__, "notes": args.note,
        "settings": {"renders": args.renders, "draws": args.draws, "steps": args.steps, "seed": args.seed},
    }
    out = RESULTS / f"shapes-layout-{args.name}.json"
    write_text_atomic(out, json.dumps(result, indent=1) + "\n")
    print(f"{out}: mean layout R^2 {result['mean_layout_r2']}")


if __name__ == "__main__":
    main()
