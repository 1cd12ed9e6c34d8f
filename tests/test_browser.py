"""The prompt panel where people use it: JupyterLab 4 + ipywidgets 8 in headless Chromium.

JupyterLab is started on 127.0.0.1 with a free port, a token and private config,
runtime and settings folders; a small notebook loads the demo model and shows the
panel; Playwright for Python drives Debian's ``chromium`` (``/usr/bin/chromium``,
never a downloaded browser) through it as a person would: pick an image, choose a
task, type, click Run, upload a file. Screenshots of each state go to
``out/browser/`` (or ``$PALI_KIT_BROWSER_OUT``). The server (with its kernel) and
the browser always shut down, even when a step fails.

Run it with ``make test-browser``. Without chromium, playwright or jupyterlab the
module is skipped with the reason; with ``PALI_KIT_REQUIRE_BROWSER=1`` (what
``make test-browser`` sets) it fails instead, so that CI cannot skip it silently.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from pali_kit import viz
from pali_kit.detection import parse_detections
from pali_kit.images import load_image

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path(os.environ.get("PALI_KIT_CHROMIUM", "/usr/bin/chromium"))
OUT = Path(os.environ.get("PALI_KIT_BROWSER_OUT", ROOT / "out" / "browser"))
SAMPLE = "shapes_0.png"  # a scene of the demo's world, see data/images/README.md
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
# First run of a shape compiles (several seconds on a busy 2-core CPU); the rest is fast.
RUN_TIMEOUT_MS = 120_000


def _missing() -> list[str]:
    missing = [] if CHROMIUM.is_file() else [f"{CHROMIUM} (Debian: apt-get install chromium)"]
    missing += [f"the Python package {name}" for name in ("playwright", "jupyterlab")
                if importlib.util.find_spec(name) is None]  # fmt: skip
    return missing


MISSING = _missing()
if MISSING:
    _why = (
        f"needs {'; '.join(MISSING)}. Run it with `make test-browser`, which installs the "
        "[browser] extra (jupyterlab, playwright); chromium comes from apt, never a download"
    )
    if os.environ.get("PALI_KIT_REQUIRE_BROWSER"):
        pytest.fail(f"the browser test cannot run: it {_why}", pytrace=False)
    pytest.skip(f"browser test skipped: it {_why}", allow_module_level=True)

from playwright.sync_api import expect, sync_playwright  # noqa: E402

NOTEBOOK_CELL = """\
import pali_kit as pk

model = pk.load("demo")
pk.widgets.prompt_panel(model)"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_notebook(path: Path) -> None:
    cell = {"cell_type": "code", "execution_count": None, "id": "panel", "metadata": {},
            "outputs": [], "source": NOTEBOOK_CELL}  # fmt: skip
    kernel = {"display_name": "Python 3", "language": "python", "name": "python3"}
    notebook = {"cells": [cell], "metadata": {"kernelspec": kernel}, "nbformat": 4,
                "nbformat_minor": 5}  # fmt: skip
    path.write_text(json.dumps(notebook))


def _quiet_lab_settings(folder: Path) -> None:
    """User settings: no news or update checks (the test runs offline)."""
    path = folder / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))


@pytest.fixture(scope="module")
def lab():
    """A JupyterLab server on 127.0.0.1: yields the notebook's URL (with the token).

    Its folders are private and removed afterwards; its log goes to ``OUT/server.log``.
    """
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pali-kit-lab-") as folder:
        yield from _serve(Path(folder))


