"""Dev measurements behind auto-eta's design (benchmarks/results/sweeps/auto-eta-dev-suite2.json): per case and eta,
the checker's verdicts next to the judge's raw statistics.
Usage: python benchmarks/eta_dev.py SUITE_SEED PER_KIND SHARD SHARDS OUT.json
(run from the repository root; writes images to /tmp/etadev/img).
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from quality import RunSettings, _restore, resolved_preset
from quality_suite import build_suite, score

ETAS = (0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8)
TS = tuple(range(50, 1000, 100))

def main(suite_seed, per_kind, shard, shards, out):
    from imagic_lite.api import Imagic
    from imagic_lite.eta import base_judge, denoising_errors, image_latents
    from imagic_lite.models import encode_text
    from imagic_lite.shapes import world
    from imagic_lite.shapes.checker import read
    torch.set_num_threads(1)
    run = RunSettings("shapes", "cpu", {}, ETAS, (), (0,))
    preset = resolved_preset(run, "lora")
    loaded = Imagic.from_pretrained("shapes", preset)
    c = loaded.components
    base = {k: v.detach().clone() for k, v in c.unet.state_dict().items()}
    sample = replace(preset.sample, etas=ETAS, seeds=(0,), batch=len(ETAS))
    cases = build_suite(suite_seed, per_kind)[shard::shards]
    rows = []
    for case in cases:
        t0 = time.time()
        _restore(c.unet, base)
        imagic = Imagic(c, preset)
        image = world.render(case.source)
        bundle = imagic.fit(image, case.prompt, seed=0)
        samples = imagic.generate(bundle, sample=sample)
        t1 = time.time()
        uncond = encode_text(c, "")[0]
        imgs = [image] + [s.image for s in samples]
        lat = image_latents(c, imgs)
        conds = [bundle.e_tgt, bundle.e_opt, uncond]
        with base_judge(c):
            eb = denoising_errors(c, lat, conds, TS, 2, 1234)
        et = denoising_errors(c, lat, conds, TS, 2, 1234)
        t2 = time.time()
        px = [np.asarray(im, dtype=np.float32) / 255 for im in imgs]
        row = {"case": case.id, "kind": case.kind, "prompt": case.prompt, "fit_s": t1 - t0, "judge_s": t2 - t1,
               "etas": list(ETAS), "err_base": eb.tolist(), "err_tuned": et.tolist(),
               "lat_mse": [float((lat[i] - lat[0]).pow(2).mean()) for i in range(len(imgs))],
               "pix_mse": [float(((px[i] - px[0]) ** 2).mean()) for i in range(len(imgs))],
               "scores": [asdict(score(case, read(s.image))) for s in samples]}
        rows.append(row)
        verdicts = [(s["success"], s["preserved"]) for s in row["scores"]]
        print(case.id, f"{t1 - t0:.0f}s judge {t2 - t1:.1f}s", verdicts, flush=True)
        Path(out).write_text(json.dumps(rows))
        for s in samples:
            s.image.save(f"/tmp/etadev/img/{suite_seed}-{case.id}-{s.eta}.png")
        image.save(f"/tmp/etadev/img/{suite_seed}-{case.id}-input.png")

if __name__ == "__main__":
    os.makedirs("/tmp/etadev/img", exist_ok=True)
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
