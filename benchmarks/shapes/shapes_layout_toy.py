"""Can the shapes UNet learn *where* from pure noise at all, and which loss lets it?

A toy of the first sampling step: every training sample is at t = T - 1, the condition is one learned embedding
per grid position (or real captions), the data are the trainer's latent cache; the evaluation input is pure noise,
as at sampling time. `--input schedule` trains on SD's x_T, which still holds 0.068 x0 (a faint copy of the layout
the UNet can learn to read instead of the caption); `--input noise` trains on pure noise (zero terminal SNR), where
only the condition says where the shape goes. Three ways to score the same UNet (the shipped architecture, from
scratch unless --init):

- `x0`: the output is read as x0 directly (an upper bound: the layout is all the loss asks for);
- `epsilon`: the output is epsilon, scored as the shapes trainer did (epsilon MSE);
- `x0-from-epsilon`: the output is epsilon, scored by the x0 it implies (the trainer's `high_t_x0_loss`).

Reports layout R^2 = 1 - |mean x0_hat - m_c|^2 / |m_u - m_c|^2 on held-out noise every 50 steps (see
shapes_layout_probe.py). Writes benchmarks/results/shapes-layout-toy-TARGET.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from imagic_lite.files import write_text_atomic
from imagic_lite.shapes import world
from imagic_lite.shapes.train import (
    MODEL_MAX_LENGTH,
    Config,
    load_tokenizer,
    make_scheduler,
    make_text_encoder,
    make_unet,
    training_caption,
)

RESULTS = Path(__file__).resolve().parents[1] / "results"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("latents", type=Path, help="a trainer work folder's latents.pt")
    parser.add_argument("--target", choices=("x0", "epsilon", "x0-from-epsilon"), default="x0-from-epsilon")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--condition", choices=("embedding", "captions"), default="embedding",
                        help="one learned embedding per grid position, or the trainer's captions through a CLIP "
                             "text encoder trained jointly")
    parser.add_argument("--input", choices=("schedule", "noise"), default="schedule",
                        help="x_t at SD's last timestep (alpha-bar 0.0047: a faint copy of x0 is left in it) or "
                             "pure noise (zero terminal SNR)")
    parser.add_argument("--init", type=Path, help="start UNet and text encoder from a trainer checkpoint (EMA)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    state = torch.load(args.latents, weights_only=False)
    latents = state["latents"] / state["std"]
    names = list(world.POSITIONS)
    cell = torch.tensor([names.index(s["position"]) for s in state["scenes"]])
    # The mean latent of what the evaluation condition describes: any scene in the cell for a position embedding,
    # or the renders matching the evaluation caption (a big red circle in the cell, gray background).
    probe = world.Scene("circle", "red", "big")
    matches = torch.tensor([all(s[k] == getattr(probe, k) for k in ("shape", "colour", "size", "background"))
                            for s in state["scenes"]])
    if args.condition == "embedding":
        matches = torch.ones_like(matches)
    means = torch.stack([latents[(cell == i) & matches].mean(0) for i in range(len(names))])
    spread = (means - latents.mean(0)).pow(2).mean(dim=(1, 2, 3))

    torch.manual_seed(0)
    cfg = Config()
    unet = make_unet(cfg)
    t_last = cfg.train_timesteps - 1
    a = make_scheduler(cfg).alphas_cumprod[t_last]
    tokenizer = load_tokenizer()
    text_encoder = make_text_encoder(cfg, tokenizer)
    if args.init is not None:
        checkpoint = torch.load(args.init, weights_only=False)
        unet.load_state_dict(checkpoint["ema_unet"])
        text_encoder.load_state_dict(checkpoint["ema_text"])
    embeddings = torch.nn.Parameter(torch.randn(len(names), 4, cfg.text_width) * 0.5)
    trained = [*unet.parameters(), embeddings]
    if args.condition == "captions":
        trained += list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(trained, lr=args.lr)
    generator, rng = torch.Generator().manual_seed(1), random.Random(4)
    scenes = [world.Scene(**{**s, "second": None}) for s in state["scenes"]]

    def condition(which: list[int], eval_cells: bool = False) -> torch.Tensor:
        """Encoder states for scenes (training) or for grid cells (evaluation: a full caption per cell)."""
        if args.condition == "embedding":
            return embeddings[torch.tensor(which) if eval_cells else cell[torch.tensor(which)]]
        if eval_cells:
            texts = [world.full_caption(replace(probe, position=names[i])) for i in which]
        else:
            texts = [training_caption(scenes[i], rng) for i in which]
        ids = tokenizer(texts, padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=True,
                        return_tensors="pt").input_ids
        return text_encoder(ids)[0]

    def x0_of(out: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        return out if args.target == "x0" else (x_t - (1 - a).sqrt() * out) / a.sqrt()

    @torch.no_grad()
    def layout_r2() -> float:
        draws = 8
        which = torch.arange(len(names)).repeat_interleave(draws)
        x_t = torch.randn(len(which), 4, 16, 16, generator=torch.Generator().manual_seed(99))
        x0_hat = x0_of(unet(x_t, torch.full((len(which),), t_last), condition(which.tolist(), True)).sample, x_t)
        r2 = [1 - (x0_hat[which == i].mean(0) - means[i]).pow(2).mean() / spread[i] for i in range(len(names))]
        return round(statistics.fmean(float(v) for v in r2), 4)

    history, started = [], time.time()
    for step in range(1, args.steps + 1):
        index = torch.randint(len(latents), (args.batch,), generator=generator)
        x0, noise = latents[index], torch.randn((args.batch, 4, 16, 16), generator=generator)
        x_t = noise if args.input == "noise" else a.sqrt() * x0 + (1 - a).sqrt() * noise
        out = unet(x_t, torch.full((args.batch,), t_last), condition(index.tolist())).sample
        loss = ((out - noise).pow(2) if args.target == "epsilon" else (x0_of(out, x_t) - x0).pow(2)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        if step % 50 == 0:
            history.append({"step": step, "loss": round(loss.item(), 4), "layout_r2": layout_r2(),
                            "seconds": round(time.time() - started, 1)})
            print(json.dumps(history[-1]), flush=True)
    result = {
        "target": args.target, "history": history, "final_layout_r2": history[-1]["layout_r2"] if history else None,
        "settings": {"steps": args.steps, "lr": args.lr, "batch": args.batch, "timestep": t_last,
                     "condition": args.condition, "input": args.input, "init": str(args.init) if args.init else None,
                     "alpha_bar": round(float(a), 6), "unet_channels": cfg.unet_channels},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/shapes/shapes_layout_toy.py", *(argv or sys.argv[1:])]),
        "device": f"{platform.machine()} cpu, 1 thread", "torch": torch.__version__,
    }
    tail = "" if args.input == "schedule" else "-pure-noise"
    tail += "" if args.condition == "embedding" else "-captions"
    tail += "" if args.init is None else f"-from-{args.init.parent.name}"
    out = RESULTS / f"shapes-layout-toy-{args.target}{tail}.json"
    write_text_atomic(out, json.dumps(result, indent=1) + "\n")
    print(f"{out}: final layout R^2 {result['final_layout_r2']}")


if __name__ == "__main__":
    main()