def _serve(home: Path):
    work = home / "work"
    work.mkdir()
    _write_notebook(work / "panel.ipynb")
    _quiet_lab_settings(home / "settings")
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(home / "settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
    )  # fmt: skip
    command = [
        sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}",
        "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly", "--allow-root",
    ]  # fmt: skip
    log_path = OUT / "server.log"
    log = open(log_path, "w")  # noqa: SIM115 (closed in finally)
    server = subprocess.Popen(
        command,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_for_server(server, f"{base}/api/status?token={token}", log_path)
        yield f"{base}/lab/tree/panel.ipynb?token={token}"
    finally:
        _stop(server)
        log.close()


def _wait_for_server(server: subprocess.Popen, url: str, log: Path, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"JupyterLab exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.25)
    pytest.fail(f"JupyterLab did not answer within {timeout_s} s:\n{log.read_text()[-3000:]}")


def _stop(server: subprocess.Popen) -> None:
    """Stop the server: SIGTERM (it shuts its kernels down), SIGKILL to its group after 10 s.

    A kernel runs in a session of its own and exits by itself within a second once
    the server is gone (ipykernel watches its parent process).
    """
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(wait_s)
            os.killpg(server.pid, signal.SIGKILL)  # kernels left behind
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


# Every value the page sets in the answer box, with its time (the streamed text), and
# every text the status line shows (a run ends with "done" or a "⚠" error).
RECORD_ANSWERS = """
window.__pkAnswers = [];
window.__pkStatus = [];
new MutationObserver(records => {
  for (const r of records) {
    const element = r.target.nodeType === 1 ? r.target : r.target.parentElement;
    const status = element && element.closest('.pk-status');
    if (status) window.__pkStatus.push(status.innerText);
  }
}).observe(document, {childList: true, subtree: true, characterData: true});
const desc = Object.getOwnPropertyDescriptor(HTMLTextAreaElement.prototype, 'value');
Object.defineProperty(HTMLTextAreaElement.prototype, 'value', {
  configurable: true,
  get() { return desc.get.call(this); },
  set(v) {
    if (this.closest('.pk-answer')) window.__pkAnswers.push([performance.now(), v]);
    desc.set.call(this, v);
  },
});
"""


@pytest.fixture(scope="module")
def page(lab):
    """The notebook open in headless Chromium, its cell run: the panel is on the page."""
    with tempfile.TemporaryDirectory(prefix="pali-kit-chromium-") as profile:
        yield from _browse(lab, profile)


def _browse(url: str, profile: str):
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1400},
        )  # fmt: skip
        try:
            context.set_default_timeout(60_000)
            context.add_init_script(RECORD_ANSWERS)
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(url)
            page.locator(".jp-Notebook .jp-Cell .cm-content").first.click()
            page.wait_for_function(
                "document.querySelector('.jp-Notebook-ExecutionIndicator')"
                "?.getAttribute('data-status') === 'idle'"
            )
            page.keyboard.press("Control+Enter")  # run the cell
            expect(page.locator(".pk-panel")).to_be_visible(timeout=RUN_TIMEOUT_MS)
            page.errors = errors
            _write_versions(page)
            yield page
        finally:
            context.close()


def _write_versions(page) -> None:
    """What the test ran with, to ``OUT/versions.json`` (the versions the docs name)."""
    from importlib.metadata import version

    names = ("jupyterlab", "ipywidgets", "jupyterlab_widgets", "ipykernel", "playwright")
    versions = {name: version(name) for name in names}
    versions["browser"] = page.evaluate("navigator.userAgent")
    (OUT / "versions.json").write_text(json.dumps(versions, indent=1) + "\n")


def panel(page):
    return page.locator(".pk-panel")


def shot(page, name: str) -> None:
    panel(page).screenshot(path=OUT / f"{name}.png")


def run_and_wait(page) -> str:
    """Click Run; wait until the status says done or shows an error; the status text."""
    page.evaluate("window.__pkAnswers = []; window.__pkStatus = []")
    page.locator(".pk-run-button").click()
    ended = "window.__pkStatus.some(s => s.includes('done') || s.includes('⚠'))"
    page.wait_for_function(ended, timeout=RUN_TIMEOUT_MS)
    return page.locator(".pk-status").inner_text()


def displayed_image(page) -> PIL.Image.Image:
    """The image the result area shows, read back from the page (the widget's PNG)."""
    img = page.locator("img.pk-result-image")
    expect(img).to_be_visible()
    shown = "i => i.complete && i.naturalWidth > 0"
    deadline = time.monotonic() + 10  # the PNG decodes just after the status says done
    while not img.evaluate(shown) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert img.evaluate(shown), "the result area shows no image"
    data = img.evaluate(
        """async img => {
            const bytes = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
            let s = ''; for (const b of bytes) s += String.fromCharCode(b);
            return btoa(s);
        }"""
    )
    return PIL.Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def choose(page, task: str, text: str) -> None:
    page.locator(".pk-image-picker select").select_option(label=SAMPLE)
    page.locator(".pk-task select").select_option(label=task)
    page.locator(".pk-text input").fill(text)


