"""The edit-quality benchmark: runs the suite of `quality_suite` through Imagic (LoRA and full fine-tune, via the
`Imagic` API) and the SDEdit baseline, scores every output with the pixel checker and writes JSON, markdown and a grid.

Example: python benchmarks/quality.py --model shapes --jobs 2   (`--quick --cases 5` smoke-tests the harness)
"""

from __future__ import annotations

import os

# Tiny models on a shared 2-core machine: one OpenMP thread per process, workers that sleep rather than spin.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import asdict, dataclass, field, replace  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from multiprocessing import get_context  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_suite import CENTRE_TOLERANCE, KINDS, EditCase, build_suite, score, subset  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("lora", "auto", "full", "sdedit")
LABELS = {"lora": "Imagic-LoRA", "auto": "Imagic-LoRA auto-eta", "full": "Imagic-full", "sdedit": "SDEdit"}
DEFAULT_ETAS = (0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4)
DEFAULT_STRENGTHS = (0.4, 0.5, 0.6, 0.7, 0.8)
DEFAULT_ETA = 1.0  # e = e_tgt exactly, with the fine-tuned denoiser: the one eta that needs no choosing
DEFAULT_STRENGTH = 0.6  # the middle of SDEdit's usual range
QUICK = {"embed": {"steps": 3}, "tune": {"steps": 3}, "sample": {"steps": 4}}


@dataclass(frozen=True)
class RunSettings:
    """What every worker needs to know, as plain data (it crosses process boundaries)."""

    model: str
    preset: str
    overrides: dict[str, Any]
    etas: tuple[float, ...]
    strengths: tuple[float, ...]
    seeds: tuple[int, ...]
    fit_seed: int = 0
    auto_eta: bool = False  # the lora units also run `--auto-eta` over their own etas (the `auto` method)
    records: str = ""  # a folder where each finished case is appended at once (--records), so a cut run keeps it


@dataclass
class CaseResult:
    """One case under one method: per-stage seconds and peak RSS, and every sample with its reading and score."""

    case: str
    kind: str
    method: str
    prompt: str
    seconds: dict[str, float]
    peak_rss: dict[str, int]
    settings: dict[str, Any]
    samples: list[dict[str, Any]] = field(default_factory=list)
    input_png: bytes = b""
    auto_eta: dict[str, Any] | None = None  # the auto method: the choice, its scores and UNet calls


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _sample_record(case: EditCase, name: str, value: float, seed: int, image: Image.Image) -> dict[str, Any]:
    from imagic_lite.shapes.checker import read

    reading = read(image)
    return {"setting": name, "value": value, "seed": seed, "reading": reading.to_dict(),
            "score": asdict(score(case, reading)), "png": _png(image)}


def resolved_preset(run: RunSettings, method: str):
    """The settings a method runs with: preset < the model's imagic-lite.toml < --set overrides (< full mode)."""
    from imagic_lite.api import resolve_settings
    from imagic_lite.config import apply_overrides, load_preset
    from imagic_lite.models import resolve_model

    preset = resolve_settings(resolve_model(run.model), load_preset(run.preset), None, run.overrides)
    if method == "full":
        preset = apply_overrides(preset, {"tune": {"mode": "full"}}, "benchmark method 'full'")
    return preset


def _restore(unet: torch.nn.Module, base: dict[str, torch.Tensor]) -> None:
    """Put the base weights back, so each case starts from the shipped model and not from the previous edit."""
    from imagic_lite.lora import has_lora

    if has_lora(unet):
        unet.unload_lora()
    unet.load_state_dict(base, strict=True)
    unet.requires_grad_(False)
    unet.eval()


