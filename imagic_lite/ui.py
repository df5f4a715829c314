"""The local web page (`imagic-lite ui`): drop a photo, type the edit, train once, then slide eta to re-render.

The page drives the same `Imagic` API, progress events and output writers as the CLI; Gradio is imported only
when the page is built, so the other commands never pay for it.
"""

# No `from __future__ import annotations`: Gradio finds the `request: gr.Request` parameter by its evaluated hint.
import gc
import html
import re
import shutil
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError, ImagicError, InputError, Interrupted
from .progress import STAGE_NAMES, StageLog

INSTALL_HINT = "pip install 'imagic-lite[ui]'"
VRAM_CHOICES = ["auto", "4", "6", "8", "12", "24"]
BY_CARD = "by card size"
BUSY = "busy: another tab is training or rendering on this machine; try again when it finishes"
POLL_S = 0.2  # how often a running job's progress is sent to the page
CSS = """
#status .error { color: #b00020; font-weight: 600; }
#status .busy { color: #8a5a00; font-weight: 600; }
#status .note { color: #555; }
#stages table { width: 100%; font-variant-numeric: tabular-nums; }
#stages td:nth-child(2) { width: 35%; }
#stages progress { width: 100%; }
#current img { width: 100%; height: 100%; object-fit: contain; }
#current img, #gallery img, #preview img { image-rendering: pixelated; }  /* a 64 px result stays crisp */
"""


def require_gradio():
    """Gradio, or our one-line error naming the install command (it is an optional extra)."""
    try:
        import gradio
    except ImportError:
        raise ConfigError(f"the web UI needs Gradio, which is not installed: {INSTALL_HINT}") from None
    return gradio


@dataclass(frozen=True)
class UISettings:
    """What `imagic-lite ui` was started with; the page's boxes start from these."""

    model: str
    vram: str | None = None
    out: Path = Path("imagic-out")
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    device: str | None = None


@dataclass(eq=False)  # identity equality: Gradio compares state values, and tensors have no truth value
class Session:
    """One tab's current edit: the bundle stage C renders from, and the files written for it (held in gr.State)."""

    bundle: Any
    out: Path
    stem: str
    prompt: str
    params: dict[str, Any]  # PNG parameters as the CLI writes them (outputs.run_params / edit_params)
    sample: Any  # SampleSettings the bundle was made (or stored) with
    spec: tuple[str, str | None, str | None]  # (model, preset, vram) of the model that renders it
    files: list[Path] = field(default_factory=list)  # downloads besides the images: bundle, exports, grid
    samples: list[Any] = field(default_factory=list)  # (Sample, path) rendered so far
    notes: list[str] = field(default_factory=list)


