"""What a newcomer meets in the first minutes (issue 21): quiet libraries, fixes that name real commands, checks in
the right order, resume guidance, aspect ratio, full disks."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from importlib.metadata import distribution
from pathlib import Path

import pytest

from imagic_lite.models import download_command


def test_missing_model_fix_names_a_download_command_the_installed_hub_has():
    command = download_command("nobody/no-such-model")
    scripts = {e.name for e in distribution("huggingface_hub").entry_points if e.group == "console_scripts"}
    assert command.split()[0] in scripts | {"python"}
    if command.startswith("hf "):  # it parses: offline, the dry run gets as far as the hub, not a usage error
        result = subprocess.run([*shlex.split(command), "--dry-run"], capture_output=True, text=True, timeout=60,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert "No such option" not in result.stderr and "Usage:" not in result.stderr, result.stderr
        assert result.returncode != 0  # nothing to download offline


@pytest.mark.parametrize("chatter", [False, True])
def test_loading_prints_nothing_unless_asked(tiny_sd, capfd, caplog, chatter):
    """The library never prints: no "Loading weights" bars, "kept in float32" notices or bitsandbytes' kernel
    warning (issue 21, item 1); `chatter=True` (the CLI's --debug) shows them."""
    import logging

    from imagic_lite.api import Imagic
    from imagic_lite.models import library_chatter

    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    Imagic.from_pretrained(str(tiny_sd), "cpu", chatter=chatter)
    with library_chatter(chatter):  # bitsandbytes warns at import on AVX512-BF16 CPUs; this CPU has none
        bnb.warning("Failed to load CPU gemm_4bit_forward (inside)")
    bnb.warning("Failed to load CPU gemm_4bit_forward (after)")
    printed = capfd.readouterr().err + caplog.text
    assert "(after)" in printed  # every setting restored afterwards
    if chatter:
        assert "(inside)" in printed and "Loading weights" in printed
    else:
        assert "(inside)" not in printed and "Loading weights" not in printed and "float32" not in printed


FAST = ["--embed-steps", "2", "--tune-steps", "2", "--sample-steps", "2", "--etas", "1.0", "--quiet"]


def invoke(capsys, *args) -> tuple[int, str]:
    code, err, _ = invoke_out(capsys, *args)
    return code, err


def invoke_out(capsys, *args) -> tuple[int, str, str]:
    from imagic_lite.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return exit_info.value.code, captured.err, captured.out


@pytest.mark.parametrize(("args", "code_", "fragment"), [
    (["--vram", "3"], 2, "below the smallest preset"),
    (["--preset", "huge"], 2, "unknown preset"),
    (["--etas", "9"], 2, "etas must be within"),
    ([], 7, "already has files"),
])
def test_settings_are_checked_before_the_output_folder(photo, tmp_path, capsys, tiny_sd, args, code_, fragment):
    out = tmp_path / "used"
    out.mkdir()
    (out / "run.json").write_text("{}")  # a folder a finished run left
    code, err = invoke(capsys, "run", photo, "a dog", "--model", tiny_sd, "--out", out, "--quiet", *args)
    assert code == code_ and fragment in err, err


def test_a_failed_check_leaves_no_empty_folder(photo, tmp_path, capsys):
    out = tmp_path / "new" / "deeper"
    code, err = invoke(capsys, "run", photo, "a dog", "--model", "nobody/no-such-model", "--out", out)
    assert code == 3 and "not on this machine" in err
    assert not (tmp_path / "new").exists()


def test_resume_guidance(photo, tmp_path, capsys, tiny_sd):
    """Each message leads to a command that works: --resume for a checkpoint, --overwrite past a foreign one, and
    --resume without a checkpoint is refused instead of silently starting over."""
    from imagic_lite.checkpoint import CHECKPOINT_NAME, save_checkpoint
    from imagic_lite.imagic import StageState

    run = ["run", photo, "a dog", "--model", tiny_sd, *FAST]
    code, err = invoke(capsys, *run, "--out", tmp_path / "none", "--resume")
    assert code == 2 and "no interrupted run" in err and "without --resume" in err, err
    assert not (tmp_path / "none").exists()

    out = tmp_path / "cut"
    save_checkpoint(out / CHECKPOINT_NAME, StageState("A", 1, {}, {}, {}), "another run", None)
    code, err = invoke(capsys, *run, "--out", out)
    assert code == 7 and "continue it with --resume" in err, err
    code, err = invoke(capsys, *run, "--out", out, "--resume")
    assert code == 2 and "different image" in err and "--overwrite instead of --resume" in err, err
    code, err, stdout = invoke_out(capsys, *run, "--out", out, "--overwrite")
    assert code == 0, err
    assert stdout.strip() == f"output: {out}"  # --quiet: no stage table
    assert not (out / CHECKPOINT_NAME).exists()
    code, err = invoke(capsys, *run, "--out", out, "--resume")
    assert code == 2 and "imagic-lite edit" in err, err
    code, err = invoke(capsys, "edit", out / "photo.imagic.safetensors", "--out", out, "--vram", "3")
    assert code == 2 and "below the smallest preset" in err, err  # edit, too, checks settings before the folder


def test_presets_needs_no_torch():
    """`presets` prints a table: it reads the simulations shipped for the architectures instead of running one."""
    code = ("import sys\nfrom imagic_lite.cli import main\ntry:\n    main(['presets'])\nexcept SystemExit as e:\n"
            "    assert e.code == 0, e.code\nassert 'torch' not in sys.modules, 'torch imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "4gb" in result.stdout and "GiB" in result.stdout


def test_info_orders_metadata_and_emits_objects(tmp_path, capsys, tiny_sd, photo):
    import json

    out = tmp_path / "o"
    assert invoke(capsys, "run", photo, "a dog", "--model", tiny_sd, "--out", out, *FAST)[0] == 0
    bundle = out / "photo.imagic.safetensors"
    code, err, stdout = invoke_out(capsys, "info", bundle, "--json")
    assert code == 0, err
    meta = json.loads(stdout)["metadata"]
    assert list(meta)[:3] == ["prompt", "base_model", "family"]
    assert meta["settings"]["tune"]["steps"] == 2 and isinstance(meta["versions"], dict)  # objects, not JSON text
    code, err, stdout = invoke_out(capsys, "info", bundle)
    assert code == 0 and "…" not in stdout and "tune.steps = 2" in stdout
    assert stdout.index("prompt") < stdout.index("settings") < stdout.index("format_version")


def test_run_help_shows_the_defaults(capsys):
    from imagic_lite.config import DEFAULT_MODEL, SampleSettings

    code, _, stdout = invoke_out(capsys, "run", "--help")
    flat = "".join(stdout.split())
    assert code == 0
    assert DEFAULT_MODEL in flat and "imagic-out/IMAGE-NAME" in flat
    assert ",".join(str(e) for e in SampleSettings().etas) in flat and "1.0,1.2,1.4,1.6" in flat


def test_full_disk_while_writing_outputs(photo, tmp_path, capsys, tiny_sd, monkeypatch):
    """ENOSPC while writing the images: exit 7, the folder named, how much the run writes, no half-file."""
    import errno

    from PIL import Image

    def full(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    out = tmp_path / "o"
    code, err = invoke(capsys, "run", photo, "a dog", "--model", tiny_sd, "--out", out, *FAST)
    line = err.strip().splitlines()[-1]
    assert code == 7 and str(out) in line and "is full" in line and "MB there" in line and "MB free" in line, err
    assert sorted(p.name for p in out.iterdir()) == ["photo.imagic.safetensors"]  # complete, and nothing else


def test_full_disk_inside_a_library_is_recognised(tmp_path):
    """safetensors reports ENOSPC as SafetensorError('... (os error 28)'), not OSError."""
    from safetensors import SafetensorError

    from imagic_lite.errors import DiskFull
    from imagic_lite.files import atomic_path

    with pytest.raises(DiskFull, match="is full"), atomic_path(tmp_path / "b.safetensors") as tmp:
        tmp.write_bytes(b"half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert list(tmp_path.iterdir()) == []


def test_diffusers_export_readme_names_the_real_base_model_and_its_etas(tmp_path):
    """Fast half of the check below, on a hand-made bundle: shapes loads via shapes_dir(), a local folder gets a
    PATH/TO placeholder (its path is not shared), a hub id stays; the eta hint and steps are the run's own."""
    import json
    from types import SimpleNamespace

    import torch

    from imagic_lite.bundle import _write_readme
    from imagic_lite.config import Preset, apply_overrides
    from imagic_lite.models import Cond

    settings = apply_overrides(Preset(), {"sample": {"etas": [1.0, 1.2, 1.4, 1.6], "steps": 15}}, "test").to_dict()
    for model, expected in [("shapes", "from_pretrained(shapes_dir())"),
                            ("/home/me/my-sd21", 'from_pretrained("PATH/TO/my-sd21")'),
                            ("owner/name", 'from_pretrained("owner/name")')]:
        meta = {"base_model": model, "settings": json.dumps(settings), "width": "64", "height": "64", "prompt": "p"}
        _write_readme(SimpleNamespace(meta=meta, e_opt=Cond(torch.zeros(1, 2, 3))), tmp_path / "README.md")
        readme = (tmp_path / "README.md").read_text()
        assert expected in readme and "/home/me" not in readme
        assert "eta 1-1.6" in readme and "num_inference_steps=15" in readme and "0.6" not in readme


@pytest.mark.slow
def test_diffusers_export_readme_code_runs_on_the_shipped_model(tmp_path):
    """The exported README's code loads the bundle's real base model (the shapes folder, wherever imagic-lite is
    installed) and produces an image; its eta hint is the model's own etas, not Stable Diffusion's."""
    import re

    from imagic_lite.api import Imagic
    from imagic_lite.bundle import export
    from imagic_lite.config import tomllib
    from imagic_lite.models import shapes_dir

    imagic = Imagic.from_pretrained("shapes", "cpu", overrides={"embed": {"steps": 0}, "tune": {"steps": 0}})
    bundle = imagic.fit(Path(__file__).parent.parent / "examples" / "red-circle.png", "a blue circle")
    export(bundle, "diffusers", tmp_path / "x", name="x")
    readme = (tmp_path / "x" / "README.md").read_text()
    etas = tomllib.loads((shapes_dir() / "imagic-lite.toml").read_text())["sample"]["etas"]
    assert f"eta {min(etas):g}-{max(etas):g}" in readme
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1).replace("THIS_FOLDER", str(tmp_path / "x"))
    namespace: dict = {}
    exec(code, namespace)  # noqa: S102 - the README's own code, as a reader would paste it
    assert namespace["image"].size == (64, 64)


def test_run_clock_says_how_long_the_rest_takes_and_how_to_go_faster():
    import io

    from rich.console import Console

    from imagic_lite.cli import RunClock

    seen, times = [], iter([10.0, 10.5, 11.0, 11.5, 12.0, 12.5])
    console = Console(file=io.StringIO(), width=400)
    clock = RunClock(seen.append, console, {"A": 100, "B": 150, "C": 60}, enabled=True, on_gpu=False,
                     clock=lambda: next(times))
    for step in range(1, 6):
        clock({"stage": "A", "step": step, "total": 100})
    assert len(seen) == 5  # every event still reaches the bars
    text = console.file.getvalue()
    assert text.count("note:") == 1 and "0.50 s a step" in text and "306 steps left" in text
    assert "about 3 min to go" in text and "--tune-steps" in text and "GPU" in text


def test_stage_losses_are_compared_at_fixed_draws(tiny_sd, photo):
    """Stage A and B report the loss at the same seeded (timestep, noise) draws before and after (A's after is B's
    before); fine-tuning on the one photo lowers it."""
    import math

    from imagic_lite.api import Imagic

    imagic = Imagic.from_pretrained(str(tiny_sd), "cpu", overrides={
        "embed": {"steps": 5}, "tune": {"steps": 30, "lora_lr": 1e-2}, "sample": {"steps": 1, "etas": [1.0]}})
    imagic.fit(photo, "a dog")
    stages = {r.stage: r for r in imagic.records}
    a, b = stages["A"], stages["B"]
    assert all(math.isfinite(x) for x in (a.loss_before, a.loss_after, b.loss_before, b.loss_after))
    assert a.loss_after == b.loss_before
    assert b.loss_after < b.loss_before


def test_readme_python_example_shows_progress_and_writes_into_a_folder(tiny_sd, tmp_path, monkeypatch, capsys):
    """The README's API example, as written but on the tiny model with few steps."""
    import re

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    code = re.search(r"```python\n(from pathlib import Path.*?)```", readme, re.S).group(1)
    fast = '{"embed": {"steps": 2}, "tune": {"steps": 2}, "sample": {"steps": 1, "etas": [1.0], "seeds": [0]}}'
    assert 'Imagic.from_pretrained("shapes", preset="cpu")' in code and '"examples/red-circle.png"' in code
    code = code.replace('Imagic.from_pretrained("shapes", preset="cpu")',
                        f'Imagic.from_pretrained({str(tiny_sd)!r}, preset="cpu", overrides={fast})')
    code = code.replace('"examples/red-circle.png"', repr(str(Path(__file__).parent.parent / "examples" /
                                                              "red-circle.png")))
    monkeypatch.chdir(tmp_path)
    exec(code, {"__name__": "readme"})  # noqa: S102
    printed = capsys.readouterr().out
    assert "stage A: 2/2" in printed and "stage C: 1/1" in printed
    names = sorted(p.name for p in (tmp_path / "imagic-out" / "api").iterdir())
    assert names == ["red-circle.imagic.safetensors", "red-circle_eta1.00_seed0.png"]


def test_non_square_photos_keep_their_aspect_ratio(tmp_path):
    """A 640x480 photo on the shapes model (64 px, sides in multiples of 32): centre-cropped to 480x480, not
    squashed; a circle stays round. The crop is said in a note and recorded for run.json."""
    from PIL import Image, ImageDraw

    from imagic_lite.images import fit_crop, prepare

    photo = Image.new("RGB", (640, 480), (128, 128, 128))
    ImageDraw.Draw(photo).ellipse((220, 140, 420, 340), fill=(220, 30, 30))  # a circle of 200 px in the middle
    assert fit_crop(640, 480, 64, 32) == ((64, 64), (80, 0, 560, 480))
    fitted = prepare(photo, 64, 32)
    red = [(x, y) for y in range(64) for x in range(64) if fitted.getpixel((x, y))[0] > 170]
    width = max(x for x, _ in red) - min(x for x, _ in red)
    height = max(y for _, y in red) - min(y for _, y in red)
    assert abs(width - height) <= 1  # squashed it was 20 x 26 px
    for size in [(4032, 3024), (3024, 4032), (1920, 1080), (500, 333)]:
        (w, h), box = fit_crop(*size, 512, 64)
        assert w % 64 == 0 and h % 64 == 0
        assert abs((box[2] - box[0]) / (box[3] - box[1]) - w / h) < 0.01  # the crop has the working aspect


def test_run_json_and_notes_say_how_the_photo_was_fitted(tiny_sd, photo):
    from imagic_lite.api import Imagic

    imagic = Imagic.from_pretrained(str(tiny_sd), "cpu", overrides={"embed": {"steps": 0}, "tune": {"steps": 0}})
    imagic.fit(photo, "a dog")
    fit = imagic.report()["input_fit"]
    assert fit["photo"] == [96, 72] and fit["working_size"] == [72, 56] and fit["mode"].startswith("centre crop")
    assert any("cut from the left and right" in n for n in imagic.notes)


def test_grid_shows_the_input_beside_the_edits(tmp_path):
    from types import SimpleNamespace

    from PIL import Image

    from imagic_lite.outputs import write_grid

    samples = [SimpleNamespace(eta=e, seed=0, image=Image.new("RGB", (64, 64), (30, 30, 220))) for e in (1.0, 1.2)]
    plain = Image.open(write_grid(tmp_path, "a", samples, {}, "t"))
    with_input = Image.open(write_grid(tmp_path, "b", samples, {}, "t", Image.new("RGB", (64, 64), (220, 30, 30))))
    assert with_input.width > plain.width
    colours = {c for _, c in with_input.convert("RGB").getcolors(1 << 20)}
    assert (220, 30, 30) in colours and (30, 30, 220) in colours
