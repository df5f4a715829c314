"""`imagic-lite batch` (issue 19): the jobs file checked before any work, a 6-job batch with one missing image and
one empty prompt, rerun = skip, an interrupted job resumed to the same pixels, and (slow) the same batch under two
gloo processes giving the same statuses and byte-identical images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from imagic_lite.batch import BatchSettings, Job, read_jobs
from imagic_lite.cli import main
from imagic_lite.errors import InputError
from imagic_lite.images import read_png_params

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ["--preset", "cpu", "--embed-steps", "2", "--tune-steps", "2", "--sample-steps", "2", "--etas", "0.7",
         "--seeds", "0"]
STATUSES = {"a": "done", "b": "done", "c": "failed", "d": "failed", "e": "done", "f": "done"}


def _jobs_folder(folder: Path) -> Path:
    """Four photos and a 6-job CSV: c's image is missing, d's prompt is blank, f reuses a's photo."""
    folder.mkdir(parents=True, exist_ok=True)
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    for i, colour in enumerate(colours):
        image = Image.new("RGB", (64, 64), (128, 128, 128))
        ImageDraw.Draw(image).ellipse((8 + 4 * i, 12, 52, 52), fill=colour)
        image.save(folder / f"p{i}.png")
    (folder / "jobs.csv").write_text(
        "image,prompt,name,tune_steps\n"
        "p0.png,a red square,a,\n"
        "p1.png,a green disc,b,3\n"
        "missing.png,a cat,c,\n"
        "p2.png,   ,d,\n"
        "p3.png,a yellow disc,e,\n"
        "p0.png,a blue disc,f,\n")
    return folder / "jobs.csv"


def _batch(args: list[str]) -> int:
    try:
        main(["batch", *args])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def _summary(out: Path) -> dict[str, dict]:
    return {line["name"]: line for line in map(json.loads, (out / "summary.jsonl").read_text().splitlines())}


def _images(out: Path, name: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / name).glob("*.png"))}


@pytest.fixture(scope="module")
def single(tiny_sd, tmp_path_factory):
    """The 6-job batch, one process, in this process."""
    jobs = _jobs_folder(tmp_path_factory.mktemp("jobs"))
    out = jobs.parent / "out"
    started = time.perf_counter()
    code = _batch([str(jobs), "--out", str(out), "--model", str(tiny_sd), *FLAGS])
    return jobs, out, code, time.perf_counter() - started


def test_jobs_file_problems_are_one_line_per_row_before_any_work(tmp_path):
    settings = BatchSettings(model="shapes")
    (tmp_path / "bad.csv").write_text("image,prompt,colour\nx.png,a cat,red\n")
    with pytest.raises(InputError, match="row 1: unknown column.*'colour'"):
        read_jobs(tmp_path / "bad.csv", settings)
    (tmp_path / "bad2.csv").write_text(
        "image,prompt,etas,seeds,tune_steps,name,preset\n"
        "x.png,a,0.5;0.6,,,,\n"        # row 2: etas
        "x.png,a,,-1,0,,\n"            # row 3: seeds, tune_steps
        "x.png,a,,,,../up,\n"          # row 4: name
        "x.png,a,,,,a,no-such\n"       # row 5: preset
        "x.png,a,,,,a,\n"              # row 6: duplicate of... row 5 was bad, so this is the first 'a'
        "y.png,b,,,,a,\n")             # row 7: duplicate name
    with pytest.raises(InputError) as caught:
        read_jobs(tmp_path / "bad2.csv", settings)
    lines = str(caught.value).splitlines()[1:]
    assert [line.split(":")[0].strip() for line in lines] == ["row 2", "row 3", "row 3", "row 4", "row 5", "row 7"]
    assert "unknown preset 'no-such'" in lines[4] and "earlier row" in lines[5]

    (tmp_path / "jobs.jsonl").write_text(
        '{"image": "sub/a.png", "prompt": "a cat", "etas": [0.6, 0.7], "seeds": "0,1"}\n\n'
        '{"image": "/abs/a.png", "prompt": "a dog", "tune_steps": 5}\n'
        '{"image": "b.png", "prompt": "x", "name": "a"}\n')
    jobs = read_jobs(tmp_path / "jobs.jsonl", settings)
    assert [j.name for j in jobs] == ["a-1", "a-2", "a"]  # a repeated stem (or a taken name) gets the job number
    assert jobs[0] == Job(0, 1, "a-1", tmp_path / "sub/a.png", "a cat", etas=(0.6, 0.7), seeds=(0, 1))
    assert jobs[1].image == Path("/abs/a.png") and jobs[1].overrides({"tune": {"rank": 8}}) == \
        {"tune": {"rank": 8, "steps": 5}}
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png"}\n[1]\n{"image": "a.png", "prompt": "b", "x": 1}\n')
    with pytest.raises(InputError, match=r"(?s)row 1: missing prompt.*row 2: not a JSON object.*row 3: unknown key"):
        read_jobs(tmp_path / "bad.jsonl", settings)