class Workbench:
    """What every tab shares: the one loaded model and the lock that lets one job (train, open, render) run.

    Gradio's queue lets a few events in at once only so that a second tab is told "busy" at once instead of
    waiting unseen; the lock is the one-at-a-time rule."""

    def __init__(self, settings: UISettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._imagic = None
        self._spec: tuple | None = None
        self._pure = True  # base weights untouched (LoRA adapters are swapped; a full fine-tune is not)
        self._last_bundle: Any = None
        self.owner: str | None = None  # the tab whose job is running
        self.stop = None  # that job's StopFlag

    def begin(self, owner: str):
        """The new job's StopFlag, or None when another job holds the machine."""
        from .imagic import StopFlag

        if not self._lock.acquire(blocking=False):
            return None
        self.owner, self.stop = owner, StopFlag()
        return self.stop

    def end(self) -> None:
        self.owner = self.stop = None
        self._lock.release()

    def request_stop(self, owner: str) -> bool:
        """Stop the running job if `owner` started it: the stages check the flag between steps."""
        stop = self.stop
        if stop is None or self.owner != owner:
            return False
        stop.set()
        return True

    def _load(self, spec: tuple, *, fresh: bool, overrides: dict[str, Any] | None = None,
              tune_lr: float | None = None, reuse: Any = None):
        """The model for `spec`. Training gets a fresh one (it changes the UNet); rendering reuses the loaded one
        when its base weights are untouched or it already holds the bundle `reuse`."""
        if fresh or self._imagic is None or spec != self._spec or not (self._pure or reuse is self._last_bundle):
            self._imagic = self._last_bundle = None  # let the old weights go before the new ones load
            gc.collect()
            _empty_cuda_cache()
            from .api import Imagic

            model, preset, vram = spec
            self._imagic = Imagic.from_pretrained(model, preset, vram=vram, device=self.settings.device,
                                                  overrides=overrides, tune_lr=tune_lr)
            self._spec, self._pure = spec, True
        return self._imagic

    def _applied(self, bundle: Any) -> None:
        self._last_bundle = bundle
        self._pure = self._pure and bundle.mode == "lora"

    def train(self, image: Any, source: Path, prompt: str, spec: tuple, overrides: dict[str, Any],
              tune_lr: float | None, seed: int, log: StageLog, stop: Any) -> Session:
        """What `run` does (outputs.fit_and_write: stages A, B, the bundle, stage C, PNGs, run.json) in a new
        folder beside the uploaded photo, plus the kohya and diffusers exports."""
        from PIL import Image

        from .bundle import load_bundle
        from .images import read_png_params
        from .imagic import Sample
        from .outputs import fit_and_write, run_params

        imagic = self._load(spec, fresh=True, overrides=overrides, tune_lr=tune_lr)
        stem = safe_stem(source.name)
        out = fresh_dir(self.settings.out, stem)
        shutil.copyfile(source, out / f"input{source.suffix.lower()}")  # the upload, beside what it became
        self._pure = imagic.preset.tune.mode == "lora"
        _, files = fit_and_write(imagic, image, prompt, stem, out, seed=seed, resume=False, thumbnail=True,
                                 progress=log, stop=stop)
        bundle_path, *pngs, grid, run_json = files
        session = Session(load_bundle(bundle_path), out, stem, prompt, run_params(imagic, prompt, seed),
                          imagic.preset.sample, spec, files=[bundle_path, grid, run_json], notes=list(imagic.notes))
        for png in pngs:
            params = read_png_params(png)
            with Image.open(png) as im:
                session.samples.append((Sample(params["eta"], params["seed"], im.convert("RGB")), png))
        session.files[1:1] = _exports(session.bundle, out, stem, session.notes)
        return session

    def open(self, path: Path, name: str, preset: str | None, vram: str | None, log: StageLog,
             stop: Any) -> Session:
        """A saved bundle, checked against its base model like `edit` does, then stage C at its stored etas."""
        from .bundle import check_compatible, load_bundle, stored_sample
        from .outputs import edit_params

        bundle = load_bundle(path)
        spec = (bundle.meta["base_model"], preset, vram)
        imagic = self._load(spec, fresh=False)
        check_compatible(bundle, imagic.components)
        stem = safe_stem(name.split(".imagic")[0])
        out = fresh_dir(self.settings.out, f"{stem}-edit")
        copy = out / f"{stem}.imagic.safetensors"
        shutil.copyfile(path, copy)
        prompt = bundle.meta.get("prompt", "")
        sample = stored_sample(bundle.meta)
        session = Session(bundle, out, stem, prompt, edit_params(imagic, prompt, copy.name, sample), sample, spec,
                          files=[copy], notes=list(imagic.notes))
        session.files += _exports(bundle, out, stem, session.notes)
        samples = imagic.generate(bundle, sample=sample, progress=log, stop=stop)  # as `edit` draws them
        self._applied(bundle)
        self._record(session, samples)
        return session

    def render(self, session: Session, eta: float, seed: int, steps: int | None, guidance: float | None,
               log: StageLog, stop: Any) -> None:
        """Stage C only, from the session's bundle: one image at (eta, seed)."""
        imagic = self._load(session.spec, fresh=False, reuse=session.bundle)
        changes = {"etas": (eta,), "seeds": (seed,), "batch": 1}
        changes |= {k: v for k, v in (("steps", steps), ("guidance", guidance)) if v is not None}
        sample = replace(session.sample, **changes)
        samples = imagic.generate(session.bundle, sample=sample, progress=log, stop=stop)
        self._applied(session.bundle)
        self._record(session, samples, {"sample_steps": sample.steps, "guidance": sample.guidance})

    def auto(self, session: Session, seed: int, steps: int | None, guidance: float | None, log: StageLog,
             stop: Any) -> Any:
        """`--auto-eta` on the session's bundle: stage C at the bundle's etas for `seed`, eta 0 and the judge. Every
        image is written as `run --auto-eta` writes it (the choice and scores in its text), the chosen one last, so
        the page shows it and moves the slider there; returns the EtaChoice."""
        imagic = self._load(session.spec, fresh=False, reuse=session.bundle)
        changes = {"seeds": (seed,)} | {k: v for k, v in (("steps", steps), ("guidance", guidance)) if v is not None}
        sample = replace(session.sample, **changes)
        samples = imagic.generate(session.bundle, sample=sample, progress=log, stop=stop, auto_eta=True)
        self._applied(session.bundle)
        from .outputs import auto_eta_params

        choice = imagic.eta_choice
        changed = {"sample_steps": sample.steps, "guidance": sample.guidance, **auto_eta_params(choice.to_dict())}
        self._record(session, samples, changed, chosen=choice.eta)
        session.notes.append(f"auto-eta chose eta {choice.eta:g}: {choice.reason}")
        return choice

    def _record(self, session: Session, samples: list, changed: dict[str, Any] | None = None,
                chosen: float | None = None) -> None:
        """Write each image with its parameters and the grid of everything so far, replacing a re-render."""
        from .outputs import write_grid, write_sample

        params = {**session.params, **(changed or {})}
        for s in samples:
            path = write_sample(session.out, session.stem, s, params, marked=chosen is not None)
            session.samples = [(o, p) for o, p in session.samples if (o.eta, o.seed) != (s.eta, s.seed)]
            session.samples.append((s, path))
        session.samples.sort(key=lambda sp: (sp[0].seed, sp[0].eta))
        grid = write_grid(session.out, session.stem, [s for s, _ in session.samples], session.params,
                          title=session.prompt, input_image=session.bundle.thumbnail, chosen=chosen)  # as run/edit
        if grid not in session.files:
            session.files.append(grid)


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _exports(bundle: Any, out: Path, stem: str, notes: list[str]) -> list[Path]:
    """The kohya and diffusers LoRA files, written up front: they are small and a click away on the page."""
    from .bundle import export
    from .errors import BundleError

    try:
        return [*export(bundle, "kohya", out / "kohya", name=stem), *export(bundle, "diffusers", out / "diffusers")]
    except BundleError as exc:  # a full fine-tune has no LoRA to export
        notes.append(f"no exports: {exc}")
        return []


def safe_stem(name: str) -> str:
    """A file-name stem that every tool accepts (the kohya export's name rule), from a user's file name."""
    stem = Path(name).stem if "." in name else name
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem)[:60].strip("_") or "image"


