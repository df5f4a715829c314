"""The `imagic-lite` command: parsing, printing and exit codes, no algorithm.

Heavy imports (torch, diffusers) happen inside commands so `--help` answers at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import click

from .errors import EXIT_CODES, ImagicError, InputError

EXIT_HELP = "Exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items()) + "."


def _console(stderr: bool = True):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _quiet_libraries(debug: bool) -> None:
    """Library chatter (progress bars, deprecation notices) would drown our one-line messages."""
    if debug:
        return
    warnings.filterwarnings("ignore")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU-kernel warning (diffusers imports it)
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _numbers(text: str | None, name: str, kind: type = float) -> tuple | None:
    """Parse a comma-separated flag value like `0.6,0.7` (floats) or `0,1,2` (kind=int)."""
    if text is None:
        return None
    example = "0.6,0.7,0.8" if kind is float else "0,1,2"
    try:
        values = tuple(kind(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InputError(f"{name} takes comma-separated numbers like {example}; got {text!r}") from None
    if not values:
        raise InputError(f"{name} needs at least one value")
    return values


def _overrides(**flags: Any) -> dict[str, dict[str, Any]]:
    """Flags as a TOML-shaped table, so they are validated by the same code as preset files.

    --tune-lr is not here: which rate it sets depends on the mode after every layer (api.resolve_settings)."""
    where = {
        "embed_steps": ("embed", "steps"), "embed_lr": ("embed", "lr"), "tune_steps": ("tune", "steps"),
        "rank": ("tune", "rank"), "mode": ("tune", "mode"),
        "sample_steps": ("sample", "steps"), "guidance": ("sample", "guidance"), "etas": ("sample", "etas"),
        "seeds": ("sample", "seeds"), "batch": ("sample", "batch"),
    }
    table: dict[str, dict[str, Any]] = {}
    for flag, value in flags.items():
        if value is None:
            continue
        section, key = where[flag]
        table.setdefault(section, {})[key] = list(value) if isinstance(value, tuple) else value
    return table


def _print_notes(console, notes: list[str]) -> None:
    for note in notes:
        level = "warning" if "cut" in note or "--force" in note else "note"
        console.print(f"[yellow]{level}:[/] {note}")


@click.group(epilog=EXIT_HELP)
@click.version_option(package_name="imagic-lite")
@click.option("--debug", is_flag=True, help="Show tracebacks and library warnings.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Edit a photo from one sentence with Imagic, on the GPU you own."""
    ctx.obj = {"debug": debug}


def _etas_default() -> str:
    """What --etas defaults to, read from the settings (defaults and the shapes model's TOML), for --help."""
    from .config import SampleSettings, tomllib

    shapes = Path(__file__).parent / "shapes" / "model" / "imagic-lite.toml"
    try:
        shapes_etas = tomllib.loads(shapes.read_text())["sample"]["etas"]
    except (OSError, KeyError, ValueError):
        shapes_etas = []
    numbers = ",".join(str(float(e)) for e in SampleSettings().etas)
    return f"{numbers}; --model shapes {','.join(str(float(e)) for e in shapes_etas)}; edit: the bundle's"


AUTO_ETA = click.option(
    "--auto-eta", "auto_eta", is_flag=False, flag_value="diffusion", default=None, metavar="[clip:PATH]",
    help="Choose eta: judge the rendered etas with the model itself (no extra weights), or with a local CLIP folder "
    "(clip:PATH); the grid marks the choice. Put it after the arguments.")


def _fit_options(a_steps: str, b_steps: str, seed: str, thumbnail: str):
    """The stage A/B flags `run` and `batch` share; only their help texts differ."""
    def decorate(fn):
        for option in reversed([
            click.option("--embed-steps", type=int, help=f"Stage A steps ({a_steps})."),
            click.option("--tune-steps", type=int, help=f"Stage B steps ({b_steps})."),
            click.option("--embed-lr", type=float, help="Stage A learning rate."),
            click.option("--tune-lr", type=float, help="Stage B learning rate."),
            click.option("--rank", type=int, help="LoRA rank."),
            click.option("--mode", type=click.Choice(["lora", "full"]),
                         help="Stage B: LoRA (default) or full fine-tune."),
            click.option("--config", "config_file", type=click.Path(path_type=Path),
                         help="TOML with [embed]/[tune]/[sample]."),
            click.option("--seed", type=int, default=0, show_default=True, help=seed),
            click.option("--no-thumbnail", is_flag=True, help=thumbnail),
        ]):
            fn = option(fn)
        return fn
    return decorate


