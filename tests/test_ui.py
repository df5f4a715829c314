"""The web page (`imagic-lite ui`): its logic on a tiny model, and the page itself driven in headless Chromium.

Browser tests are marked `browser` and skipped, with the reason, when Gradio, Playwright or Chromium is missing;
`.ci/run` installs Chromium so CI runs them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagic_lite.cli import main
from imagic_lite.errors import BundleError, InputError, Interrupted
from imagic_lite.images import read_png_params
from imagic_lite.progress import StageLog
from imagic_lite.ui import INSTALL_HINT, UISettings, Workbench, fresh_dir, one_line, page_overrides, stages_html

ROOT = Path(__file__).resolve().parents[1]
RED_CIRCLE = ROOT / "examples" / "red-circle.png"
RUN_KEYS = {"prompt", "model", "preset", "seed_fit", "sample_steps", "guidance", "eta", "seed"}  # as `run` writes
TINY = {"embed": {"steps": 2}, "tune": {"steps": 3}, "sample": {"steps": 2, "etas": [0.5, 1.0]}}


# ---------------------------------------------------------------------------------------------------------------
# Without a browser: the command's contract and the logic behind the page


def test_help_and_other_commands_do_not_import_gradio():
    code = ("import sys\nfrom imagic_lite.cli import main\n"
            "for args in (['--help'], ['ui', '--help'], ['run', '--help']):\n"
            "    try:\n        main(args)\n    except SystemExit:\n        pass\nprint('gradio' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "False", result.stderr


def test_missing_gradio_is_one_line_naming_the_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now raises ImportError
    with pytest.raises(SystemExit) as exit_info:
        main(["ui", "--port", "7861"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and err.startswith("error:") and INSTALL_HINT in err, err


def test_a_port_in_use_is_one_line(tmp_path):
    pytest.importorskip("gradio", reason=f"Gradio is not installed ({INSTALL_HINT})")
    from imagic_lite.ui import start

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(InputError, match=f"cannot listen on 127.0.0.1:{port}: the port is in use; pass a free"):
            start(UISettings(model="shapes", out=tmp_path, port=port))


def test_page_overrides_are_checked_like_preset_files():
    assert page_overrides({"embed_steps": "5", "tune_lr": "2e-3", "guidance": " ", "rank": None}) == (
        {"embed": {"steps": 5}}, 0.002)
    assert page_overrides({"tune_steps": "7", "rank": "8"}) == ({"tune": {"steps": 7, "rank": 8}}, None)
    with pytest.raises(InputError, match="Stage B steps takes a whole number, got 'ten'"):
        page_overrides({"tune_steps": "ten"})
    for box in ("embed_lr", "tune_lr"):
        with pytest.raises(Exception, match="advanced settings.*lr must be in"):
            page_overrides({box: "5"})


def test_errors_are_one_line_with_the_users_file_name(tmp_path):
    tmp = tmp_path / "gradio" / "abc123" / "bad.png"
    line = one_line(InputError(f"{tmp} is not an image\n(second line)"), {str(tmp): "bad.png"})
    assert line == "error: bad.png is not an image (second line)"
    assert one_line(KeyError("x"), {}).startswith("error: internal error (KeyError")


def test_stage_table_shows_the_progress_events():
    log = StageLog()
    log({"stage": "A", "step": 1, "total": 4, "loss": 0.5})
    log({"stage": "A", "step": 2, "total": 4, "loss": 0.25})
    log({"stage": "C", "step": 3, "total": 30})
    table = stages_html(log)
    assert log.lines["A"].step == 2 and log.lines["A"].rate and log.lines["C"].loss is None
    assert 'data-stage="A"' in table and "2/4" in table and "loss 0.2500" in table and "3/30" in table


def test_fresh_dir_never_reuses_a_filled_folder(tmp_path):
    first = fresh_dir(tmp_path, "photo")
    (first / "x.png").write_bytes(b"x")
    assert fresh_dir(tmp_path, "photo") == tmp_path / "photo-2"


def test_workbench_trains_renders_and_reopens(tiny_sd, photo, tmp_path):
    """The page's jobs without the page: files as `run`/`edit` write them, one job at a time."""
    bench = Workbench(UISettings(model=str(tiny_sd), out=tmp_path / "out"))
    stop = bench.begin("tab-1")
    assert bench.begin("tab-2") is None  # a second tab is told busy
    assert not bench.request_stop("tab-2") and not stop.is_set()  # nor can it stop the first tab's job
    log = StageLog()
    image = Image.open(photo).convert("RGB")
    session = bench.train(image, photo, "a dog", (str(tiny_sd), "cpu", None), TINY, 1e-2, 0, log, stop)
    bench.end()
    assert set(log.lines) == {"A", "B", "C"} and log.lines["B"].step == 3
    out = session.out
    assert out == tmp_path / "out" / "photo" and (out / "input.png").read_bytes() == photo.read_bytes()
    names = {p.name for p in session.files}
    assert {"photo.imagic.safetensors", "photo.safetensors", "pytorch_lora_weights.safetensors", "photo_grid.png",
            "run.json"} <= names
    assert [(s.eta, s.seed) for s, _ in session.samples] == [(0.5, 0), (1.0, 0)]
    assert set(read_png_params(session.samples[0][1])) == RUN_KEYS
    assert json.loads(session.bundle.meta["settings"])["tune"]["lora_lr"] == 1e-2  # the page's stage B rate

    bench.render(session, 0.75, 3, None, None, StageLog(), bench.begin("tab-1"))
    bench.end()
    bench.render(session, 0.75, 3, 3, None, StageLog(), bench.begin("tab-1"))  # the same eta again: replaced
    bench.end()
    assert [(s.eta, s.seed) for s, _ in session.samples] == [(0.5, 0), (1.0, 0), (0.75, 3)]
    assert read_png_params(out / "photo_eta0.75_seed3.png")["sample_steps"] == 3
    before = np.asarray(Image.open(out / "photo_eta0.75_seed3.png"))

    class StopInB(StageLog):  # the Stop button, pressed at stage B's second step
        def __call__(self, event):
            super().__call__(event)
            if event["stage"] == "B" and event["step"] == 2:
                stop.set()

    stop = bench.begin("tab-2")
    with pytest.raises(Interrupted, match="stopped in stage B"):
        bench.train(image, photo, "a cat", (str(tiny_sd), "cpu", None), {"embed": {"steps": 1}, "tune": {"steps": 50}},
                    5e-2, 1, StopInB(), stop)
    bench.end()
    bench.render(session, 0.75, 3, 3, None, StageLog(), bench.begin("tab-1"))  # the stopped run's half-trained
    bench.end()  # adapter must not leak into another edit's pixels
    assert np.array_equal(np.asarray(Image.open(out / "photo_eta0.75_seed3.png")), before)

    choice = bench.auto(session, 0, None, None, StageLog(), bench.begin("tab-1"))  # the page's "Pick eta for me"
    bench.end()
    assert choice.eta in (0.5, 1.0) and session.notes[-1].startswith(f"auto-eta chose eta {choice.eta:g}: ")
    written = read_png_params(out / f"photo_eta{choice.eta:.2f}_seed0.png")
    assert written["auto_eta"] == choice.eta and written["auto_eta_chosen"] == 1
    assert json.loads(written["auto_eta_scores"]).keys() == {"0", "0.5", "1"}

    again = bench.open(out / "photo.imagic.safetensors", "photo.imagic.safetensors", "cpu", None, StageLog(),
                       bench.begin("tab-2"))
    bench.end()
    assert again.out == tmp_path / "out" / "photo-edit" and len(again.samples) == 2
    assert np.array_equal(np.asarray(Image.open(again.samples[0][1])), np.asarray(Image.open(session.samples[0][1])))
    assert set(read_png_params(again.samples[0][1])) == {"prompt", "model", "bundle", "sample_steps", "guidance",
                                                          "eta", "seed"}
    (tmp_path / "bad.imagic.safetensors").write_text("not a bundle")
    with pytest.raises(BundleError):
        bench.open(tmp_path / "bad.imagic.safetensors", "bad.imagic.safetensors", "cpu", None, StageLog(), None)