def fresh_dir(root: Path, name: str) -> Path:
    """root/name, or root/name-2, -3, ...: the page never writes into a folder an earlier run filled."""
    from .outputs import prepare_out_dir

    for n in range(1, 10_000):
        candidate = root / (name if n == 1 else f"{name}-{n}")
        if not candidate.exists() or not any(candidate.iterdir()):
            prepare_out_dir(candidate, overwrite=False)
            candidate.mkdir(parents=True, exist_ok=True)  # the page fills it at once: the upload goes in first
            return candidate
    raise InputError(f"{root} holds 9999 folders named {name}-N; choose another --out")


ADVANCED = {  # box id: (label, section, key, type); an empty box keeps the preset's (or model's) value
    "embed_steps": ("Stage A steps", "embed", "steps", int),
    "tune_steps": ("Stage B steps", "tune", "steps", int),
    "sample_steps": ("Stage C steps", "sample", "steps", int),
    "embed_lr": ("Stage A learning rate", "embed", "lr", float),
    "tune_lr": ("Stage B learning rate", "tune", "lr", float),  # lora_lr or full_lr: see page_overrides
    "rank": ("LoRA rank", "tune", "rank", int),
    "guidance": ("Guidance", "sample", "guidance", float),
}


def page_overrides(values: dict[str, str | None]) -> tuple[dict[str, dict[str, Any]], float | None]:
    """The advanced boxes as a TOML-shaped table, checked now by the same code that checks preset files, and the
    stage B rate apart: like --tune-lr it sets the rate of whichever tune mode the settings end up with."""
    from .config import Preset, apply_overrides

    table: dict[str, dict[str, Any]] = {}
    for box, text in values.items():
        label, section, key, kind = ADVANCED[box]
        if text is None or not str(text).strip():
            continue
        try:
            table.setdefault(section, {})[key] = kind(str(text).strip())
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise InputError(f"{label} takes {what}, got {text!r}") from None
    tune_lr = table.get("tune", {}).pop("lr", None)
    checked = {**table, "tune": {**table.get("tune", {}), **({"lora_lr": tune_lr} if tune_lr else {})}}
    apply_overrides(Preset(), checked, "advanced settings")
    return {k: v for k, v in table.items() if v}, tune_lr