def test_batch_records_failures_and_writes_what_run_writes(single, capsys):
    jobs, out, code, _ = single
    assert code == 8  # some jobs failed: documented exit code
    summary = _summary(out)
    assert {name: line["status"] for name, line in summary.items()} == STATUSES
    assert "not found" in summary["c"]["error"] and summary["c"]["exit_code"] == 2
    assert "prompt is empty" in summary["d"]["error"]
    assert (out / "summary.csv").read_text().splitlines()[0].startswith("index,name,status")
    for name in ("a", "b", "e", "f"):
        stem = "p0" if name in "af" else {"b": "p1", "e": "p3"}[name]
        assert sorted(p.name for p in (out / name).iterdir()) == sorted(
            [f"{stem}.imagic.safetensors", f"{stem}_eta0.70_seed0.png", f"{stem}_grid.png", "run.json"])
    report = json.loads((out / "b" / "run.json").read_text())
    assert report["preset"]["tune"]["steps"] == 3 and report["preset"]["embed"]["steps"] == 2  # job column wins
    assert not (out / "c").exists() and not list(out.glob("**/*.tmp"))


def test_rerun_skips_complete_jobs_without_loading_the_model(single, monkeypatch):
    from imagic_lite.api import Imagic

    jobs, out, _, first = single

    def no_load(*args, **kwargs):
        raise AssertionError("a rerun of finished jobs loaded the model")

    monkeypatch.setattr(Imagic, "from_pretrained", no_load)
    started = time.perf_counter()
    code = _batch([str(jobs), "--out", str(out), "--model", "unused-not-a-model", *FLAGS, "--quiet"])
    took = time.perf_counter() - started
    summary = _summary(out)
    assert code == 8 and {n: line["status"] for n, line in summary.items()} == {
        **STATUSES, "a": "skipped", "b": "skipped", "e": "skipped", "f": "skipped"}
    assert took < max(5.0, first / 4), (took, first)


def test_a_job_stopped_mid_stage_resumes_to_the_same_pixels(single, tiny_sd, tmp_path):
    from imagic_lite.batch import process_state, run_batch
    from imagic_lite.cli import _overrides
    from imagic_lite.errors import Interrupted
    from imagic_lite.imagic import StopFlag

    jobs, reference, _, _ = single
    only_b = tmp_path / "b.csv"
    only_b.write_text(f"image,prompt,name,tune_steps\n{jobs.parent / 'p1.png'},a green disc,b,3\n")
    settings = BatchSettings(model=str(tiny_sd), preset="cpu", overrides=_overrides(
        embed_steps=2, tune_steps=2, sample_steps=2, etas=(0.7,), seeds=(0,)))
    stop = StopFlag()

    def events(event):
        if event["kind"] == "stage" and event["stage"] == "B" and event["step"] == 1:
            stop.set()

    out = tmp_path / "out"
    with pytest.raises(Interrupted, match="job b: stopped in stage B at step 1; rerun the same command"):
        run_batch(read_jobs(only_b, settings), out, settings, state=process_state(), stop=stop, events=events)
    assert (out / "b" / "checkpoint.imagic-resume.safetensors").is_file()
    assert not (out / "b" / "run.json").exists() and not list(out.glob("**/*.tmp"))
    code = _batch([str(only_b), "--out", str(out), "--model", str(tiny_sd), *FLAGS, "--quiet"])
    assert code == 0
    assert "resuming stage B at step 1" in json.loads((out / "b" / "run.json").read_text())["notes"]
    assert _images(out, "b") == _images(reference, "b")


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_and_run(single, tiny_sd, tmp_path):
    """torchrun --nproc_per_node 2 (what `accelerate launch --multi_gpu --num_processes 2` starts here, FIELD-NOTES
    §5): same statuses, byte-identical images, every job in exactly one process; and `run` gives the same pixels."""
    jobs, reference, _, _ = single
    out = tmp_path / "out2"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    torchrun = Path(sys.executable).parent / "torchrun"
    done = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "imagic_lite", "batch", str(jobs), "--out",
                           str(out), "--model", str(tiny_sd), *FLAGS, "--quiet"], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode != 0 and "2 of 6 jobs failed" in done.stderr, done.stderr[-2000:]
    summary = _summary(out)
    assert {n: line["status"] for n, line in summary.items()} == STATUSES
    assert {n: line["process"] for n, line in summary.items()} == {"a": 0, "b": 1, "c": 0, "d": 1, "e": 0, "f": 1}
    per_rank = [[json.loads(x)["name"] for x in (out / ".batch" / f"rank-{r}.jsonl").read_text().splitlines()]
                for r in (0, 1)]
    assert sorted(per_rank[0] + per_rank[1]) == sorted(STATUSES) and not set(per_rank[0]) & set(per_rank[1])
    for name in ("a", "b", "e", "f"):
        assert _images(out, name) == _images(reference, name)

    run_out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "imagic_lite", "run", str(jobs.parent / "p3.png"), "a yellow disc",
                           "--out", str(run_out), "--model", str(tiny_sd), *FLAGS, "--quiet"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in run_out.glob("*.png")} == _images(reference, "e")