def _common_sample_options(fn):
    from .config import DEFAULT_MODEL

    for option in reversed([
        click.option("--etas", show_default=_etas_default(),
                     help="Interpolation weights, e.g. 0.6,0.7,0.8 (e = eta*e_tgt + (1-eta)*e_opt)."),
        click.option("--seeds", help="Sampling seeds, e.g. 0,1,2."),
        click.option("--sample-steps", type=int, help="DDIM steps in stage C."),
        click.option("--guidance", type=float, help="Classifier-free guidance scale."),
        click.option("--batch", type=int, help="Images per UNet call in stage C."),
        click.option("--model", show_default=f"{DEFAULT_MODEL}; edit: the bundle's base model",
                     help="Hub id, local diffusers folder, or `shapes` (the shipped small model)."),
        click.option("--vram", help="GB of GPU memory to plan for (picks the fastest preset that fits), or auto."),
        click.option("--preset", help="Preset name (see `imagic-lite presets`) or TOML file; overrides --vram."),
        click.option("--device", help="Torch device, e.g. cuda:1 or cpu (default: cuda if present)."),
        click.option("--out", type=click.Path(path_type=Path), show_default="imagic-out/IMAGE-NAME; edit: "
                     "imagic-out/BUNDLE-NAME-edit", help="Output folder."),
        click.option("--overwrite", is_flag=True, help="Replace files in an existing output folder."),
        click.option("--quiet", is_flag=True, help="No progress display and no stage table: notes, warnings and "
                     "the output folder only."),
        click.option("--json", "json_out", is_flag=True, help="Print the summary as JSON on stdout."),
    ]):
        fn = option(fn)
    return fn


@cli.command(epilog=EXIT_HELP)
@click.argument("image", type=click.Path(path_type=Path))
@click.argument("prompt")
@_common_sample_options
@AUTO_ETA
@_fit_options("optimise e_opt", "fine-tune the UNet", "Seed for stages A and B.",
              "Leave the input's thumbnail out of the bundle.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in the same --out folder.")
@click.pass_context
def run(ctx: click.Context, image: Path, prompt: str, model: str | None, vram: str | None, preset: str | None,
        device: str | None, out: Path | None, overwrite: bool, quiet: bool, json_out: bool, etas: str | None,
        seeds: str | None, sample_steps: int | None, guidance: float | None, batch: int | None,
        embed_steps: int | None, tune_steps: int | None, embed_lr: float | None, tune_lr: float | None,
        rank: int | None, mode: str | None, config_file: Path | None, seed: int, no_thumbnail: bool,
        resume: bool, auto_eta: str | None) -> None:
    """Run stages A, B and C on IMAGE toward PROMPT; write images, a grid, a bundle and run.json."""
    from .images import load_image
    from .outputs import prepare_out_dir

    if not prompt.strip():
        raise InputError('the prompt is empty; describe the edited image, e.g. "a dog lying down"')
    auto = _auto_eta(auto_eta)
    if seed < 0:
        raise InputError(f"--seed must be >= 0, got {seed}")
    overrides = _overrides(
        embed_steps=embed_steps, embed_lr=embed_lr, tune_steps=tune_steps, rank=rank, mode=mode,
        sample_steps=sample_steps, guidance=guidance, etas=_numbers(etas, "--etas"),
        seeds=_numbers(seeds, "--seeds", int), batch=batch,
    )
    loaded = load_image(image)  # before the model: a bad file should fail in a second, not after loading
    stem = image.stem.replace(".", "_") or "image"
    _quiet_libraries(ctx.obj["debug"])
    from .api import Imagic, check_settings
    from .models import DEFAULT_MODEL

    # Options and settings first (exit 2), the output folder last before the work (exit 7).
    check_settings(model or DEFAULT_MODEL, preset, vram, device, str(config_file) if config_file else None, overrides,
                   tune_lr)
    out = prepare_out_dir(out or Path("imagic-out") / stem, overwrite=overwrite, resume=resume)

    console = _console()
    imagic = Imagic.from_pretrained(model or DEFAULT_MODEL, preset, vram=vram, device=device,
                                    config_file=str(config_file) if config_file else None, overrides=overrides,
                                    tune_lr=tune_lr,  # for the final mode: a preset or --config may choose full
                                    chatter=ctx.obj["debug"])
    imagic.notes[:0] = list(loaded.notes)
    _print_notes(console, imagic.notes)
    shown = len(imagic.notes)
    if not quiet and not json_out:
        p = imagic.preset
        console.print(f"[bold]imagic-lite[/] preset [cyan]{p.name}[/] on {imagic.components.device} "
                      f"({str(imagic.components.dtype).replace('torch.', '')}), model {imagic.components.model_id}, "
                      f"{p.embed.steps}+{p.tune.steps} steps, tune {p.tune.mode}")
    with _disk_full_says_need(_output_bytes(imagic, len(imagic.preset.sample.etas) * len(imagic.preset.sample.seeds))):
        _finish_run(imagic, loaded.image, prompt, stem, out, seed=seed, resume=resume, thumbnail=not no_thumbnail,
                    quiet=quiet, json_out=json_out, console=console, shown=shown, auto=auto)