def one_line(exc: BaseException, uploads: dict[str, str]) -> str:
    """An error as the CLI prints it, with Gradio's temporary upload paths shown as the user's file names."""
    if isinstance(exc, ImagicError):
        text = str(exc)
    else:  # the CLI's last resort, also one line; the traceback goes to the server's terminal
        traceback.print_exception(exc)
        text = f"internal error ({type(exc).__name__}: {exc}); the server's terminal has the traceback"
    for tmp, name in uploads.items():
        text = text.replace(tmp, name)
    return "error: " + " ".join(text.split())


def status_html(text: str, kind: str = "ok", notes: list[str] | tuple[str, ...] = ()) -> str:
    lines = [f'<div class="{kind}">{html.escape(text)}</div>']
    lines += [f'<div class="note">note: {html.escape(n)}</div>' for n in notes]
    return "\n".join(lines)


def stages_html(log: StageLog) -> str:
    """The CLI's bars as a table: the same StageLog events (step/total, loss, it/s, memory) per stage."""
    rows = []
    for line in sorted(log.lines.values(), key=lambda line: line.stage):
        loss = f"loss {line.loss:.4f}" if line.loss is not None else ""
        rate = f"{line.rate:.1f} it/s" if line.rate else ""
        rows.append(
            f'<tr data-stage="{line.stage}"><td>{html.escape(STAGE_NAMES.get(line.stage, line.stage))}</td>'
            f'<td><progress value="{line.step}" max="{line.total}"></progress></td>'
            f"<td>{line.step}/{line.total}</td><td>{loss}</td><td>{rate}</td><td>{html.escape(line.memory)}</td></tr>")
    return f"<table>{''.join(rows)}</table>" if rows else ""


def stage_c_inputs(session: Session | None, seed: float | None, steps: str | None, guidance: str | None) -> dict:
    """The page's stage C inputs checked (an edit to render from, a seed >= 0, the advanced boxes as preset files
    are): the sample settings they change."""
    if session is None:
        raise InputError("run an edit or open a bundle first")
    if seed is None or seed < 0:
        raise InputError(f"the seed must be >= 0, got {seed}")
    return page_overrides({"sample_steps": steps, "guidance": guidance})[0].get("sample", {})


def _choices(preset_name: str | None, card: str | None) -> tuple[str | None, str | None]:
    """The preset and card-size boxes as `Imagic.from_pretrained`'s preset and vram."""
    return (None if preset_name in (None, "", BY_CARD) else preset_name,
            None if card in (None, "", "auto") else str(card))