def assert_streamed(page, answer: str, name: str) -> None:
    """The answer box grew piece by piece to the final answer (values set by the page).

    What the page saw goes to ``OUT/<name>_streaming.json``: each value's time (ms).
    """
    sets = [(t, v) for t, v in page.evaluate("window.__pkAnswers") if v]
    (OUT / f"{name}_streaming.json").write_text(json.dumps(
        {"pieces": len(sets), "ms_first_to_last": sets[-1][0] - sets[0][0] if sets else None,
         "values": [[round(t - sets[0][0], 1), v] for t, v in sets]}, indent=1))  # fmt: skip
    values = [v for _, v in sets]
    assert values and values[-1] == answer
    assert len(set(values)) >= 3, f"the answer arrived in {len(set(values))} piece(s): {values}"
    assert all(b.startswith(a) for a, b in zip(values, values[1:])), values


def sample_size() -> tuple[int, int]:
    """(width, height) of the sample image the test picks, as the panel reads it."""
    height, width = load_image(ROOT / "data" / "images" / SAMPLE).shape[:2]
    return width, height


def shown_objects(page, answer: str) -> tuple[list, list[str]]:
    """The objects the panel's table lists: (the answer's parsed objects in the table's
    order, each row's box caption "label score"). Every row must be an object of the
    answer (same label, same box in whole pixels) with a score in [0, 1]."""
    rows = page.locator(".pk-objects tr").all()[1:]
    cells = [[c.inner_text().strip() for c in row.locator("td").all()] for row in rows]
    parsed = {}  # (label, box as the table writes it) -> the answer's object
    width, height = sample_size()
    for d in reversed(parse_detections(answer, width, height)):
        parsed[d.label, "(" + ", ".join(f"{v:.0f}" for v in d.box) + ")"] = d
    objects, captions = [], []
    for label, score, box, _mask in cells:
        assert 0.0 <= float(score) <= 1.0, (label, score)
        assert (label, box) in parsed, f"{label} {box} is not an object of the answer {answer!r}"
        objects.append(parsed[label, box])
        captions.append(f"{label} {score}")
    assert objects, "the table lists no objects"
    return objects, captions


def test_the_notebook_shows_one_panel(page):
    expect(panel(page)).to_have_count(1)
    expect(page.locator(".pk-image-picker select")).to_have_value(SAMPLE)
    expect(page.locator(".pk-text")).to_be_hidden()  # caption takes no text...
    expect(page.locator(".pk-prompt input")).to_have_value("caption en")  # ...its prompt shows
    expect(page.locator(".pk-thumbnail")).to_be_visible()
    shot(page, "0_loaded")
    page.screenshot(path=OUT / "0_page.png")


def test_detect_streams_the_answer_and_draws_boxes(page):
    result = page.locator(".pk-result")
    expect(result).to_be_hidden()
    choose(page, "detect: boxes around objects", "red circle ; blue square")
    expect(page.locator(".pk-prompt input")).to_have_value("detect red circle ; blue square")

    status = run_and_wait(page)

    assert "⚠" not in status
    answer = page.locator(".pk-answer textarea").input_value()
    assert "<loc" in answer
    assert_streamed(page, answer, "1_detect")
    expect(page.locator(".pk-footer")).to_contain_text("tokens/s")
    expect(result).to_be_visible()
    expect(page.locator(".pk-objects th").nth(1)).to_have_text("score")
    expect(page.locator(".pk-footer")).to_contain_text("then scoring")
    # the displayed image is the expected drawing of the listed objects of the streamed
    # answer, each box captioned with its label and score, pixel for pixel
    image = load_image(ROOT / "data" / "images" / SAMPLE)
    objects, captions = shown_objects(page, answer)
    expected = viz.draw_detections(image, objects, captions=captions)
    shown = displayed_image(page)
    assert shown.size == sample_size()
    assert np.array_equal(np.asarray(shown), np.asarray(expected))
    assert not np.array_equal(np.asarray(shown), image)  # boxes were drawn
    shot(page, "1_detect")

    # the code line is shown, and one click selects all of it to copy
    code = page.locator(".pk-code-line")
    code.click()
    selected = page.evaluate("window.getSelection().toString()")
    assert selected == code.inner_text()
    assert selected.startswith("model.detect(image, ['red circle', 'blue square'], ")