@pytest.mark.slow
def test_ctrl_c_stops_both_processes_and_a_rerun_finishes_the_same(single, tiny_sd, tmp_path):
    """Ctrl-C (SIGINT to the launch's process group) under torchrun: both processes stop, nothing half-written;
    the same command then finishes every job (resuming any checkpointed one) with the same pixels as one process."""
    import signal

    jobs, reference, _, _ = single
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "-m", "imagic_lite", "batch",
               str(jobs), "--out", str(out), "--model", str(tiny_sd), *FLAGS, "--quiet"]
    proc = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 600
    while not ((out / "a").is_dir() or (out / "b").is_dir()):  # a job has started: its process is in the stages
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "rerun the same command" in stderr, stderr[-2000:]
    assert not list(out.glob("**/*.tmp")) and not (out / "summary.csv").exists()
    checkpointed = {p.parent.name for p in out.glob("*/checkpoint.imagic-resume.safetensors")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert "2 of 6 jobs failed" in done.stderr, done.stderr[-2000:]
    summary = _summary(out)
    assert {n: "done" if line["status"] == "skipped" else line["status"] for n, line in summary.items()} == STATUSES
    for name in ("a", "b", "e", "f"):
        assert _images(out, name) == _images(reference, name)
    for name in checkpointed:
        assert any(n.startswith("resuming stage") for n in json.loads((out / name / "run.json").read_text())["notes"])


def test_a_job_whose_preset_needs_other_memory_settings_gets_the_model_loaded_again(tiny_models_16, tmp_path,
                                                                                     capsys):
    """The batch runs preset cpu (fp32); job b asks for 4gb (half weights over fp8 storage, checkpointing, 8-bit
    AdamW): the model is loaded again for b and again for c, and b writes the bytes `run --preset 4gb` writes."""
    from test_cli import invoke

    model = tiny_models_16["sd"]  # 16 px latents: bf16 convolutions on a CPU are slow, and 4gb computes in bf16
    folder = tmp_path / "jobs"
    folder.mkdir()
    image = Image.new("RGB", (64, 64), (128, 128, 128))
    ImageDraw.Draw(image).ellipse((12, 12, 52, 52), fill=(200, 30, 30))
    image.save(folder / "p.png")
    (folder / "jobs.csv").write_text("image,prompt,name,preset\np.png,a red square,a,\np.png,a red square,b,4gb\n"
                                     "p.png,a red square,c,\n")
    out = tmp_path / "out"
    assert _batch([str(folder / "jobs.csv"), "--out", str(out), "--model", str(model), *FLAGS, "--quiet"]) == 0
    assert {name: line["status"] for name, line in _summary(out).items()} == {"a": "done", "b": "done", "c": "done"}
    notes = {name: json.loads((out / name / "run.json").read_text())["notes"] for name in "abc"}
    again = {name: any("loaded the model again" in note for note in notes[name]) for name in "abc"}
    assert again == {"a": False, "b": True, "c": True}
    assert json.loads((out / "b" / "run.json").read_text())["preset"]["memory"]["storage"] == "fp8"
    flags = [f if f != "cpu" else "4gb" for f in FLAGS]
    code, _, err = invoke(capsys, "run", folder / "p.png", "a red square", "--model", model, "--out", tmp_path / "run",
                          *flags, "--quiet")
    assert code == 0, err
    assert _images(out, "b") == _images(tmp_path / "run", ".")


def test_batch_auto_eta_chooses_per_job_and_records_it(tiny_sd, tmp_path):
    """`batch --auto-eta`: each job chooses as `run --auto-eta` does; the choice is in its run.json, PNG text,
    summary.jsonl and summary.csv."""
    folder = tmp_path / "jobs"
    folder.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(folder / "p.png")
    (folder / "jobs.csv").write_text("image,prompt,name\np.png,a blue square,a\n")
    out = tmp_path / "out"
    flags = [f if f != "0.7" else "0.5,1.0" for f in FLAGS]
    assert _batch([str(folder / "jobs.csv"), "--out", str(out), "--model", str(tiny_sd), *flags, "--quiet",
                   "--auto-eta"]) == 0
    chosen = json.loads((out / "a" / "run.json").read_text())["auto_eta"]["eta"]
    assert chosen in (0.5, 1.0) and _summary(out)["a"]["auto_eta"] == chosen
    assert read_png_params(out / "a" / f"p_eta{chosen:.2f}_seed0.png")["auto_eta_chosen"] == 1
    rows = (out / "summary.csv").read_text().splitlines()
    assert rows[1].split(",")[rows[0].split(",").index("auto_eta")] == str(chosen)
