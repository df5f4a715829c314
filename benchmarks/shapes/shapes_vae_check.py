"""How faithfully do shapes-model VAEs reconstruct renders? Compares decoders on the same encoder latents.

Every decoder given is run on the posterior means of the *first* VAE's encoder (the latents the UNet learns), on
held-out random scenes (a third with a second object). Writes benchmarks/results/shapes-vae-NAME.json and a picture
(renders on top, then one row per decoder) next to it.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imagic_lite.files import atomic_path, write_text_atomic
from imagic_lite.shapes import world
from imagic_lite.shapes.train import to_tensor

RESULTS = Path(__file__).resolve().parents[1] / "results"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("vaes", nargs="+", type=Path, help="AutoencoderKL folders; the first one encodes")
    parser.add_argument("--name", required=True)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--seed", type=int, default=123)
    args = parser.parse_args(argv)
    from diffusers import AutoencoderKL

    torch.set_num_threads(1)
    vaes = [AutoencoderKL.from_pretrained(str(path)).float().eval() for path in args.vaes]
    rng = random.Random(args.seed)
    x = to_tensor([world.render(world.random_scene(rng, p_second=0.3)) for _ in range(args.n)])
    rows, pictures = [], [x[:8]]
    with torch.no_grad():
        latents = vaes[0].encode(x).latent_dist.mean
        for path, vae in zip(args.vaes, vaes, strict=True):
            error = vae.decode(latents).sample - x
            p99 = error.abs().flatten().kthvalue(int(0.99 * error.numel())).values.item()
            rows.append({"vae": str(path), "mse": round(error.pow(2).mean().item(), 6),
                         "mean_abs_error": round(error.abs().mean().item(), 5), "p99_abs_error": round(p99, 5)})
            pictures.append(error[:8] + x[:8])
            print(json.dumps(rows[-1]))
    grid = np.concatenate([np.concatenate([((im.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).numpy().astype("uint8")
                                           for im in row], 1) for row in pictures], 0)
    picture = RESULTS / f"shapes-vae-{args.name}.png"
    with atomic_path(picture) as tmp:
        Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.Resampling.NEAREST).save(
            tmp, format="PNG")
    result = {"decoders": rows, "n": args.n, "seed": args.seed, "picture": picture.name,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python", "benchmarks/shapes/shapes_vae_check.py", *(argv or sys.argv[1:])]),
              "device": f"{platform.machine()} cpu, 1 thread", "torch": torch.__version__}
    write_text_atomic(RESULTS / f"shapes-vae-{args.name}.json", json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