def run_imagic(method: str, cases: tuple[EditCase, ...], run: RunSettings) -> list[CaseResult]:
    """Fit once per case (stages A and B), then sample every eta and seed from that one fit (stage C).

    With `run.auto_eta` (lora only), auto-eta then judges those same stage C images: its chosen images become the
    `auto` method's result for the case, its time the "eta" stage (what it adds to plain stage C)."""
    from imagic_lite.api import Imagic
    from imagic_lite.shapes import world

    torch.set_num_threads(1)
    preset = resolved_preset(run, method)
    loaded = Imagic.from_pretrained(run.model, preset)
    c = loaded.components
    base = {k: v.detach().clone() for k, v in c.unet.state_dict().items()}
    sample = replace(preset.sample, etas=run.etas, seeds=run.seeds, batch=len(run.etas))
    results = []
    for case in cases:
        _restore(c.unet, base)
        imagic = Imagic(c, preset)
        image = world.render(case.source)
        bundle = imagic.fit(image, case.prompt, seed=run.fit_seed)
        auto = run.auto_eta and method == "lora"
        samples = imagic.generate(bundle, sample=sample, auto_eta=auto)
        seconds = {r.stage: round(r.seconds, 3) for r in imagic.records}
        peaks = {r.stage: int(r.peak["peak_bytes"]) for r in imagic.records if r.peak}
        plain = {k: v for k, v in seconds.items() if k != "eta"}
        result = CaseResult(case.id, case.kind, method, case.prompt, plain, peaks, preset.to_dict(),
                            input_png=_png(image))
        for s in samples:
            result.samples.append(_sample_record(case, "eta", s.eta, s.seed, s.image))
        results.append(result)
        _progress(method, case, result)
        if run.records:
            save_record(run.records, result)
        if auto:
            chosen = CaseResult(case.id, case.kind, "auto", case.prompt, seconds, peaks, preset.to_dict(),
                                input_png=result.input_png, auto_eta=imagic.eta_choice.to_dict()
                                | {"stage_c_unet_calls": 2 * sample.steps * len(sample.etas) * len(sample.seeds)})
            chosen.samples = [record for s, record in zip(samples, result.samples, strict=True) if s.chosen]
            results.append(chosen)
            _progress("auto", case, chosen)
            if run.records:
                save_record(run.records, chosen)
    return results


@torch.no_grad()
def sdedit(c, latent: torch.Tensor, e_tgt, uncond, strength: float, steps: int, guidance: float,
           seed: int) -> Image.Image:
    """SDEdit (Meng et al. 2022): noise the input's latent to `strength` of the schedule, then denoise it with DDIM
    and classifier-free guidance toward the target prompt; round(steps * strength) steps run."""
    from diffusers import DDIMScheduler

    from imagic_lite.images import from_tensor
    from imagic_lite.models import Cond, decode, unet_kwargs

    scheduler = DDIMScheduler.from_config(c.scheduler.config)
    scheduler.set_timesteps(steps)
    skipped = steps - int(round(steps * strength))
    timesteps = scheduler.timesteps[skipped:]
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    latents = scheduler.add_noise(latent, noise, timesteps[:1]).to(c.device)
    height, width = latent.shape[-2] * c.vae_scale, latent.shape[-1] * c.vae_scale
    kwargs = unet_kwargs(c, Cond.cat([uncond, e_tgt]).to(c.device), height, width)
    for t in timesteps:
        model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        with c.autocast():
            pred = c.unet(model_in, t, **kwargs).sample.float()
        pred_uncond, pred_cond = pred.chunk(2)
        latents = scheduler.step(pred_uncond + guidance * (pred_cond - pred_uncond), t, latents).prev_sample
    return from_tensor(decode(c, latents))[0]


def run_sdedit(cases: tuple[EditCase, ...], run: RunSettings) -> list[CaseResult]:
    """The baseline with the same sampler (steps, guidance) as Imagic's stage C, at every strength and seed."""
    from imagic_lite.images import prepare, to_tensor
    from imagic_lite.memory import PeakMemory
    from imagic_lite.models import encode, load_components, pick_device
    from imagic_lite.shapes import world

    torch.set_num_threads(1)
    preset = resolved_preset(run, "sdedit")
    c = load_components(run.model, preset.memory, pick_device(None))
    settings = {"steps": preset.sample.steps, "guidance": preset.sample.guidance, "strengths": list(run.strengths),
                "scheduler": "DDIM", "noise": "seeded CPU generator per sample"}
    results = []
    for case in cases:
        start = time.perf_counter()
        image = world.render(case.source)
        with PeakMemory(c.device) as peak:
            encoded = encode(c, to_tensor(prepare(image, c.native, c.multiple)), case.prompt)
            outputs = [(s, seed, sdedit(c, encoded.latent, encoded.e_tgt, encoded.uncond, s, preset.sample.steps,
                                        preset.sample.guidance, seed))
                       for s in run.strengths for seed in run.seeds]
        result = CaseResult(case.id, case.kind, "sdedit", case.prompt, {"C": round(time.perf_counter() - start, 3)},
                            {"C": int(peak.peak.peak_bytes)}, settings, input_png=_png(image))
        for strength, seed, out in outputs:
            result.samples.append(_sample_record(case, "strength", strength, seed, out))
        results.append(result)
        _progress("sdedit", case, result)
    return results


