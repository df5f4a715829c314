"""Dev measurements behind auto-eta's design (benchmarks/results/sweeps/auto-eta-dev-*.json): per case and eta, the
checker's verdicts next to everything a judge could read, so choice rules are compared offline on dev suites only
(suite seeds 2 and 3; never the benchmark's seed 0 or the held-out seed 1).

Per case: an Imagic-LoRA fit with the shapes model's settings; renders at eta 0 and ETAS (seed 0); the base model's
(LoRA off) denoising errors of the input and every render under [e_tgt, e_opt, uncond] at TS x 2 noises, drawn as
imagic_lite.eta draws them (seed 0), so the production judge's statistic is the 350/550/750 slice exactly; latent
and pixel mean squared distances between every pair of images (input first).
Usage: python benchmarks/eta_dev.py SUITE_SEED PER_KIND SHARD SHARDS OUT.json [IMAGE_DIR]
(run from the repository root).
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
import json
import platform
import sys
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from quality import RunSettings, _restore, resolved_preset
from quality_suite import build_suite, score

ETAS = (0.0, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8)
TS = tuple(range(50, 1000, 100))
NOISES, NOISE_SEED = 2, 0  # imagic_lite.eta.AutoEtaSettings' defaults


def main(suite_seed: int, per_kind: int, shard: int, shards: int, out: str, images: str = "") -> None:
    from imagic_lite.api import Imagic
    from imagic_lite.eta import base_judge, denoising_errors, image_latents
    from imagic_lite.files import write_text_atomic
    from imagic_lite.models import encode_uncond
    from imagic_lite.shapes import world
    from imagic_lite.shapes.checker import read

    torch.set_num_threads(1)
    run = RunSettings("shapes", "cpu", {}, ETAS, (), (0,))
    preset = resolved_preset(run, "lora")
    loaded = Imagic.from_pretrained("shapes", preset)
    c = loaded.components
    base = {k: v.detach().clone() for k, v in c.unet.state_dict().items()}
    sample = replace(preset.sample, etas=ETAS, seeds=(0,), batch=1)
    cases = build_suite(suite_seed, per_kind)[shard::shards]
    uncond = encode_uncond(c)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": f"cpu {platform.machine()}, 1 thread", "torch": torch.__version__,
            "command": " ".join(["python", *sys.argv]), "suite_seed": suite_seed, "etas": list(ETAS),
            "timesteps": list(TS), "noises": NOISES, "noise_seed": NOISE_SEED,
            "conds": ["e_tgt", "e_opt", "uncond"], "images": ["input", *(f"eta {e:g}" for e in ETAS)],
            "sample": asdict(sample)}
    rows = []
    for case in cases:
        t0 = time.time()
        _restore(c.unet, base)
        imagic = Imagic(c, preset)
        image = world.render(case.source)
        bundle = imagic.fit(image, case.prompt, seed=0)
        samples = imagic.generate(bundle, sample=sample)
        t1 = time.time()
        imgs = [image, *(s.image for s in samples)]
        lat = image_latents(c, imgs)
        with base_judge(c):
            errors = denoising_errors(c, lat, [bundle.e_tgt, bundle.e_opt, uncond], TS, NOISES, NOISE_SEED)
        t2 = time.time()
        px = torch.tensor(np.stack([np.asarray(im, dtype=np.float32) / 255 for im in imgs]))
        flat_lat, flat_px = lat.flatten(1), px.flatten(1)
        rows.append({"case": case.id, "kind": case.kind, "prompt": case.prompt, "fit_s": t1 - t0, "judge_s": t2 - t1,
                     "err_base": errors.tolist(),
                     "lat_d2": (torch.cdist(flat_lat, flat_lat) ** 2 / flat_lat.shape[1]).tolist(),
                     "pix_d2": (torch.cdist(flat_px, flat_px) ** 2 / flat_px.shape[1]).tolist(),
                     "scores": [asdict(score(case, read(s.image))) for s in samples]})
        print(case.id, f"fit+C {t1 - t0:.0f}s judge {t2 - t1:.1f}s",
              "".join("B" if s["success"] and s["preserved"] else "s" if s["success"] else "p" if s["preserved"]
                      else "." for s in rows[-1]["scores"]), flush=True)
        write_text_atomic(Path(out), json.dumps({**meta, "rows": rows}))
        if images:
            for s in samples:
                s.image.save(f"{images}/{suite_seed}-{case.id}-{s.eta:g}.png")
            image.save(f"{images}/{suite_seed}-{case.id}-input.png")


if __name__ == "__main__":
    if len(sys.argv) > 6:
        os.makedirs(sys.argv[6], exist_ok=True)
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], *sys.argv[6:7])
