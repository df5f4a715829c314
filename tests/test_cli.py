"""The CLI contract: each command end to end on a tiny model; each user-caused failure as one line + exit code."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from imagic_lite.cli import main
from imagic_lite.images import read_png_params

FAST = ["--embed-steps", "3", "--tune-steps", "3", "--sample-steps", "2", "--quiet"]
EXE = [sys.executable, "-m", "imagic_lite.cli"]


def invoke(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, expected_code: int, *fragments: str) -> None:
    assert code == expected_code, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def first_run(tiny_models, tmp_path_factory):
    """One real run shared by the read-only tests: (output folder, model folder, photo)."""
    from PIL import ImageDraw

    root = tmp_path_factory.mktemp("run")
    photo = root / "cat photo.png"
    image = Image.new("RGB", (96, 72), (128, 128, 128))
    ImageDraw.Draw(image).ellipse((24, 12, 72, 60), fill=(220, 30, 30))
    image.save(photo)
    out = root / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(photo), "a dog lying down", "--model", str(tiny_models["sd"]), "--out", str(out),
              "--etas", "0.5,1.0", "--seeds", "0,1", *FAST])
    assert exit_info.value.code == 0
    return out, tiny_models["sd"], photo


def test_help_is_fast_and_lists_the_contract():
    start = time.perf_counter()
    result = subprocess.run([*EXE, "--help"], capture_output=True, text=True, check=True)
    assert time.perf_counter() - start < 5  # no torch import for --help
    for command in ("run", "edit", "info", "export", "bench", "presets"):
        assert command in result.stdout
    run_help = subprocess.run([*EXE, "run", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--model", "--vram", "--preset", "--out", "--etas", "--seeds", "--embed-steps", "--tune-steps",
                 "--sample-steps", "--quiet", "--json", "--resume", "--overwrite"):
        assert flag in run_help


def test_run_writes_every_output(first_run):
    out, _, _ = first_run
    names = sorted(p.name for p in out.iterdir())
    pngs = [n for n in names if n.endswith(".png") and "grid" not in n]
    assert len(pngs) == 4  # 2 etas x 2 seeds
    assert any("grid" in n for n in names)
    assert "cat photo.imagic.safetensors" in names and "run.json" in names
    assert not [n for n in names if n.endswith(".tmp") or "resume" in n]
    params = read_png_params(out / "cat photo_eta0.50_seed1.png")
    assert params["eta"] == 0.5 and params["seed"] == 1 and params["prompt"] == "a dog lying down"
    with Image.open(out / "cat photo_eta0.50_seed1.png") as im:
        assert im.size == (72, 56)  # aspect kept: 96x72 scaled to ~64x64 area, sides multiples of 8
    report = json.loads((out / "run.json").read_text())
    stages = {s["stage"]: s for s in report["stages"]}
    assert {"encode", "A", "B", "C"} <= set(stages)
    for name in ("A", "B", "C"):
        assert stages[name]["seconds"] > 0 and stages[name]["peak"]["peak_bytes"] > 0
        assert stages[name]["peak"]["label"].startswith("cpu_")
    assert report["preset"]["name"] == "cpu" and report["versions"]["torch"]


def test_same_seed_same_pixels_and_edit_reproduces_them(first_run, tmp_path, capsys):
    out, model, photo = first_run
    again = tmp_path / "again"
    code, _, err = invoke(capsys, "run", photo, "a dog lying down", "--model", model, "--out", again,
                          "--etas", "0.5,1.0", "--seeds", "0,1", *FAST)
    assert code == 0, err
    edited = tmp_path / "edited"
    code, _, err = invoke(capsys, "edit", out / "cat photo.imagic.safetensors", "--model", model, "--out", edited,
                          "--quiet")
    assert code == 0, err
    for png in out.glob("*_seed*.png"):
        original = Image.open(png).tobytes()
        assert Image.open(again / png.name).tobytes() == original
        assert Image.open(edited / png.name).tobytes() == original


def test_edit_with_new_etas_and_json(first_run, tmp_path, capsys):
    out, model, _ = first_run
    code, stdout, err = invoke(capsys, "edit", out / "cat photo.imagic.safetensors", "--model", model, "--etas",
                               "0.8", "--seeds", "5", "--sample-steps", "2", "--out", tmp_path / "e", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["preset"]["sample"]["etas"] == (0.8,) or report["preset"]["sample"]["etas"] == [0.8]
    assert (tmp_path / "e" / "cat photo_eta0.80_seed5.png").is_file()


def test_info_and_export(first_run, tmp_path, capsys):
    out, _, _ = first_run
    bundle = out / "cat photo.imagic.safetensors"
    code, stdout, _ = invoke(capsys, "info", bundle)
    assert code == 0 and "a dog lying down" in stdout
    code, stdout, _ = invoke(capsys, "info", bundle, "--json")
    assert json.loads(stdout)["metadata"]["prompt"] == "a dog lying down"
    for to in ("diffusers", "kohya"):
        code, stdout, err = invoke(capsys, "export", bundle, tmp_path / to, "--to", to)
        assert code == 0, err
        assert all(Path(line).is_file() for line in stdout.split())
    code, _, err = invoke(capsys, "export", bundle, tmp_path / "kohya", "--to", "kohya")
    assert_one_line_error(code, err, 7, "overwrite")


def test_info_says_sharing_a_bundle_shares_the_photo(first_run, capsys):
    out, _, _ = first_run
    bundle = out / "cat photo.imagic.safetensors"
    code, stdout, _ = invoke(capsys, "info", bundle)
    assert code == 0 and "privacy:" in stdout and "shares the photo" in " ".join(stdout.split())
    code, stdout, _ = invoke(capsys, "info", bundle, "--json")
    data = json.loads(stdout)
    assert data["thumbnail"][2] == 3 and "reproduce the photo at eta 0" in data["privacy"]


def test_kohya_export_warns_about_modules_sd_scripts_drops(first_run, tmp_path, capsys):
    """LoRA on conv_in (outside sd-scripts' blocks): one warning line naming it; attention-only LoRA: none."""
    import dataclasses

    import torch

    from imagic_lite.bundle import load_bundle, save_bundle

    out, model, _ = first_run
    path = out / "cat photo.imagic.safetensors"
    code, _, err = invoke(capsys, "export", path, tmp_path / "plain", "--to", "kohya")
    assert code == 0 and "warning" not in err
    bundle = load_bundle(path)
    r, channels = bundle.lora["r"], json.loads((model / "unet" / "config.json").read_text())["block_out_channels"][0]
    weights = {**bundle.weights, "conv_in.lora_A.weight": torch.zeros(r, 4, 3, 3),
               "conv_in.lora_B.weight": torch.zeros(channels, r, 1, 1)}
    lora = {**bundle.lora, "target_modules": [*bundle.lora["target_modules"], "conv_in"]}
    wide = tmp_path / "wide.imagic.safetensors"
    save_bundle(wide, dataclasses.replace(bundle, weights=weights, lora=lora))
    code, stdout, err = invoke(capsys, "export", wide, tmp_path / "k", "--to", "kohya")
    assert code == 0 and Path(stdout.split()[0]).is_file()
    warnings_ = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings_) == 1 and "conv_in" in warnings_[0] and "to_q" not in warnings_[0], err
    code, _, err = invoke(capsys, "export", wide, tmp_path / "d", "--to", "diffusers")
    assert code == 0 and "warning" not in err