def _stream(job: Callable[[], Any], log: StageLog, stop: Any, show: Callable[[str], Any]) -> Iterator[Any]:
    """Run `job` in a thread, yielding `show(stage table)` whenever the log changes; returns the job's result.

    If the page goes away mid-job (the generator is closed), the job is stopped between steps first."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = job()
        except BaseException as exc:  # handed to the page's handler, which shows it in one line
            result["error"] = exc

    thread = threading.Thread(target=target, name="imagic-lite-ui-job", daemon=True)
    thread.start()
    seen = -1
    try:
        while thread.is_alive():
            thread.join(POLL_S)
            if log.version != seen:
                seen = log.version
                yield show(stages_html(log))
    finally:
        if thread.is_alive():
            stop.set()
            thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def build_app(bench: Workbench):
    """The page. Every handler catches our errors and shows them in the status line, never as a traceback."""
    gr = require_gradio()
    from .config import preset_names

    s = bench.settings
    with gr.Blocks(title="imagic-lite", analytics_enabled=False) as demo:
        state = gr.State(None)
        gr.Markdown("## imagic-lite: edit a photo from one sentence\nDrop a photo, describe the edited image, "
                    "Run (stages A and B train once), then slide eta: each position re-renders from the saved "
                    f"bundle (stage C only). Files are written under `{html.escape(str(s.out))}`.")
        with gr.Row():
            with gr.Column(scale=1):
                photo = gr.File(label="Photo (drop it here)", elem_id="photo", type="filepath")
                preview = gr.Image(label="As the model will see it", type="pil", interactive=False, height=220,
                                   elem_id="preview")
                prompt = gr.Textbox(label="Edit: describe the edited image", placeholder="a dog lying down",
                                    elem_id="prompt")
                model = gr.Textbox(label="Model", value=s.model, info="shapes, a hub id, or a diffusers folder",
                                   elem_id="model")
                with gr.Row():
                    vram = gr.Dropdown(VRAM_CHOICES, value=s.vram or "auto", label="Card size (GB)",
                                       allow_custom_value=True, elem_id="vram")
                    preset = gr.Dropdown([BY_CARD, *preset_names()], value=BY_CARD, label="Preset",
                                         elem_id="preset")
                with gr.Accordion("Advanced settings (empty = the preset's value)", open=False, elem_id="advanced"):
                    boxes = {box: gr.Textbox(label=label, placeholder="preset", elem_id=box, min_width=120)
                             for box, (label, *_) in ADVANCED.items()}
                    fit_seed = gr.Number(label="Seed for stages A and B", value=0, precision=0, elem_id="fit_seed")
                with gr.Row():
                    run = gr.Button("Run", variant="primary", elem_id="run")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                bundle_in = gr.File(label="Or open a bundle (.imagic.safetensors) to re-edit", elem_id="bundle_in",
                                    type="filepath")
            with gr.Column(scale=1):
                status = gr.HTML(status_html("drop a photo to start"), elem_id="status")
                stages = gr.HTML("", elem_id="stages")
                with gr.Row():
                    eta = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="eta (0 = the photo, 1 = the prompt)",
                                    interactive=False, elem_id="eta", scale=3)
                    seed = gr.Number(label="Seed", value=0, precision=0, interactive=False, elem_id="seed", scale=1)
                with gr.Row():
                    render = gr.Button("Render", interactive=False, elem_id="render")
                    pick = gr.Button("Pick eta for me", interactive=False, elem_id="auto_eta")
                current = gr.Image(label="Result", type="filepath", interactive=False, elem_id="current",
                                   height=320)
                gallery = gr.Gallery(label="Etas so far", columns=6, height=190, elem_id="gallery")
                downloads = gr.File(label="Downloads", file_count="multiple", interactive=False,
                                    elem_id="downloads")

        def shown(session: Session, text: str, kind: str = "ok", focus: tuple[float, int] | None = None) -> dict:
            """Everything a finished job changes; the image shown is `focus` (eta, seed) or the latest written."""
            latest = next((sp for sp in session.samples if (sp[0].eta, sp[0].seed) == focus), None) if focus else \
                max(session.samples, key=lambda sp: sp[1].stat().st_mtime_ns, default=None)
            return {
                state: session, status: status_html(text, kind, session.notes),
                eta: gr.update(interactive=True, value=latest[0].eta if latest else session.sample.etas[0]),
                seed: gr.update(interactive=True, value=latest[0].seed if latest else session.sample.seeds[0]),
                render: gr.update(interactive=True), pick: gr.update(interactive=True),
                run: gr.update(interactive=True),
                current: str(latest[1]) if latest else None,
                gallery: [(str(p), f"eta {o.eta:g} · seed {o.seed}") for o, p in session.samples],
                downloads: [str(p) for p in [*session.files, *(p for _, p in session.samples)]],
            }

        def failed(exc: BaseException, uploads: dict[str, str]) -> str:
            if isinstance(exc, Interrupted):  # the user's own Stop: not an error, and the page stays usable
                text = str(exc).split(";")[0] if "--resume" in str(exc) else str(exc)  # no CLI-only advice
                return status_html(f"{text}; the page is ready again")
            return status_html(one_line(exc, uploads), "error")

        def on_photo(path: str | None):
            from .images import load_image  # here, not above: torch need not load before the page is served

            if not path:
                return None, status_html("drop a photo to start")
            try:
                loaded = load_image(path)
            except ImagicError as exc:
                return None, status_html(one_line(exc, {path: Path(path).name}), "error")
            w, h = loaded.image.size
            return loaded.image, status_html(f"photo {Path(path).name}: {w}x{h}; type the edit and press Run",
                                             notes=loaded.notes)

        def exclusive(request: gr.Request, starting: dict, job: Callable[[StageLog, Any], Any],
                      done: Callable[[Any], dict], uploads: dict[str, str], always: dict | None = None):
            """Run one job while holding the machine, streaming its stage table; "busy" if another tab holds it."""
            always = always or {}
            stop_flag = bench.begin(request.session_hash)
            if stop_flag is None:
                yield {status: status_html(BUSY, "busy"), **always}
                return
            try:
                log = StageLog()
                yield {**starting, stages: ""}
                result = yield from _stream(lambda: job(log, stop_flag), log, stop_flag, lambda t: {stages: t})
                yield {**done(result), **always}
            except Exception as exc:  # noqa: BLE001 - every failure becomes the status line
                yield {status: failed(exc, uploads), run: gr.update(interactive=True), **always}
            finally:
                bench.end()

        def on_run(session, path, text, model_id, card, preset_name, seed_fit, a_steps, b_steps, c_steps, a_lr, b_lr,
                   r, cfg, request: gr.Request):  # the advanced boxes in ADVANCED's order
            uploads = {path: Path(path).name} if path else {}
            try:
                if not path:
                    raise InputError("drop a photo first")
                if not (text or "").strip():
                    raise InputError('the prompt is empty; describe the edited image, e.g. "a dog lying down"')
                if seed_fit is None or seed_fit < 0:
                    raise InputError(f"the seed for stages A and B must be >= 0, got {seed_fit}")
                from .images import load_image

                loaded = load_image(path)
                overrides, tune_lr = page_overrides(dict(zip(ADVANCED, (a_steps, b_steps, c_steps, a_lr, b_lr, r, cfg),
                                                             strict=True)))
            except (ImagicError, ValueError) as exc:
                yield {status: status_html(one_line(exc, uploads), "error")}
                return
            spec = ((model_id or "").strip() or s.model, *_choices(preset_name, card))

            def done(result: Session) -> dict:
                result.notes[:0] = loaded.notes
                return shown(result, f"done: files in {result.out}")

            yield from exclusive(
                request, {status: status_html(f"loading {spec[0]} and training (stages A and B)…"),
                          run: gr.update(interactive=False), render: gr.update(interactive=False),
                          pick: gr.update(interactive=False)},
                lambda log, stop_flag: bench.train(loaded.image, Path(path), text.strip(), spec, overrides, tune_lr,
                                                   int(seed_fit), log, stop_flag),
                done, uploads, {render: gr.update(interactive=session is not None),
                                pick: gr.update(interactive=session is not None)})

        def on_open(path, preset_name, card, request: gr.Request):
            """Open an uploaded bundle; the drop zone empties again either way, ready for the next one."""
            if not path:
                return
            name = Path(path).name
            yield from exclusive(
                request, {status: status_html(f"opening {name}…")},
                lambda log, stop_flag: bench.open(Path(path), name, *_choices(preset_name, card), log, stop_flag),
                lambda result: shown(result, f"opened {name}: slide eta to re-render; files in {result.out}"),
                {path: name}, {bundle_in: None})

        def on_render(session, eta_value, seed_value, c_steps, cfg, request: gr.Request):
            try:
                sample = stage_c_inputs(session, seed_value, c_steps, cfg)
            except ImagicError as exc:
                yield {status: status_html(one_line(exc, {}), "error")}
                return
            eta_value, seed_value = float(eta_value), int(seed_value)
            yield from exclusive(
                request, {status: status_html(f"rendering eta {eta_value:g}, seed {seed_value}…")},
                lambda log, stop_flag: bench.render(session, eta_value, seed_value, sample.get("steps"),
                                                    sample.get("guidance"), log, stop_flag),
                lambda _: shown(session, f"eta {eta_value:g}, seed {seed_value}: files in {session.out}"), {})

        def on_auto(session, seed_value, c_steps, cfg, request: gr.Request):
            """Auto-eta, as `--auto-eta` on the CLI: the bundle's etas at this seed, judged; the slider goes there."""
            try:
                sample = stage_c_inputs(session, seed_value, c_steps, cfg)
            except ImagicError as exc:
                yield {status: status_html(one_line(exc, {}), "error")}
                return
            seed_value = int(seed_value)
            etas = ", ".join(f"{e:g}" for e in session.sample.etas)
            yield from exclusive(
                request, {status: status_html(f"rendering etas {etas} and 0 at seed {seed_value}, then judging…")},
                lambda log, stop_flag: bench.auto(session, seed_value, sample.get("steps"), sample.get("guidance"),
                                                  log, stop_flag),
                lambda choice: shown(session, f"auto-eta chose eta {choice.eta:g} (why: see the notes); files in "
                                              f"{session.out}", focus=(choice.eta, seed_value)), {})

        def on_stop(request: gr.Request):
            if bench.request_stop(request.session_hash):
                return status_html("stopping after the current step…", "busy")
            return status_html("nothing of yours is running")

        everything = {state, status, stages, eta, seed, render, pick, run, current, gallery, downloads}
        work = {"concurrency_id": "work", "concurrency_limit": 4}  # the lock admits one; the rest hear "busy"
        photo.change(on_photo, photo, [preview, status])
        run.click(on_run, [state, photo, prompt, model, vram, preset, fit_seed, *boxes.values()], everything, **work)
        bundle_in.upload(on_open, [bundle_in, preset, vram], everything | {bundle_in}, **work)
        for event in (eta.release, render.click, seed.submit):
            event(on_render, [state, eta, seed, boxes["sample_steps"], boxes["guidance"]], everything, **work)
        pick.click(on_auto, [state, seed, boxes["sample_steps"], boxes["guidance"]], everything, **work)
        stop.click(on_stop, None, status, queue=False)
    return demo


def start(settings: UISettings):
    """Build the page and start serving it without blocking; returns the Gradio app (`.local_url`,
    `.share_url`, `.block_thread()`, `.close()`)."""
    require_gradio()
    settings.out.mkdir(parents=True, exist_ok=True)
    demo = build_app(Workbench(settings))
    demo.queue(default_concurrency_limit=1)
    try:
        demo.launch(server_name=settings.host, server_port=settings.port, share=settings.share,
                    prevent_thread_lock=True, quiet=True, show_error=False, ssr_mode=False, css=CSS,
                    allowed_paths=[str(settings.out.resolve())], footer_links=[])
    except OSError as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        why = "the port is in use" if why.startswith("Cannot find empty port") else why  # Gradio's words
        raise InputError(f"cannot listen on {settings.host}:{settings.port}: {why}; pass a free --port") from None
    return demo