def _progress(method: str, case: EditCase, result: CaseResult) -> None:
    hits = sum(s["score"]["success"] and s["score"]["preserved"] for s in result.samples)
    total = sum(v for k, v in result.seconds.items() if k != "load")
    print(f"[{time.strftime('%H:%M:%S')}] {method:6s} {case.id:18s} {total:6.1f}s  edits {hits}/{len(result.samples)}"
          f"  {case.prompt!r}", flush=True)


def run_unit(method: str, cases: tuple[EditCase, ...], run: RunSettings) -> list[CaseResult]:
    return run_sdedit(cases, run) if method == "sdedit" else run_imagic(method, cases, run)


def save_record(folder: str, result: CaseResult) -> None:
    """Append one finished case (PNGs as base64) to this process's JSON-lines file in `folder`."""
    import base64

    row = asdict(result)
    row["input_png"] = base64.b64encode(result.input_png).decode()
    for sample in row["samples"]:
        sample["png"] = base64.b64encode(sample["png"]).decode()
    with open(Path(folder) / f"records-{os.getpid()}.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()


def load_records(folder: Path) -> list[CaseResult]:
    """Every case saved by `save_record` in `folder` (a line cut short by a kill is skipped)."""
    import base64

    results = []
    for path in sorted(folder.glob("records-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            row["input_png"] = base64.b64decode(row["input_png"])
            for sample in row["samples"]:
                sample["png"] = base64.b64decode(sample["png"])
            results.append(CaseResult(**row))
    return results


# ---------------------------------------------------------------------------------------------------------------
# Summaries


def _rate(flags: list[bool]) -> float:
    return round(sum(flags) / len(flags), 3) if flags else 0.0


def _by_value(result: CaseResult) -> dict[float, dict[str, float]]:
    """Per setting value, the fraction of seeds with success, with preservation, and with both."""
    table: dict[float, dict[str, float]] = {}
    for value in sorted({s["value"] for s in result.samples}):
        scores = [s["score"] for s in result.samples if s["value"] == value]
        table[value] = {"success": _rate([s["success"] for s in scores]),
                        "preserved": _rate([s["preserved"] for s in scores]),
                        "both": _rate([s["success"] and s["preserved"] for s in scores])}
    return table


def best_value(result: CaseResult, default: float) -> float:
    """The per-case oracle (the paper picks eta per image too): most edits that kept everything, then most
    successes, then most preserved; ties go to the value nearest the default."""
    table = _by_value(result)
    return max(table, key=lambda v: (table[v]["both"], table[v]["success"], table[v]["preserved"],
                                     -abs(v - default) if default is not None else 0.0))


def summarise(results: list[CaseResult], default: float | None) -> dict[str, Any]:
    """Success/preservation at the best value per case and at the default, per value, per kind; time and memory."""
    if not results:
        return {}
    tables = [_by_value(r) for r in results]
    best = [table[best_value(r, default)] for r, table in zip(results, tables, strict=True)]
    at_default = [table.get(default) for table in tables]

    def rates(rows: list[dict[str, float] | None]) -> dict[str, float]:
        rows = [r for r in rows if r is not None]
        return {key: round(sum(r[key] for r in rows) / len(rows), 3) if rows else None
                for key in ("success", "preserved", "both")}

    values = sorted({v for table in tables for v in table})
    by_kind = {}
    for kind in KINDS:
        rows = [b for r, b in zip(results, best, strict=True) if r.kind == kind]
        if rows:
            by_kind[kind] = rates(rows) | {"cases": len(rows)}
    fit = [sum(v for k, v in r.seconds.items() if k in ("encode", "A", "B")) for r in results]
    total = [sum(v for k, v in r.seconds.items() if k != "load") for r in results]
    peaks = [max(r.peak_rss.values()) for r in results]
    return {
        "cases": len(results),
        "best": rates(best) | {"chosen": {str(v): sum(best_value(r, default) == v for r in results) for v in values}},
        "default": rates(at_default) | {"value": default},
        "per_value": {str(v): rates([table.get(v) for table in tables]) for v in values},
        "by_kind_at_best": by_kind,
        "seconds_per_case": round(sum(total) / len(total), 2),
        "fit_seconds_per_case": round(sum(fit) / len(fit), 2),
        "sample_seconds_per_case": round(sum(r.seconds.get("C", 0.0) for r in results) / len(results), 2),
        "peak_rss_mb": round(max(peaks) / 2**20, 1),
        "stage_b_peak_rss_mb": round(max(r.peak_rss.get("B", 0) for r in results) / 2**20, 1) or None,
        **(_search_cost(results) if results[0].auto_eta else {}),
    }


def _search_cost(results: list[CaseResult]) -> dict[str, Any]:
    """What auto-eta added to plain stage C in the same run: seconds and image-sized UNet evaluations per case."""
    n = len(results)
    return {"eta_seconds_per_case": round(sum(r.seconds.get("eta", 0.0) for r in results) / n, 2),
            "eta_unet_calls_per_case": round(sum(r.auto_eta["unet_calls"] for r in results) / n, 1),
            "stage_c_unet_calls_per_case": round(sum(r.auto_eta["stage_c_unet_calls"] for r in results) / n, 1)}


# ---------------------------------------------------------------------------------------------------------------
# Writers


def markdown(result: dict[str, Any]) -> str:
    """The headline table, then success/preservation per eta or strength (the trade-off curve) and per kind."""
    kinds = ", ".join(f"{k} {n}" for k, n in result["suite"]["kinds"].items())
    lines = [f"# Edit quality on `{result['model']}` ({result['date'][:10]})", "",
             f"Suite: {result['suite']['cases']} cases ({kinds}), centre tolerance {CENTRE_TOLERANCE} of the image"
             f" side. Device: {result['device']['name']}"
             f" ({result['device']['type']}, {result['device']['threads']} thread(s) per process)."
             f" Command: `{result['command']}`.", "",
             "Best = the eta (Imagic) or strength (SDEdit) per case that gives an edit with everything else kept;"
             " default = one fixed value for every case. Auto-eta has one eta per case, its own choice (shown as"
             " best).", "",
             "| method | cases | success (best) | preserved (best) | both (best) | default | success (default)"
             " | preserved (default) | both (default) | s/case | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, method in result["methods"].items():
        s = method["summary"]
        if not s:
            continue
        d = s["default"]
        pct = lambda x: "–" if x is None else f"{100 * x:.0f} %"  # noqa: E731
        lines.append(f"| {LABELS[name]} | {s['cases']} | {pct(s['best']['success'])} | {pct(s['best']['preserved'])}"
                     f" | {pct(s['best']['both'])} | {d['value'] if d['value'] is not None else '–'}"
                     f" | {pct(d['success'])} | {pct(d['preserved'])}"
                     f" | {pct(d['both'])} | {s['seconds_per_case']} | {s['peak_rss_mb']} |")
    for method in result["methods"].values():
        if method.get("on_subset"):
            lines += ["", f"On the {method['on_subset']['cases']} cases that {LABELS['full']} ran:", ""]
            lines += ["| method | success (best) | preserved (best) | both (best) |", "|---|---|---|---|"]
            for other, s in method["on_subset"]["summaries"].items():
                lines.append(f"| {LABELS[other]} | {100 * s['best']['success']:.0f} % |"
                             f" {100 * s['best']['preserved']:.0f} % | {100 * s['best']['both']:.0f} % |")
    for name, method in result["methods"].items():
        s = method["summary"]
        if not s:
            continue
        setting = "strength" if name == "sdedit" else "eta"
        lines += ["", f"## {LABELS[name]}: per {setting}" + (" it chose" if name == "auto" else ""), "",
                  f"| {setting} | success | preserved | both |", "|---|---|---|---|"]
        for value, r in s["per_value"].items():
            lines.append(f"| {value} | {100 * r['success']:.0f} % | {100 * r['preserved']:.0f} % |"
                         f" {100 * r['both']:.0f} % |")
        lines += ["", f"By kind, at the best {setting}:", "", "| kind | cases | success | preserved | both |",
                  "|---|---|---|---|---|"]
        for kind, r in s["by_kind_at_best"].items():
            lines.append(f"| {kind} | {r['cases']} | {100 * r['success']:.0f} % | {100 * r['preserved']:.0f} % |"
                         f" {100 * r['both']:.0f} % |")
        if "eta_seconds_per_case" in s:
            lines += ["", f"Cost of the search, per case in this run: {s['eta_seconds_per_case']} s on top of "
                      f"stage C's "
                      f"{s['sample_seconds_per_case']} s; {s['eta_unet_calls_per_case']} image-sized UNet evaluations "
                      f"on top of stage C's {s['stage_c_unet_calls_per_case']}. Chosen etas: "
                      + ", ".join(f"{v} in {n}" for v, n in s["best"]["chosen"].items() if n) + "."]
    if result.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def picture_grid(results: dict[str, list[CaseResult]], defaults: dict[str, float], rows: int = 10,
                 cell: int = 128) -> Image.Image:
    """Per shown case: the input, then each method's best output (label: value, S = success, P = preserved)."""
    methods = [m for m in METHODS if results.get(m)]
    shown = [r.case for r in results[methods[0]]]
    shown = [cid for kind in KINDS for cid in shown if cid.startswith(kind)]
    per_kind = max(1, rows // len(KINDS))
    chosen = [cid for kind in KINDS for cid in [c for c in shown if c.startswith(kind)][:per_kind]]
    label_h, prompt_h, header_h = 16, 18, 18
    width = cell * (1 + len(methods))
    grid = Image.new("RGB", (width, header_h + len(chosen) * (cell + label_h + prompt_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for col, name in enumerate(["input", *(LABELS[m] + " (best)" for m in methods)]):
        draw.text((col * cell + 3, 3), name, fill=(0, 0, 0), font=font)
    for row, cid in enumerate(chosen):
        y = header_h + row * (cell + label_h + prompt_h)
        first = next(r for r in results[methods[0]] if r.case == cid)
        draw.text((3, y + 2), f"{cid}: {first.prompt}"[:110], fill=(0, 0, 0), font=font)
        y += prompt_h
        grid.paste(Image.open(io.BytesIO(first.input_png)).resize((cell, cell), Image.Resampling.NEAREST), (0, y))
        for col, method in enumerate(methods, start=1):
            found = [r for r in results[method] if r.case == cid]
            if not found:
                draw.text((col * cell + 3, y + cell // 2), "not run", fill=(120, 120, 120), font=font)
                continue
            value = best_value(found[0], defaults[method])
            sample = next(s for s in found[0].samples if s["value"] == value)
            image = Image.open(io.BytesIO(sample["png"])).resize((cell, cell), Image.Resampling.NEAREST)
            grid.paste(image, (col * cell, y))
            ok = sample["score"]["success"] and sample["score"]["preserved"]
            mark = ("S" if sample["score"]["success"] else "-") + ("P" if sample["score"]["preserved"] else "-")
            name = "strength" if method == "sdedit" else "eta"
            draw.text((col * cell + 3, y + cell + 2), f"{name} {value:g}  {mark}",
                      fill=(0, 128, 0) if ok else (200, 0, 0), font=font)
    return grid


def _jsonable(results: list[CaseResult]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        row = asdict(r)
        row.pop("input_png")
        row.pop("settings")  # once per method, in methods.<name>.settings
        for s in row["samples"]:
            s.pop("png")
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Running


def plan_units(cases: dict[str, tuple[EditCase, ...]], jobs: int) -> list[tuple[str, tuple[EditCase, ...]]]:
    """Work units for `jobs` processes: each Imagic method's cases split into `jobs` shards (each shard loads the
    model once), SDEdit in one; the longest units first so the pool ends together."""
    units = []
    for method, chosen in cases.items():
        shards = 1 if method == "sdedit" else max(1, min(jobs, len(chosen)))
        for index in range(shards):
            part = chosen[index::shards]
            if part:
                units.append((method, part))
    weight = {"full": 3, "lora": 2, "sdedit": 1}
    return sorted(units, key=lambda u: -weight[u[0]] * len(u[1]))


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="shapes", help="shapes (the shipped model), or a diffusers folder")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated: lora,full,sdedit")
    ap.add_argument("--cases", type=int, default=None, help="run the first N cases (round-robin over kinds)")
    ap.add_argument("--only", default="", help="comma-separated case ids (e.g. size-02,second-object-07): diagnose "
                    "those cases only")
    ap.add_argument("--kinds", default="", help=f"comma-separated kinds to keep, of {', '.join(KINDS)}")
    ap.add_argument("--full-cases", type=int, default=12, help="cases for the (slow) full fine-tune, a subset")
    ap.add_argument("--suite-seed", type=int, default=0, help="0 is the benchmark; others are held-out suites")
    ap.add_argument("--per-kind", type=int, default=8)
    ap.add_argument("--etas", default=",".join(map(str, DEFAULT_ETAS)))
    ap.add_argument("--strengths", default=",".join(map(str, DEFAULT_STRENGTHS)))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--default-eta", type=float, default=DEFAULT_ETA)
    ap.add_argument("--default-strength", type=float, default=DEFAULT_STRENGTH)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a stage setting on top of preset and model TOML (TOML value syntax), e.g. tune.steps=200")
    ap.add_argument("--quick", action="store_true", help="tiny step counts: smoke-tests the harness, not the model")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (each single-threaded)")
    ap.add_argument("--tag", default="", help="appended to the output names (for sweeps)")
    ap.add_argument("--note", action="append", default=[], help="a line for the results' notes")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--records", type=Path, help="save each finished case in this folder at once; cases already "
                    "there are not run again (a cut run continues), and the results cover them all")
    ap.add_argument("--summarise-only", action="store_true", help="with --records: write the results from the "
                    "cases saved so far without running any (a partial run says how many it has)")
    return ap.parse_args(argv)


def select(suite: tuple[EditCase, ...], only: str, kinds: str) -> tuple[EditCase, ...]:
    """The cases named by `--only` and of the kinds in `--kinds` (either empty = no filter); unknown names stop."""
    ids = {c.strip() for c in only.split(",") if c.strip()}
    wanted = {k.strip() for k in kinds.split(",") if k.strip()}
    unknown = sorted(ids - {c.id for c in suite}) + sorted(wanted - set(KINDS))
    if unknown:
        raise SystemExit(f"no such case or kind in this suite: {', '.join(unknown)}")
    return tuple(c for c in suite if (not ids or c.id in ids) and (not wanted or c.kind in wanted))


def overrides_from(sets: list[str], quick: bool) -> dict[str, Any]:
    """`section.key=value` strings (values in TOML syntax) into a nested dict for `apply_overrides`."""
    import tomllib

    data: dict[str, dict[str, Any]] = {k: dict(v) for k, v in QUICK.items()} if quick else {}
    for item in sets:
        key, _, value = item.partition("=")
        section, _, name = key.strip().partition(".")
        data.setdefault(section, {})[name] = tomllib.loads(f"v = {value.strip()}")["v"]
    return data


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    from imagic_lite.api import device_info, versions
    from imagic_lite.files import write_bytes_atomic, write_text_atomic
    from imagic_lite.models import pick_device, resolve_model

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown method(s) {sorted(unknown)}; choose from {', '.join(METHODS)}")
    if "auto" in methods and "lora" not in methods:  # auto-eta judges the lora method's own stage C images
        methods.insert(methods.index("auto"), "lora")
    suite = build_suite(args.suite_seed, args.per_kind)
    chosen = select(suite, args.only, args.kinds)
    chosen = subset(chosen, args.cases) if args.cases else chosen
    cases = {m: subset(chosen, args.full_cases) if m == "full" else chosen for m in methods}
    run = RunSettings(args.model, args.preset, overrides_from(args.set, args.quick),
                      tuple(float(v) for v in args.etas.split(",")),
                      tuple(float(v) for v in args.strengths.split(",")), tuple(int(v) for v in args.seeds.split(",")),
                      auto_eta="auto" in methods)
    defaults = {"lora": args.default_eta, "auto": None, "full": args.default_eta, "sdedit": args.default_strength}
    started = time.perf_counter()
    saved: list[CaseResult] = []
    if args.records:
        args.records.mkdir(parents=True, exist_ok=True)
        run = replace(run, records=str(args.records))
        ids = {c.id for c in chosen}
        saved = [r for r in load_records(args.records) if r.method in methods and r.case in ids]
    have = {(r.method, r.case) for r in saved}
    # A lora case is done only with its auto twin when auto is asked (both come from one fit).
    todo = {m: tuple(c for c in cs if (m, c.id) not in have or (m == "lora" and run.auto_eta
                                                                  and ("auto", c.id) not in have))
            for m, cs in cases.items() if m != "auto"}  # auto rides on lora's units
    rerun = {(m, c.id) for m, cs in todo.items() for c in cs} | {("auto", c.id) for c in todo.get("lora", ())}
    saved = [r for r in saved if (r.method, r.case) not in rerun]
    units = [] if args.summarise_only else plan_units({m: c for m, c in todo.items() if c}, args.jobs)
    print(f"{sum(len(c) for c in todo.values())} cases to run in {len(units)} units on {args.jobs} process(es)"
          f" ({len(saved)} case results saved before): " + ", ".join(f"{m} {len(c)}" for m, c in todo.items()),
          flush=True)
    results: dict[str, list[CaseResult]] = {m: [r for r in saved if r.method == m] for m in methods}
    if not units:
        done = []
    elif args.jobs == 1:
        done = [run_unit(method, part, run) for method, part in units]
    else:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(run_unit, method, part, run) for method, part in units]
            done = [future.result() for future in futures]
    for result in (r for unit in done for r in unit):
        results[result.method].append(result)
    order = {c.id: i for i, c in enumerate(suite)}
    for method in methods:
        results[method].sort(key=lambda r: order[r.case])
    wall = time.perf_counter() - started

    date = datetime.now(timezone.utc)
    summary: dict[str, Any] = {}
    for method in methods:
        settings = results[method][0].settings if results[method] else {}
        summary[method] = {"label": LABELS[method], "settings": settings,
                           "cases_run": [r.case for r in results[method]],
                           "summary": summarise(results[method], defaults[method])}
    if "full" in methods and len(cases["full"]) < len(chosen):
        ids = {c.id for c in cases["full"]}
        summary["full"]["on_subset"] = {"cases": len(ids), "summaries": {
            m: summarise([r for r in results[m] if r.case in ids], defaults[m]) for m in methods}}
    kinds = {kind: sum(c.kind == kind for c in chosen) for kind in KINDS}
    model_dir = resolve_model(args.model)
    result = {
        "date": date.isoformat(timespec="seconds"),
        "command": " ".join(["python benchmarks/quality.py", *(argv if argv is not None else sys.argv[1:])]),
        "model": args.model, "model_dir": str(model_dir),
        "model_recommendations": (model_dir / "imagic-lite.toml").read_text()
        if (model_dir / "imagic-lite.toml").is_file() else None,
        "quick": args.quick,
        "suite": {"seed": args.suite_seed, "cases": len(chosen), "kinds": kinds,
                  "centre_tolerance": CENTRE_TOLERANCE,
                  "scoring": "success: every asked attribute reads as the target's; preserved: every other attribute "
                             "(main object's other attributes, box centre within the tolerance, background, number of "
                             "objects, the second object's attributes and centre) reads as the source's"},
        "defaults": defaults, "etas": list(run.etas), "strengths": list(run.strengths), "seeds": list(run.seeds),
        "overrides": run.overrides, "jobs": args.jobs, "wall_seconds": round(wall, 1),
        "device": device_info(pick_device(None)) | {"cpu_count": os.cpu_count(), "processes": args.jobs},
        "versions": versions() | {"python": sys.version.split()[0]},
        "notes": args.note + [f"partial: {LABELS[m]} has {len(results[m])} of {len(cases[m])} cases (the run was cut; "
                              "the rest never ran)" for m in methods if len(results[m]) < len(cases[m])]
        + ([f"Imagic-full ran on a {len(cases['full'])}-case subset (round-robin over kinds) to "
                               "keep the CPU run short; see methods.full.on_subset for every method on those cases"]
                              if "full" in methods and len(cases["full"]) < len(chosen) else []),
        "methods": summary,
        "records": {m: _jsonable(results[m]) for m in methods},
    }
    stem = f"quality-{date:%Y-%m-%d}" + (f"-{args.tag}" if args.tag else "")
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / f"{stem}.json", json.dumps(result, indent=1) + "\n")
    md_name = "quality.md" if not args.tag else f"{stem}.md"
    write_text_atomic(args.out / md_name, markdown(result))
    write_bytes_atomic(args.out / f"{stem}.png", _png(picture_grid(results, defaults)))
    print(markdown(result))
    print(f"wrote {args.out / stem}.json, {md_name}, {stem}.png in {wall:.0f} s")
    return result


if __name__ == "__main__":
    main()