def test_presets_command(capsys):
    code, stdout, _ = invoke(capsys, "presets", "--json")
    assert code == 0
    names = {row["name"] for row in json.loads(stdout)}
    assert {"4gb", "6gb", "8gb", "12gb", "24gb", "cpu", "paper"} <= names


# --- failures a user can cause: one line on stderr, a documented exit code, nothing half-written ----------------


@pytest.mark.parametrize(("name", "content", "fragment"), [
    ("missing.png", None, "not found"),
    ("", None, "folder"),
    ("empty.png", b"", "empty"),
    ("notes.jpg", b"hello", "not an image"),
])
def test_bad_images(tmp_path, capsys, name, content, fragment):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    code, _, err = invoke(capsys, "run", path, "a dog", "--out", tmp_path / "o", "--quiet")
    assert_one_line_error(code, err, 2, fragment)
    assert not (tmp_path / "o").exists()


def test_tiny_image(tmp_path, capsys):
    Image.new("RGB", (10, 10)).save(tmp_path / "tiny.png")
    code, _, err = invoke(capsys, "run", tmp_path / "tiny.png", "a dog", "--out", tmp_path / "o")
    assert_one_line_error(code, err, 2, "at least")


@pytest.mark.parametrize(("args", "code_", "fragment"), [
    (["--etas", "a,b"], 2, "--etas"),
    (["--etas", "9"], 2, "etas must be within"),
    (["--seeds", "-1"], 2, "seeds"),
    (["--embed-steps", "-5"], 2, "embed.steps"),
    (["--tune-lr", "5"], 2, "lora_lr"),
    (["--sample-steps", "0"], 2, "sample.steps"),
    (["--vram", "2"], 2, "below the smallest preset"),
    (["--vram", "lots"], 2, "--vram"),
    (["--preset", "huge"], 2, "unknown preset"),
    (["--model", "/no/such/folder"], 3, "neither a local folder"),
    (["--model", "nobody/no-such-model"], 3, "not on this machine"),
])
def test_bad_options(photo, tmp_path, capsys, tiny_sd, args, code_, fragment):
    base = ["run", photo, "a dog", "--out", tmp_path / "o", "--quiet"]
    if "--model" not in args:
        base += ["--model", str(tiny_sd)]
    code, _, err = invoke(capsys, *base, *args)
    assert_one_line_error(code, err, code_, fragment)