def _output_bytes(imagic, images: int, *, bundle: bool = True) -> int:
    """About what a run writes, for the disk-full message: the bundle (LoRA or full UNet in fp16, the two
    embeddings) and PNGs at most their uncompressed size (samples, and a grid of them beside the input)."""
    import math

    from .bundle import lora_shapes
    from .lora import lora_config

    c, p = imagic.components, imagic.preset
    total = 2**20 + (2 * images + 2) * c.native**2 * 3  # + metadata, run.json, thumbnail
    if bundle:
        if p.tune.mode == "lora":
            weights = sum(math.prod(s) for s in lora_shapes(c.unet, lora_config(p.tune)).values())
        else:
            weights = sum(t.numel() for t in c.unet.parameters())
        hidden = sum(int(e.config.hidden_size) for e in c.text_encoders)
        total += 2 * weights + 2 * 4 * hidden * 77
    return total


@contextlib.contextmanager
def _disk_full_says_need(need: int):
    """A full disk while writing outputs: say how much the run writes, and how much is free."""
    import shutil

    from .errors import DiskFull

    try:
        yield
    except DiskFull as exc:
        try:
            free = f", {shutil.disk_usage(exc.folder).free / 2**20:.1f} MB free now"
        except (OSError, TypeError):
            free = ""
        raise DiskFull(f"{exc.message}; this run writes up to {need / 2**20:.1f} MB there{free}", exc.folder) from None


def _auto_eta(value: str | None):
    """--auto-eta's value as settings (checked before any loading), or False without the flag."""
    if value is None:
        return False
    from .eta import AutoEtaSettings

    settings = AutoEtaSettings(judge=value)
    if value.startswith("clip:") and not Path(value[len("clip:"):]).expanduser().is_dir():
        raise InputError(f"--auto-eta {value}: no such folder; give a local CLIP model folder (CLIPModel)")
    return settings


def _finish_run(imagic, image, prompt: str, stem: str, out: Path, *, seed: int, resume: bool, thumbnail: bool,
                quiet: bool, json_out: bool, console, shown: int, auto=False) -> None:
    from .imagic import StopFlag
    from .outputs import fit_and_write
    from .progress import StageProgress

    with StopFlag().installed() as stop, StageProgress(console, enabled=not (quiet or json_out)) as bars:
        p = imagic.preset
        steps = {"A": p.embed.steps, "B": p.tune.steps, "C": p.sample.steps * len(p.sample.etas) * len(p.sample.seeds)}
        progress = RunClock(bars, console, steps, enabled=not (quiet or json_out),
                            on_gpu=imagic.components.device.type == "cuda")
        report, files = fit_and_write(imagic, image, prompt, stem, out, seed=seed, resume=resume,
                                      thumbnail=thumbnail, progress=progress, stop=stop,
                                      fitted=lambda: _print_notes(console, imagic.notes[shown:]), auto_eta=auto)
    _summary(report, files, json_out, quiet)