def test_segment_draws_masks(page):
    choose(page, "segment: masks of objects", "yellow triangle")
    status = run_and_wait(page)

    assert "⚠" not in status and "no masks" not in status
    answer = page.locator(".pk-answer textarea").input_value()
    assert "<seg" in answer
    assert_streamed(page, answer, "2_segment")
    expect(page.locator(".pk-objects")).to_contain_text("mask")
    # masks are filled: inside the boxes the image differs from a drawing of boxes alone
    image = load_image(ROOT / "data" / "images" / SAMPLE)
    detections, captions = shown_objects(page, answer)
    boxes_only = np.asarray(
        viz.draw_detections(image, detections, show_masks=False, captions=captions)
    )
    shown = np.asarray(displayed_image(page))
    assert shown.shape == (*sample_size()[::-1], 3)
    x0, y0, x1, y1 = (round(v) for v in detections[0].box)
    inside = np.any(shown[y0:y1, x0:x1] != boxes_only[y0:y1, x0:x1], axis=-1)
    assert inside.mean() > 0.05, f"only {inside.mean():.1%} of the box is covered by a mask"
    shot(page, "2_segment")


def test_a_bad_upload_shows_an_error_in_the_panel(page):
    with page.expect_file_chooser() as chooser:
        page.locator(".pk-upload").click()
    chooser.value.set_files(
        {"name": "broken.png", "mimeType": "image/png", "buffer": b"this is not a png"}
    )
    status = page.locator(".pk-status")
    expect(status).to_contain_text("could not use upload: broken.png")
    expect(status).to_contain_text("⚠")
    expect(page.locator(".pk-image-picker select")).to_have_value(SAMPLE)  # image kept
    shot(page, "3_bad_upload")


def test_an_empty_question_shows_an_error_and_clears_the_old_answer(page):
    if not page.locator(".pk-answer textarea").input_value():  # run alone: make an answer
        choose(page, "detect: boxes around objects", "red circle")
        assert "⚠" not in run_and_wait(page)
    expect(page.locator(".pk-answer textarea")).not_to_have_value("")
    choose(page, "answer: answer a question", "")
    status = run_and_wait(page)
    assert "⚠" in status and "the answer task needs a question" in status
    expect(page.locator(".pk-answer textarea")).to_have_value("")
    expect(page.locator(".pk-result")).to_be_hidden()
    expect(page.locator(".pk-footer")).to_have_text("")
    shot(page, "4_empty_question")


def test_the_weights_selector_makes_int8_weights_and_runs_them(page):
    info, code = page.locator(".pk-weights-info"), page.locator(".pk-code-line")
    expect(page.locator(".pk-weights select")).to_have_value("float32")
    expect(info).to_contain_text("MB of weights")
    page.locator(".pk-weights select").select_option(label="int8")
    expect(info).to_contain_text("x the loaded float32")  # made in the kernel, from memory
    choose(page, "answer: answer a question", "how many shapes")
    expect(code).to_contain_text("model.quantize('int8').generate(image, 'answer en how many")
    status = run_and_wait(page)
    assert "⚠" not in status
    assert page.locator(".pk-answer textarea").input_value().strip().isdigit()
    shot(page, "5_int8_weights")
    page.locator(".pk-weights select").select_option(label="float32")  # back, for what follows
    expect(code).to_contain_text("model.generate(image, ")


def test_no_uncaught_errors_in_the_page(page):
    assert page.errors == []