def test_empty_prompt(photo, tmp_path, capsys):
    code, _, err = invoke(capsys, "run", photo, "  ", "--out", tmp_path / "o")
    assert_one_line_error(code, err, 2, "prompt is empty")


def test_malformed_preset_file_names_file_key_and_line(photo, tmp_path, capsys, tiny_sd):
    bad = tmp_path / "mine.toml"
    bad.write_text("[memory]\nweights = 'fp32'\ncheckpoint = true\n")
    code, _, err = invoke(capsys, "run", photo, "a dog", "--model", tiny_sd, "--preset", bad, "--out", tmp_path / "o")
    assert_one_line_error(code, err, 2, "mine.toml", "memory.checkpoint", "line 3")


def test_output_folder_problems(photo, tmp_path, capsys, tiny_sd):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    code, _, err = invoke(capsys, "run", photo, "a dog", "--model", tiny_sd, "--out", tmp_path / "full")
    assert_one_line_error(code, err, 7, "--overwrite")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    (tmp_path / "afile").write_text("x")
    code, _, err = invoke(capsys, "run", photo, "a dog", "--model", tiny_sd, "--out", tmp_path / "afile")
    assert_one_line_error(code, err, 7, "is a file")
    code, _, err = invoke(capsys, "run", photo, "a dog", "--model", tiny_sd, "--out", tmp_path / "afile" / "sub")
    assert_one_line_error(code, err, 7, "cannot write")  # a parent that is a file: unwritable even for root
    if os.geteuid() != 0:  # root can write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        code, _, err = invoke(capsys, "run", photo, "a dog", "--model", tiny_sd, "--out", locked / "o")
        assert_one_line_error(code, err, 7, "cannot write")


def test_bad_bundles(tmp_path, capsys):
    (tmp_path / "x.imagic.safetensors").write_bytes(b"\x80\x04not a bundle at all")
    for command in (["info"], ["edit"], ["export", "--to", "kohya"]):
        args = [*command, tmp_path / "x.imagic.safetensors"] + ([tmp_path / "e"] if "export" in command else [])
        code, _, err = invoke(capsys, *args)
        assert_one_line_error(code, err, 6, "x.imagic.safetensors")