class RunClock:
    """Wraps the progress callback: after the first stage's first few steps, one line with about how long the rest
    of the run takes at the measured pace, and what makes it faster (a busy machine shows up in the pace)."""

    def __init__(self, progress, console, steps: dict[str, int], enabled: bool, on_gpu: bool,
                 clock=None) -> None:
        import time

        self.progress, self.console, self.steps, self.enabled, self.on_gpu = progress, console, steps, enabled, on_gpu
        self.clock = clock or time.perf_counter
        self.start: tuple[str, int, float] | None = None  # (stage, step, time) of the first event seen
        self.said = False

    def __call__(self, event: dict[str, Any]) -> None:
        self.progress(event)
        if self.said or not self.enabled:
            return
        now, stage, step = self.clock(), event["stage"], event["step"]
        if self.start is None or self.start[0] != stage:
            self.start = (stage, step, now)  # from the first step on: the first one also pays for warm-up
            return
        _, step0, t0 = self.start
        if step - step0 < 3 and now - t0 < 10:
            return
        per_step = (now - t0) / (step - step0)
        order = list(self.steps)
        left = sum(self.steps[s] for s in order[order.index(stage) + 1:]) + self.steps[stage] - step
        faster = "fewer --embed-steps/--tune-steps/--sample-steps, fewer --etas or --seeds"
        faster += ", a larger --vram preset" if self.on_gpu else ", a GPU (--vram N), an idle machine"
        self.console.print(f"[yellow]note:[/] about {_duration(per_step * left)} to go at {per_step:.2f} s a step "
                           f"(measured; {left} steps left, sampling steps counted alike); faster: {faster}")
        self.said = True


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _summary(report: dict[str, Any], files: list[Path], json_out: bool, quiet: bool = False) -> None:
    if json_out:
        click.echo(json.dumps(report, indent=2, default=str))
        return
    if quiet:  # no stage table: one line saying where the results are
        _console(stderr=False).print(f"output: {files[0].parent}")
        return
    from rich.table import Table

    table = Table(title="stages", show_edge=False, caption="* denoising loss at 8 fixed (timestep, noise) draws: "
                  "A, the prompt's embedding -> e_opt; B, the UNet before -> after tuning")
    for col in ("stage", "seconds", "steps", "peak memory", "loss before -> after*"):
        table.add_column(col)
    for r in report["stages"]:
        peak = r["peak"]
        memory = f"{peak['peak_bytes'] / 2**30:.2f} GiB {peak['label']}" if peak.get("peak_bytes") else ""
        loss = f"{r['loss_before']:.4f} -> {r['loss_after']:.4f}" if r.get("loss_after") is not None else ""
        table.add_row(r["stage"], f"{r['seconds']:.1f}", str(r["steps"]), memory, loss)
    console = _console(stderr=False)
    console.print(table)
    if "bundle_bytes" in report:
        console.print(f"bundle: {report['bundle']} ({report['bundle_bytes'] / 2**20:.2f} MiB)")
    grid = [f for f in files if "grid" in f.name]
    if grid:
        console.print(f"grid:   {grid[0]}")
    if "auto_eta" in report:
        choice = report["auto_eta"]
        chosen = [f.name for f in files if f"_eta{choice['eta']:.2f}_" in f.name]
        console.print(f"auto-eta: chose eta {choice['eta']:g} ({', '.join(chosen)}): {choice['reason']}; judge "
                      f"{choice['judge']}; alignment per eta: "
                      + ", ".join(f"{e} {s['alignment']:.4g}" for e, s in choice["scores"].items()), markup=False)
    console.print(f"output: {files[0].parent}")


@cli.command(epilog=EXIT_HELP)
@click.argument("bundle_path", metavar="BUNDLE", type=click.Path(path_type=Path))
@_common_sample_options
@AUTO_ETA
@click.option("--force", is_flag=True, help="Use the bundle even if it was made on a different base model.")
@click.pass_context
def edit(ctx: click.Context, bundle_path: Path, model: str | None, vram: str | None, preset: str | None,
         device: str | None, out: Path | None, overwrite: bool, quiet: bool, json_out: bool, etas: str | None,
         seeds: str | None, sample_steps: int | None, guidance: float | None, batch: int | None,
         auto_eta: str | None, force: bool) -> None:
    """Stage C only: new etas and seeds from a saved bundle, no input image, no training."""
    from dataclasses import replace

    from .bundle import check_compatible, load_bundle, stored_sample
    from .imagic import StopFlag
    from .outputs import edit_params, prepare_out_dir, write_run_json, write_samples
    from .progress import StageProgress

    auto = _auto_eta(auto_eta)
    bundle = load_bundle(bundle_path)
    stem = bundle_path.name.split(".imagic")[0] or "bundle"
    base = stored_sample(bundle.meta)
    flags = {"etas": _numbers(etas, "--etas"), "seeds": _numbers(seeds, "--seeds", int), "steps": sample_steps,
             "guidance": guidance, "batch": batch}
    sample = replace(base, **{k: v for k, v in flags.items() if v is not None})
    _quiet_libraries(ctx.obj["debug"])
    from .api import Imagic, check_settings

    check_settings(model or bundle.meta["base_model"], preset, vram, device, None, {})  # before the folder check
    out = prepare_out_dir(out or Path("imagic-out") / f"{stem}-edit", overwrite=overwrite)
    console = _console()
    imagic = Imagic.from_pretrained(model or bundle.meta["base_model"], preset, vram=vram, device=device,
                                    chatter=ctx.obj["debug"])
    warnings_ = check_compatible(bundle, imagic.components, force=force)
    _print_notes(console, imagic.notes + warnings_)
    with StopFlag().installed() as stop, StageProgress(console, enabled=not (quiet or json_out)) as progress:
        samples = imagic.generate(bundle, sample=sample, progress=progress, stop=stop, auto_eta=auto)
    prompt = bundle.meta.get("prompt", "")
    params = edit_params(imagic, prompt, bundle_path.name, sample)
    choice = imagic.eta_choice.to_dict() if imagic.eta_choice else None
    with _disk_full_says_need(_output_bytes(imagic, len(samples), bundle=False)):
        files = write_samples(out, stem, samples, params, title=prompt, input_image=bundle.thumbnail,
                              auto_eta=choice)
        report = {**imagic.report(), "prompt": prompt, "bundle": str(bundle_path),
                  "outputs": [str(f) for f in files]}
        report["preset"]["sample"] = sample.__dict__
        run_json = write_run_json(out, report)
    _summary(report, [*files, run_json], json_out, quiet)


