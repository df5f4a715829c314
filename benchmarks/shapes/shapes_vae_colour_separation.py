"""How far apart does the shapes VAE put the colours in latent space, on each background?

For every shape and size at the centre, encodes the shape in each colour on each background (posterior means,
times the VAE's scaling factor: the units the UNet sees) and reports, per background, the latent distance between
every pair of colours, averaged over shapes and sizes, beside the latent norm of the plain background and whether
each render survives an encode/decode round trip (read back by the checker). A colour pair that sits close
together costs a denoiser little loss to confuse. Writes benchmarks/results/shapes-vae-colour-separation.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imagic_lite.files import write_text_atomic
from imagic_lite.shapes import world
from imagic_lite.shapes.checker import read
from imagic_lite.shapes.train import to_tensor

RESULTS = Path(__file__).resolve().parents[1] / "results"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("vae", type=Path, nargs="?", default=Path("imagic_lite/shapes/model/vae"),
                        help="AutoencoderKL folder (default: the shipped model's)")
    parser.add_argument("--out", type=Path, default=RESULTS / "shapes-vae-colour-separation.json")
    args = parser.parse_args(argv)
    from diffusers import AutoencoderKL

    torch.set_num_threads(1)
    vae = AutoencoderKL.from_pretrained(str(args.vae)).float().eval()
    scale = vae.config.scaling_factor
    colours = list(world.COLOURS)
    result: dict[str, dict] = {}
    for background in world.BACKGROUNDS:
        pair_distances: dict[str, list[float]] = {f"{a}-{b}": [] for a, b in itertools.combinations(colours, 2)}
        round_trip, total = 0, 0
        for shape, size in itertools.product(world.SHAPES, world.SIZES):
            scenes = [world.Scene(shape, colour, size, "center", background) for colour in colours]
            with torch.no_grad():
                latents = vae.encode(to_tensor([world.render(s, 64) for s in scenes])).latent_dist.mean * scale
                decoded = vae.decode(latents / scale).sample
            for (i, a), (j, b) in itertools.combinations(enumerate(colours), 2):
                pair_distances[f"{a}-{b}"].append((latents[i] - latents[j]).norm().item())
            pixels = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
            for scene, image in zip(scenes, pixels, strict=True):
                found = read(image).main
                round_trip += found is not None and found.colour == scene.colour
                total += 1
        with torch.no_grad():  # the background alone: how much of the latent the background itself takes
            blank = Image.new("RGB", (64, 64), world.BACKGROUNDS[background])
            plain = vae.encode(to_tensor([blank])).latent_dist.mean * scale
        means = {pair: float(np.mean(values)) for pair, values in pair_distances.items()}
        result[background] = {
            "mean_pair_distance": float(np.mean(list(means.values()))),
            "closest_pair": min(means, key=means.get),
            "closest_pair_distance": min(means.values()),
            "pair_distance": means,
            "background_latent_norm": plain.norm().item(),
            "round_trip_colour_right": round_trip / total,
        }
    gray = result[world.DEFAULT_BACKGROUND]["mean_pair_distance"]
    for entry in result.values():
        entry["mean_pair_distance_vs_gray"] = entry["mean_pair_distance"] / gray
    payload = {
        "vae": str(args.vae), "scaling_factor": scale,
        "scenes": "each shape x size at the center, one per colour; distances of scaled posterior means",
        "backgrounds": result,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
        "device": {"kind": "cpu", "processor": platform.processor() or platform.machine(), "torch_threads": 1},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
    }
    write_text_atomic(args.out, json.dumps(payload, indent=1) + "\n")
    for background, entry in result.items():
        print(f"{background}: mean pair distance {entry['mean_pair_distance']:.2f} "
              f"({entry['mean_pair_distance_vs_gray']:.2f}x gray), closest {entry['closest_pair']} "
              f"{entry['closest_pair_distance']:.2f}, round trip {entry['round_trip_colour_right']:.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