def test_edit_refuses_bad_stored_settings_in_one_line(first_run, tmp_path, capsys):
    """A bundle whose stored sample settings are malformed: exit 6 (bad bundle), not 1 (internal error)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out, model, _ = first_run
    with safe_open(str(out / "cat photo.imagic.safetensors"), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118 (not iterable)
    bad = tmp_path / "bad.imagic.safetensors"
    save_file(tensors, str(bad), metadata={**meta, "settings": json.dumps({"sample": {"etas": ["a"]}})})
    code, _, err = invoke(capsys, "edit", bad, "--model", model, "--out", tmp_path / "o", "--quiet")
    assert_one_line_error(code, err, 6, "bad.imagic.safetensors", "sample.etas", "expected a number")


def test_non_finite_loss_stops_the_stage(photo, tmp_path, capsys, tiny_sd, monkeypatch):
    import torch

    import imagic_lite.imagic as stages

    real = stages.denoising_loss
    monkeypatch.setattr(stages, "denoising_loss", lambda *a, **k: real(*a, **k) * torch.tensor(float("nan")))
    code, _, err = invoke(capsys, "run", photo, "a dog", "--model", tiny_sd, "--out", tmp_path / "o", *FAST)
    assert_one_line_error(code, err, 5, "stage A", "nan")
    assert not list((tmp_path / "o").glob("*.imagic.safetensors"))


def test_out_of_memory_names_stage_and_next_preset(photo, tmp_path, capsys, tiny_sd, monkeypatch):
    import torch

    import imagic_lite.imagic as stages

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(stages, "denoising_loss", oom)
    code, _, err = invoke(capsys, "run", photo, "a dog", "--model", tiny_sd, "--out", tmp_path / "o", *FAST)
    assert_one_line_error(code, err, 4, "stage A", "--preset 4gb")


def test_interrupt_saves_checkpoint_and_resume_matches_uninterrupted(photo, tmp_path, tiny_sd):
    """SIGINT in a real process: exit 130 with a checkpoint; --resume then ends where an uninterrupted run ends.
    The uninterrupted run goes alongside (its own process, one thread each), so the test costs one run's time."""
    args = ["run", str(photo), "a dog", "--model", str(tiny_sd), "--embed-steps", "120", "--tune-steps", "5",
            "--sample-steps", "2", "--etas", "0.7", "--seeds", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = subprocess.Popen([*EXE, *args, "--out", str(tmp_path / "whole"), "--quiet"], stderr=subprocess.PIPE,
                             text=True, env=env)
    proc = subprocess.Popen([*EXE, *args, "--out", str(tmp_path / "cut")], stderr=subprocess.PIPE, text=True,
                            env=env)
    for line in proc.stderr:  # the header line appears once the model is loaded, just before stage A
        if line.startswith("imagic-lite preset"):
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, err
    assert "--resume" in err and "Traceback" not in err
    checkpoint = tmp_path / "cut" / "checkpoint.imagic-resume.safetensors"
    assert checkpoint.is_file()
    assert not list((tmp_path / "cut").glob("*.imagic.safetensors"))
    resumed = subprocess.run([*EXE, *args, "--out", str(tmp_path / "cut"), "--resume", "--quiet"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert not checkpoint.exists()
    assert whole.wait(timeout=300) == 0, whole.stderr.read()
    name = "photo_eta0.70_seed0.png"
    assert Image.open(tmp_path / "cut" / name).tobytes() == Image.open(tmp_path / "whole" / name).tobytes()


@pytest.mark.parametrize("kind", ["sdxl", "sd-v"])
def test_other_families_run_and_edit_reproduces(tiny_models, photo, tmp_path, capsys, kind):
    out = tmp_path / "o"
    code, _, err = invoke(capsys, "run", photo, "a dog", "--model", tiny_models[kind], "--out", out, "--etas", "0.8",
                          *FAST)
    assert code == 0, err
    bundle = out / "photo.imagic.safetensors"
    code, stdout, _ = invoke(capsys, "info", bundle, "--json")
    info = json.loads(stdout)
    assert info["metadata"]["family"] == ("sdxl" if kind == "sdxl" else "sd")
    assert ("e_opt_pooled" in json.dumps(info)) == (kind == "sdxl")
    # the photo's own size before resizing (96x72), which SDXL's time ids are given; `edit` reads it back below
    assert (info["metadata"]["original_height"], info["metadata"]["original_width"]) == ("72", "96")
    code, _, err = invoke(capsys, "edit", bundle, "--model", tiny_models[kind], "--out", tmp_path / "e", "--quiet")
    assert code == 0, err
    name = "photo_eta0.80_seed0.png"
    assert Image.open(out / name).tobytes() == Image.open(tmp_path / "e" / name).tobytes()


def test_bundle_for_another_model_needs_force(first_run, tiny_models, tmp_path, capsys):
    out, _, _ = first_run
    bundle = out / "cat photo.imagic.safetensors"
    code, _, err = invoke(capsys, "edit", bundle, "--model", tiny_models["sd-v"], "--out", tmp_path / "e")
    assert_one_line_error(code, err, 6, "--force")


def test_settings_are_resolved_and_checked_before_the_model_loads(photo, tmp_path, capsys, tiny_sd, monkeypatch):
    """--tune-lr follows the preset's full mode; full mode over quantized storage exits 2 before loading."""
    import imagic_lite.api as api
    from imagic_lite.errors import ModelError

    resolved = []
    real = api.resolve_settings
    monkeypatch.setattr(api, "resolve_settings", lambda *a, **k: resolved.append(real(*a, **k)) or resolved[-1])

    def no_load(*args, **kwargs):
        raise ModelError("not loaded in this test")

    monkeypatch.setattr(api, "load_components", no_load)
    code, _, err = invoke(capsys, "run", photo, "a dog", "--model", tiny_sd, "--preset", "paper", "--tune-lr",
                          "1e-6", "--out", tmp_path / "a")
    assert_one_line_error(code, err, 3, "not loaded in this test")
    assert resolved[-1].tune.mode == "full" and resolved[-1].tune.lr == 1e-6
    code, _, err = invoke(capsys, "run", photo, "a dog", "--model", tiny_sd, "--preset", "4gb", "--mode", "full",
                          "--out", tmp_path / "b")
    assert_one_line_error(code, err, 2, "tune.mode = 'full'", "memory.storage = 'fp8'")
    config = tmp_path / "lists.toml"
    config.write_text('[sample]\netas = ["a"]\n')
    code, _, err = invoke(capsys, "run", photo, "a dog", "--model", tiny_sd, "--config", config, "--out",
                          tmp_path / "c")
    assert_one_line_error(code, err, 2, "lists.toml", "sample.etas", "expected a number")