# What a reader looks for first; anything else follows in name order.
INFO_ORDER = ("prompt", "base_model", "family", "prediction_type", "width", "height", "original_width",
              "original_height", "preset", "tune_mode", "seed", "created", "settings", "lora_config", "versions",
              "unet_fingerprint", "format", "format_version")


def _ordered_metadata(meta: dict[str, str]) -> dict[str, Any]:
    """Bundle metadata in INFO_ORDER, with the values stored as JSON text (settings, lora_config, versions, ...)
    decoded into objects."""
    def value(key: str, text: str) -> Any:
        if text[:1] in "{[" and "prompt" not in key:
            try:
                return json.loads(text)
            except ValueError:
                return text
        return text

    keys = [k for k in INFO_ORDER if k in meta] + sorted(k for k in meta if k not in INFO_ORDER)
    return {k: value(k, meta[k]) for k in keys}


def _flat(value: Any, prefix: str = "") -> str:
    """A decoded metadata value as `section.key = value` lines, whole (no cut)."""
    if isinstance(value, dict) and value:
        return "\n".join(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else f"{prefix}{k} = {_scalar(v)}"
                         for k, v in value.items())
    return _scalar(value)


def _scalar(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


@cli.command(epilog=EXIT_HELP)
@click.argument("bundle_path", metavar="BUNDLE", type=click.Path(path_type=Path))
@click.option("--json", "json_out", is_flag=True, help="Print as JSON.")
def info(bundle_path: Path, json_out: bool) -> None:
    """What is inside a bundle, and how big it is."""
    from .bundle import describe

    data = describe(bundle_path)
    data["metadata"] = _ordered_metadata(data["metadata"])
    if json_out:
        click.echo(json.dumps(data, indent=2, default=str))
        return
    from rich.table import Table

    console = _console(stderr=False)
    meta = Table(title=f"{bundle_path.name} — {data['file_bytes'] / 2**20:.2f} MiB", show_header=False)
    meta.add_column("key", style="bold")
    meta.add_column("value", overflow="fold")
    from rich.text import Text

    for key, value in data["metadata"].items():  # Text(): a stranger's prompt must not be read as rich markup
        meta.add_row(Text(key), Text(_flat(value)))
    console.print(meta)
    tensors = Table(title="tensors")
    for col in ("group", "count", "dtype", "shape (first)", "bytes"):
        tensors.add_column(col)
    for row in data["groups"]:
        tensors.add_row(Text(row["group"]), str(row["count"]), row["dtype"], str(row["shape"]), f"{row['bytes']:,}")
    console.print(tensors)
    console.print(f"[yellow]privacy:[/] {data['privacy']}")


@cli.command(epilog=EXIT_HELP)
@click.argument("bundle_path", metavar="BUNDLE", type=click.Path(path_type=Path))
@click.argument("outdir", type=click.Path(path_type=Path))
@click.option("--to", "to", type=click.Choice(["diffusers", "kohya"]), required=True, help="Target layout.")
@click.option("--overwrite", is_flag=True, help="Replace existing files in OUTDIR.")
def export(bundle_path: Path, outdir: Path, to: str, overwrite: bool) -> None:
    """Write the LoRA for diffusers or kohya/A1111/ComfyUI, and the embeddings as prompt_embeds."""
    import re

    from .bundle import export as export_bundle
    from .bundle import export_warnings, load_bundle

    name = re.sub(r"[^A-Za-z0-9._-]", "_", bundle_path.name.split(".imagic")[0]) or "imagic"
    bundle = load_bundle(bundle_path)
    files = export_bundle(bundle, to, outdir, name=name, overwrite=overwrite)
    for f in files:
        click.echo(str(f))
    for line in export_warnings(bundle, to):
        click.echo(f"warning: {line}", err=True)


@cli.command(epilog=EXIT_HELP)
@click.option("--model", default="arch:sd15", show_default=True, help="arch:sd15|arch:sd21|arch:sdxl or a model.")
@click.option("--presets", "preset_list", default="paper,24gb,12gb,8gb,6gb,4gb", show_default=True)
@click.option("--resolution", type=int, help="Pixels per side (default: the model's native resolution).")
@click.option("--steps", type=int, default=3, show_default=True, help="Timed steps per stage.")
@click.option("--warmup", type=int, default=1, show_default=True, help="Untimed steps first.")
@click.option("--cap-gb", type=float, help="Emulate a card of this many GB (CUDA only).")
@click.option("--device", help="Torch device (default: cuda if present).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("benchmarks/results"), show_default=True)
@click.option("--json", "json_out", is_flag=True, help="Print the result as JSON.")
@click.option("--simulate", is_flag=True, help="Peak GPU memory and FLOPs from the real stages on fake tensors "
              "(no GPU needed, nothing allocated); --steps, --warmup, --cap-gb and --device do not apply.")
@click.pass_context
def bench(ctx: click.Context, model: str, preset_list: str, resolution: int | None, steps: int, warmup: int,
          cap_gb: float | None, device: str | None, out: Path, json_out: bool, simulate: bool) -> None:
    """Measure peak memory and step time of stages A, B, C per preset, as ratios to the paper's way."""
    _quiet_libraries(ctx.obj["debug"])
    if simulate:
        _bench_simulated(model, preset_list, resolution, out, json_out)
        return
    from .bench import render_table, run_bench, write_results
    from .models import pick_device

    if steps < 1 or warmup < 0:
        raise InputError("--steps must be >= 1 and --warmup >= 0")
    names = [p.strip() for p in preset_list.split(",") if p.strip()]
    result = run_bench(model, names, resolution, steps, warmup, cap_gb, pick_device(device))
    path = write_results(result, out)
    if json_out:
        click.echo(json.dumps(result, indent=2, default=str))
    else:
        click.echo(render_table(result))
        click.echo(f"results: {path}")


def _simulating(ctx: click.Context, console, name: str, model: str) -> None:
    _quiet_libraries(ctx.obj["debug"])
    console.print(f"simulating preset {name} for {model} (first time for this architecture and size; cached after)")


def _bench_simulated(model: str, preset_list: str, resolution: int | None, out: Path, json_out: bool) -> None:
    from . import simulate, vram
    from .files import write_text_atomic

    names = [p.strip() for p in preset_list.split(",") if p.strip()]
    console = _console()
    path: list[Path] = []

    def said(event: dict) -> None:  # the results file grows preset by preset: a long run killed keeps what it did
        result = event["result"]
        path[:] = [vram.write_results(result, out)]
        write_text_atomic(path[0].with_suffix(".md"), vram.render_table(result))
        if not json_out:
            console.print(f"simulated {event['preset']}: {event['peak_allocated_bytes'] / 2**30:.2f} GiB at the peak "
                          f"(stage {event['peak_stage']}); {path[0]}")

    result = simulate.simulate_presets(model, names, resolution, command=" ".join(["imagic-lite", *sys.argv[1:]]),
                                       on_event=said)
    if json_out:
        click.echo(json.dumps(result, indent=2, default=str))
    else:
        click.echo(vram.render_table(result))
        click.echo(f"results: {path[0]}")


@cli.command(name="presets", epilog=EXIT_HELP)
@click.option("--model", default="arch:sd15", show_default=True, help="The model to size the presets for.")
@click.option("--resolution", type=int, help="Pixels per side (default: the model's native resolution).")
@click.option("--simulate", is_flag=True, help="Simulate the presets that have no simulation yet for this model "
              "and size (a minute or more each on a laptop CPU; cached afterwards).")
@click.option("--json", "json_out", is_flag=True, help="Print as JSON.")
@click.pass_context
def presets_command(ctx: click.Context, model: str, resolution: int | None, simulate: bool, json_out: bool) -> None:
    """The shipped presets, their knobs, and each one's simulated peak GPU memory for MODEL (what --vram uses)."""
    from .config import all_presets
    from .memory import measured_peaks
    from .vram import cached_entry, card_need, simulate_cached, whole_run

    console = _console()
    measured = measured_peaks(Path("benchmarks/results"), model)  # CUDA runs only: CPU peak RSS is not VRAM
    rows = []
    for p in sorted(all_presets(), key=lambda p: (p.vram_gb is None, p.vram_gb or 0, p.name)):
        if simulate:
            entry = simulate_cached(model, p, resolution, on_miss=lambda n: _simulating(ctx, console, n, model))
        else:
            entry = cached_entry(model, p, resolution)
        row = {"name": p.name, "vram_gb": p.vram_gb, "description": p.description, "memory": p.memory.__dict__,
               "tune": p.tune.mode, "optimizer": p.tune.optimizer, "measured_cuda": measured.get(p.name, {}),
               "simulated": None, "simulated_peak_bytes": None, "peak_stage": None, "card_need_bytes": None}
        if entry is not None:
            run = whole_run(entry)
            stages = {s: r["peak_allocated_bytes"] for s, r in entry["stages"].items()}
            row.update(side=entry["side"], simulated=stages, simulated_peak_bytes=run["peak_allocated_bytes"],
                       peak_stage=run["peak_stage"],
                       card_need_bytes=card_need(run["peak_allocated_bytes"]))
        rows.append(row)
    if json_out:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    from rich.table import Table

    side = next((r["side"] for r in rows if "side" in r), resolution)
    missing = [r["name"] for r in rows if r["simulated"] is None]
    table = Table(title=f"presets: simulated peak GPU memory, {model}" + (f" at {side} px" if side else ""),
                  caption="peak = the largest stage peak of a whole run, simulated on fake tensors "
                          "(`imagic-lite bench --simulate`); needs = peak x 1.15 + 0.5 GiB (allocator and CUDA "
                          "context, assumed). --vram picks the fastest preset whose need fits.")
    for col in ("name", "card", "weights", "storage", "ckpt", "optimizer", "peak", "stage", "needs", "measured"):
        table.add_column(col, no_wrap=True)
    for r in rows:
        meas = max(r["measured_cuda"].values()) if r["measured_cuda"] else None
        peak, need = r["simulated_peak_bytes"], r["card_need_bytes"]
        table.add_row(
            r["name"], f"{r['vram_gb']:g} GB" if r["vram_gb"] else "-", r["memory"]["weights"],
            r["memory"]["storage"], "yes" if r["memory"]["checkpointing"] else "no", r["optimizer"],
            f"{peak / 2**30:.2f} GiB" if peak else "-", r["peak_stage"] or "-",
            f"{need / 2**30:.1f} GiB" if need else "-", f"{meas / 2**30:.2f} GiB" if meas else "-",
        )
    _console(stderr=False).print(table)
    if missing:
        console.print(f"not simulated yet for this model and size: {', '.join(missing)} (add --simulate; --vram "
                      "simulates what it needs by itself)")


@cli.command(name="batch", epilog=EXIT_HELP + " In `batch`, 0 means every job is done or was already; 2 a bad "
             "jobs file (one line per bad row, nothing run); 8 some jobs failed (the last line counts them).")
@click.argument("jobs_file", metavar="JOBS", type=click.Path(path_type=Path))
@_common_sample_options
@_fit_options("a job's embed_steps column overrides", "a job's tune_steps column overrides",
              "Seed for stages A and B of every job.", "Leave the inputs' thumbnails out of the bundles.")
@AUTO_ETA
@click.pass_context
def batch_command(ctx: click.Context, jobs_file: Path, model: str | None, vram: str | None, preset: str | None,
                  device: str | None, out: Path | None, overwrite: bool, quiet: bool, json_out: bool,
                  etas: str | None, seeds: str | None, sample_steps: int | None, guidance: float | None,
                  batch: int | None, embed_steps: int | None, tune_steps: int | None, embed_lr: float | None,
                  tune_lr: float | None, rank: int | None, mode: str | None, config_file: Path | None, seed: int,
                  no_thumbnail: bool, auto_eta: str | None) -> None:
    """Run many (image, prompt) jobs from a CSV or JSON Lines file into --out DIR/<name>/, each as `run` would.

    JOBS has the columns image,prompt and optionally etas, seeds, preset, tune_steps, embed_steps, name. Under
    `accelerate launch --multi_gpu --num_processes N -m imagic_lite batch ...` the jobs are shared out by index. A
    rerun skips complete jobs and resumes interrupted ones; --overwrite redoes complete ones too."""
    from .batch import BatchSettings, process_state, read_jobs, run_batch
    from .errors import BatchFailed
    from .imagic import StopFlag
    from .models import DEFAULT_MODEL
    from .progress import BatchProgress

    state = process_state()
    try:
        if out is None:
            raise InputError("batch needs --out DIR (each job writes DIR/<name>/, plus DIR/summary.jsonl)")
        if seed < 0:
            raise InputError(f"--seed must be >= 0, got {seed}")
        settings = BatchSettings(
            model=model or DEFAULT_MODEL, preset=preset, vram=vram, device=device,
            config_file=str(config_file) if config_file else None, tune_lr=tune_lr, seed=seed,
            thumbnail=not no_thumbnail, overwrite=overwrite, auto_eta=_auto_eta(auto_eta), overrides=_overrides(
                embed_steps=embed_steps, embed_lr=embed_lr, tune_steps=tune_steps, rank=rank, mode=mode,
                sample_steps=sample_steps, guidance=guidance, etas=_numbers(etas, "--etas"),
                seeds=_numbers(seeds, "--seeds", int), batch=batch))
        jobs = read_jobs(jobs_file, settings)
        _quiet_libraries(ctx.obj["debug"])
        show = state.is_main_process and not (quiet or json_out)
        with StopFlag().installed() as stop, BatchProgress(_console(), enabled=show) as progress:
            lines = run_batch(jobs, out, settings, state=state, stop=stop, events=progress)
    except ImagicError as exc:
        if not state.is_main_process:  # the main process says it once
            sys.exit(exc.exit_code)
        raise
    if not state.is_main_process:
        return
    counts = {s: sum(line["status"] == s for line in lines) for s in ("done", "skipped", "failed")}
    if json_out:
        click.echo(json.dumps({"jobs": lines, **counts, "total": len(lines), "summary": str(out / "summary.jsonl")},
                              indent=2, default=str))
    else:
        for line in lines:
            if line["status"] == "failed":
                click.echo(f"failed: {line['name']} (exit {line['exit_code']}): {line['error']}")
    last = (f"{counts['failed']} of {len(lines)} jobs failed ({counts['done']} done, {counts['skipped']} skipped "
            f"as complete); see {out / 'summary.jsonl'}")
    if counts["failed"]:
        raise BatchFailed(last)
    click.echo(f"batch: {counts['done']} done, {counts['skipped']} skipped as complete, 0 failed of {len(lines)} "
               f"jobs; summary: {out / 'summary.jsonl'}", err=json_out)


@cli.command(epilog=EXIT_HELP)
@click.option("--port", type=click.IntRange(1, 65535), default=7860, show_default=True, help="Port to serve on.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 lets other machines on your network use the page (and your GPU).")
@click.option("--model", help="Model the page starts with: hub id, local diffusers folder, or `shapes`.")
@click.option("--vram", help="GB of GPU memory to plan for, or auto (the page can change it).")
@click.option("--device", help="Torch device, e.g. cuda:1 or cpu (default: cuda if present).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("imagic-out"), show_default=True,
              help="Folder for uploads and outputs (one subfolder per run).")
@click.option("--share", is_flag=True, help="Also open a public gradio.live link: anyone with it can use the page.")
@click.pass_context
def ui(ctx: click.Context, port: int, host: str, model: str | None, vram: str | None, device: str | None,
       out: Path, share: bool) -> None:
    """A local web page: drop a photo, type the edit, then slide eta (needs pip install 'imagic-lite[ui]')."""
    import time

    from .ui import UISettings, require_gradio, start

    require_gradio()
    from .models import DEFAULT_MODEL

    demo = start(UISettings(model=model or DEFAULT_MODEL, vram=vram, out=out, host=host, port=port, share=share,
                            device=device))
    _quiet_libraries(ctx.obj["debug"])  # after the page is up: importing diffusers takes seconds
    console = _console()
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning:[/] listening on {host}: other machines can reach the page and use this GPU")
    shown = "127.0.0.1" if host == "0.0.0.0" else f"[{host}]" if ":" in host else host  # IPv6 needs brackets
    console.print(f"imagic-lite ui: [bold]http://{shown}:{port}/[/]"
                  f"{f'  public: {demo.share_url}' if demo.share_url else ''}  files: {out}  (Ctrl-C to stop)")
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        demo.close()
        console.print("stopped")


def _sigterm_as_interrupt() -> None:
    """SIGTERM outside a training stage ends like Ctrl-C (exit 130); inside one, the stage's StopFlag takes over."""
    import signal
    import threading

    def handler(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> None:
    """Entry point: our errors become one line on stderr and a documented exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    _sigterm_as_interrupt()
    try:
        cli.main(args=args, prog_name="imagic-lite", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except ImagicError as exc:
        if debug:
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # the last resort: still one line unless --debug
        if debug:
            raise
        click.echo(f"error: internal error ({type(exc).__name__}: {exc}); rerun with --debug for a traceback",
                   err=True)
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