# ---------------------------------------------------------------------------------------------------------------
# In a real browser


def _browser_missing() -> str | None:
    if importlib.util.find_spec("gradio") is None:
        return f"Gradio is not installed ({INSTALL_HINT})"
    if importlib.util.find_spec("playwright") is None:
        return "Playwright is not installed (pip install -e '.[test]')"
    if _chromium() is None:
        return "no Chromium to drive (apt-get install chromium)"
    return None


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


needs_browser = pytest.mark.skipif(_browser_missing() is not None, reason=str(_browser_missing()))


@dataclass
class Server:
    url: str
    out: Path
    served_after: float
    port: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`imagic-lite ui` as a user starts it, on a free loopback port; the time until it served the page."""
    port, out = _free_port(), tmp_path_factory.mktemp("ui-out")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # one thread: 2 shared cores
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "imagic_lite.cli", "ui", "--port", str(port), "--model",
                             "shapes", "--out", str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    served_after = None
    while time.monotonic() - start < 60 and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    served_after = time.monotonic() - start
                    break
        except OSError:
            time.sleep(0.25)
    if served_after is None:
        proc.kill()
        pytest.fail(f"imagic-lite ui did not serve {url} within 60 s: {proc.communicate()[0][-2000:]}")
    yield Server(url, out, served_after, port)
    proc.terminate()  # SIGTERM ends the server like Ctrl-C
    assert proc.wait(timeout=30) == 0, proc.communicate()[0][-2000:]


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=60_000)  # a job on 2 shared cores can take that long; the 5 s default cannot
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=_chromium())
        yield chromium
        chromium.close()


def _page(browser, server):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(server.url)
    page.locator("#status").wait_for()
    return page


def _status(page) -> str:
    return page.locator("#status").inner_text().strip()


def _upload_photo(page, path: Path, prompt: str = "a blue circle", **advanced: int) -> None:
    from playwright.sync_api import expect

    page.locator("#photo input[type=file]").set_input_files(str(path))
    expect(page.locator("#status")).to_contain_text(path.name)
    page.locator("#prompt textarea").fill(prompt)
    _advanced(page, **advanced)


def _advanced(page, **values: int) -> None:
    if values and not page.locator("#embed_steps").is_visible():
        page.locator("#advanced button.label-wrap").click()
    for box, value in values.items():
        page.locator(f"#{box} textarea, #{box} input").first.fill(str(value))


def _image(page, selector: str) -> tuple[str, np.ndarray]:
    src = page.locator(selector).get_attribute("src")
    return src, np.asarray(Image.open(BytesIO(page.request.get(src).body())).convert("RGB"), dtype=np.int16)


def _drag(page, selector: str, fraction: float) -> None:
    """Move a slider the way a person does: press on its thumb, drag, release (the page renders on release)."""
    track = page.locator(selector)
    track.scroll_into_view_if_needed()
    box = track.bounding_box()
    value = float(track.input_value())
    low, high = float(track.get_attribute("min")), float(track.get_attribute("max"))
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * (value - low) / (high - low), y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * fraction, y, steps=5)
    page.mouse.up()


@pytest.fixture(scope="module")
def edited(browser, server):
    """One page that ran an edit of the red circle with few steps: (page, first result's src and pixels)."""
    from playwright.sync_api import expect

    page = _page(browser, server)
    _upload_photo(page, RED_CIRCLE, embed_steps=5, tune_steps=10, sample_steps=5)
    page.locator("#run").click()
    expect(page.locator("#status")).to_contain_text("done", timeout=120_000)
    yield page, *_image(page, "#current img")
    page.close()


@pytest.mark.browser
@needs_browser
def test_serves_the_page_on_loopback_within_60s(server):
    assert server.served_after < 60
    with urllib.request.urlopen(server.url, timeout=10) as response:
        assert "imagic-lite" in response.read().decode()
    address = _outside_address()
    if address:  # it listens on 127.0.0.1 only: this machine's other address is refused
        with pytest.raises(OSError), socket.create_connection((address, server.port), timeout=3):
            pass


def _outside_address() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # sends nothing: only picks the outgoing interface
            address = s.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


@pytest.mark.browser
@needs_browser
def test_a_text_file_named_png_gets_one_line_on_the_page(browser, server, tmp_path):
    from playwright.sync_api import expect

    bad = tmp_path / "holiday.png"
    bad.write_text("this is text, not a picture\n")
    page = _page(browser, server)
    page.locator("#photo input[type=file]").set_input_files(str(bad))
    expect(page.locator("#status")).to_contain_text("error:")
    text = _status(page)
    assert len(text.splitlines()) == 1 and "holiday.png" in text and "Traceback" not in text, text
    assert "/tmp" not in text and "gradio" not in text  # the user's file name, not the server's copy
    page.close()


@pytest.mark.browser
@needs_browser
def test_edit_then_eta_slider_renders_a_new_image(edited, server, tmp_path):
    from playwright.sync_api import expect

    page, first_src, first = edited
    assert page.locator("#gallery img").count() == 4  # the shapes model's etas 1.0-1.6, first seed
    _drag(page, "#eta input[type=range]", 0.3)  # eta 0.6 on the 0..2 slider
    expect(page.locator("#current img")).not_to_have_attribute("src", first_src)
    expect(page.locator("#status")).to_contain_text("eta 0.6")
    src, second = _image(page, "#current img")
    assert "eta0.60" in src and np.abs(second - first).mean() > 1.0  # a different image, not the same one again
    expect(page.locator("#gallery img")).to_have_count(5)
    written = server.out / "red-circle" / "red-circle_eta0.60_seed0.png"
    assert set(read_png_params(written)) == RUN_KEYS and read_png_params(written)["eta"] == 0.6
    downloads = page.locator("#downloads").inner_text().replace("\n", "")  # the page breaks long names
    for name in ("red-circle.imagic.safetensors", "red-circle.safetensors", "pytorch_lora_weights.safetensors",
                 "red-circle_grid.png", "red-circle_eta0.60_seed0.png"):
        assert name in downloads
    page.screenshot(path=tmp_path / "ui-edit.png", full_page=True)


@pytest.mark.browser
@needs_browser
def test_pick_eta_for_me_moves_the_slider_to_the_choice(edited, server):
    from playwright.sync_api import expect

    page, _, _ = edited
    page.locator("#auto_eta").click()
    expect(page.locator("#status")).to_contain_text("auto-eta chose eta", timeout=120_000)
    chosen = float(re.search(r"auto-eta chose eta ([0-9.]+)", _status(page)).group(1))
    assert chosen in (1.0, 1.2, 1.4, 1.6)  # one of the shapes model's etas
    assert float(page.locator("#eta input[type=range]").input_value()) == chosen
    src, _ = _image(page, "#current img")
    assert f"eta{chosen:.2f}_seed0" in src
    assert read_png_params(server.out / "red-circle" / f"red-circle_eta{chosen:.2f}_seed0.png")["auto_eta_chosen"] == 1


@pytest.mark.browser
@needs_browser
def test_bundles_reopen_and_a_bad_one_is_refused_like_the_cli(edited, browser, server, tmp_path):
    from playwright.sync_api import expect

    from imagic_lite.bundle import load_bundle

    bad = tmp_path / "old.imagic.safetensors"
    bad.write_bytes(b"\x80\x04not a bundle at all")
    with pytest.raises(BundleError) as refusal:
        load_bundle(bad)
    page = _page(browser, server)
    page.locator("#bundle_in input[type=file]").set_input_files(str(bad))
    expect(page.locator("#status")).to_contain_text("error:")
    assert _status(page) == "error: " + str(refusal.value).replace(str(bad), bad.name)

    page.locator("#bundle_in input[type=file]").set_input_files(str(server.out / "red-circle" /
                                                                    "red-circle.imagic.safetensors"))
    expect(page.locator("#status")).to_contain_text("opened red-circle.imagic.safetensors")
    expect(page.locator("#gallery img")).to_have_count(4)
    expect(page.locator("#eta input[type=range]")).to_be_enabled()
    page.close()


@pytest.mark.browser
@needs_browser
def test_stop_mid_run_and_a_second_tab_is_told_busy(edited, browser, server):
    from playwright.sync_api import expect

    page, other = edited[0], _page(browser, server)
    _advanced(page, tune_steps=5000)  # same photo and prompt, a long stage B
    page.locator("#run").click()
    expect(page.locator('#stages tr[data-stage="B"]')).to_be_visible()
    _upload_photo(other, RED_CIRCLE)
    other.locator("#run").click()
    expect(other.locator("#status")).to_contain_text("busy")
    page.locator("#stop").click()
    expect(page.locator("#status")).to_contain_text("stopped in stage B")
    expect(page.locator("#run")).to_be_enabled()
    src = page.locator("#current img").get_attribute("src")
    _drag(page, "#eta input[type=range]", 0.45)  # the page still re-renders its last edit: eta 0.9
    expect(page.locator("#current img")).not_to_have_attribute("src", src)
    assert "eta0.90" in page.locator("#current img").get_attribute("src")
    other.close()


@pytest.mark.slow
@pytest.mark.browser
@needs_browser
@pytest.mark.skipif(os.environ.get("IMAGIC_UI_SCREENSHOT") != "1", reason="rewrites README's picture; run it with "
                    "IMAGIC_UI_SCREENSHOT=1 python -m pytest -m slow tests/test_ui.py -k screenshot")
def test_readme_screenshot(browser, server):
    """README's "Web UI" picture: the red circle edited with the shapes model's own settings, then eta moved to 1.3;
    then "Pick eta for me". Writes benchmarks/results/ui-edit.png and ui-edit.json (timings, load, versions). About
    1-3 minutes."""
    import platform

    import gradio
    from playwright.sync_api import expect

    results = ROOT / "benchmarks" / "results"
    load_before = os.getloadavg()
    page = _page(browser, server)
    _upload_photo(page, RED_CIRCLE)
    start = time.monotonic()
    page.locator("#run").click()
    expect(page.locator("#status")).to_contain_text("done", timeout=900_000)
    run_seconds = time.monotonic() - start
    out = Path(_status(page).splitlines()[0].split("files in ", 1)[1].strip())
    src = page.locator("#current img").get_attribute("src")
    start = time.monotonic()
    _drag(page, "#eta input[type=range]", 0.65)  # eta 1.3, between the settings' 1.2 and 1.4
    expect(page.locator("#current img")).not_to_have_attribute("src", src, timeout=300_000)
    rerender_seconds = time.monotonic() - start
    expect(page.locator("#status")).to_contain_text("eta 1.3")
    page.screenshot(path=results / "ui-edit.png", full_page=True)
    start = time.monotonic()
    page.locator("#auto_eta").click()
    expect(page.locator("#status")).to_contain_text("auto-eta chose eta", timeout=300_000)
    auto_seconds = time.monotonic() - start
    chosen = float(re.search(r"auto-eta chose eta ([0-9.]+)", _status(page)).group(1))
    run = json.loads((out / "run.json").read_text())
    from imagic_lite.files import write_text_atomic

    write_text_atomic(results / "ui-edit.json", json.dumps({
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "test": "tests/test_ui.py::test_readme_screenshot",
        "command": f"imagic-lite ui --model shapes --port {server.port}", "browser": browser.version,
        "gradio": gradio.__version__, "machine": {"cpus": os.cpu_count(), "processor": platform.machine(),
                                                  "load_average_1_5_15_before": load_before,
                                                  "load_average_1_5_15_after": os.getloadavg()},
        "served_after_seconds": round(server.served_after, 1),
        "run_click_to_done_seconds": round(run_seconds, 1),
        "eta_release_to_new_image_seconds": round(rerender_seconds, 1),
        "pick_eta_click_to_choice_seconds": round(auto_seconds, 1), "pick_eta_chose": chosen,
        "run_json_stages": {r["stage"]: round(r["seconds"], 2) for r in run["stages"]},
        "settings": run["preset"], "versions": run["versions"], "device": run["device"],
    }, indent=1) + "\n")
