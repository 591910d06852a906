"""The notebooks' widgets in a real browser: each notebook is served as a Voilà app on 127.0.0.1 (through
`taskvec lab --voila`, so the launcher and its kernel are tested too) and driven with Playwright in Chromium.

Opt-in, never part of the default CI run: ``TASKVEC_BROWSER=1 python -m pytest -m browser tests/test_browser.py``
in an environment with the ui extra (``pip install -c constraints.txt -e ".[zoo,ui]" pytest``) and a Chromium
(Debian: ``apt-get install chromium``; ``TASKVEC_CHROMIUM`` names another executable; Playwright's own
browser download is not needed). Screenshots go to ``figures/ui/`` (``TASKVEC_UI_SCREENSHOTS`` overrides).

What "works" means here: the page renders every control, no cell or callback raised (no Voilà error, no Python
traceback in an output area or in the server's log, no JavaScript error other than the offline CDN fonts), and
moving a slider or changing a dropdown changes the picture. `test_the_harness_fails_on_a_broken_callback` keeps
the harness honest: a notebook whose slider callback raises must fail these checks.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import pytest

from taskvec.lab_launcher import have

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(os.environ.get("TASKVEC_BROWSER", "0") in ("", "0"),
                       reason="browser tests are opt-in: set TASKVEC_BROWSER=1 (needs the ui extra and Chromium)"),
]


def chromium() -> str | None:
    for candidate in (os.environ.get("TASKVEC_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@pytest.fixture(scope="module")
def browser():
    missing = [m for m in ("voila", "playwright", "ipykernel") if not have(m)]
    if missing:
        pytest.skip(f"browser tests need {', '.join(missing)}: pip install -c constraints.txt -e '.[zoo,ui]'")
    exe = chromium()
    if exe is None:
        pytest.skip("browser tests need Chromium: apt-get install -y chromium (or set TASKVEC_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots() -> Path:
    d = Path(os.environ.get("TASKVEC_UI_SCREENSHOTS") or REPO / "figures" / "ui")
    d.mkdir(parents=True, exist_ok=True)
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Offline machines can't reach the CDN that Voilà's template loads Font Awesome from: icons only, not of note.
IGNORED_HOSTS = {"cdn.jsdelivr.net", "unpkg.com", "cdnjs.cloudflare.com", "fonts.googleapis.com"}
TRACEBACK = re.compile(r"Traceback \(most recent call last\)|Exception in comm_msg|There was an error when executing")


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def kernel_message(payload) -> tuple[str | None, dict]:
    """(msg_type, content) of a Jupyter kernel websocket frame: JSON text (the legacy protocol) or the binary
    v1.kernel.websocket.jupyter.org framing (uint64 count, uint64 offsets, then channel, header, parent header,
    metadata, content, buffers)."""
    import json
    import struct

    try:
        if isinstance(payload, str):
            msg = json.loads(payload)
            return msg.get("msg_type") or msg.get("header", {}).get("msg_type"), msg.get("content") or {}
        n = struct.unpack_from("<Q", payload, 0)[0]
        offsets = list(struct.unpack_from(f"<{n}Q", payload, 8))
        parts = [payload[a:b] for a, b in zip(offsets, offsets[1:] + [len(payload)])]
        return json.loads(parts[1]).get("msg_type"), json.loads(parts[4])
    except (ValueError, KeyError, IndexError, struct.error, UnicodeDecodeError, AttributeError):
        return None, {}


@dataclass
class App:
    """A notebook served by Voilà and open in a browser page, with everything that went wrong on the way."""

    page: object
    log: Path
    problems: list[str] = field(default_factory=list)   # JavaScript errors and failed local requests
    log_seen: int = 0

    def _on_console(self, msg):
        if msg.type != "error":
            return
        host = urlparse((msg.location or {}).get("url") or "").hostname
        if "Failed to load resource" in msg.text and host in IGNORED_HOSTS:
            return
        self.problems.append(f"console error: {msg.text} ({(msg.location or {}).get('url')})")

    def _on_failed(self, request):
        if urlparse(request.url).hostname not in IGNORED_HOSTS:
            self.problems.append(f"request failed: {request.url} ({request.failure})")

    def _on_websocket(self, ws):
        ws.on("framereceived", self._on_frame)

    def _on_frame(self, payload):
        """Kernel messages as they reach the page. A widget callback's exception reaches no output area by itself
        (ipywidgets sends it as an `error` message that no output area owns; taskvec's View also prints it into
        the widget), but it always crosses here."""
        msg_type, content = kernel_message(payload)
        if msg_type == "error":
            trace = ANSI.sub("", "\n".join(content.get("traceback", [])))
            self.problems.append(f"the kernel raised {content.get('ename')}: {content.get('evalue')}\n{trace[-3000:]}")
        elif msg_type == "stream" and TRACEBACK.search(content.get("text", "")):
            self.problems.append(f"the kernel printed a traceback: {ANSI.sub('', content['text'])[-3000:]}")

    def errors(self) -> list[str]:
        """Everything of note that went wrong so far: JS errors, Voilà error cells, tracebacks in the page's
        output areas or in the server's log (a kernel logs a widget callback's exception there)."""
        found = list(self.problems)
        for text in self.page.locator(".jp-OutputArea-output").all_inner_texts():
            if TRACEBACK.search(text) or re.search(r"^\w+(Error|Exception): ", text, re.M):
                found.append(f"error in an output area: {text[:2000]}")
        for text in self.page.locator(".voila-error, .jp-RenderedText[data-mime-type='application/vnd.jupyter.stderr']"
                                      ).all_inner_texts():
            if TRACEBACK.search(text) or "Error" in text:
                found.append(f"error output: {text[:2000]}")
        log = self.log.read_text(errors="replace")
        for m in TRACEBACK.finditer(log):
            found.append(f"in the server log: {log[m.start():m.start() + 3000]}")
        return found

    def assert_clean(self):
        errors = self.errors()
        assert not errors, "\n\n".join(errors)

    def view(self, label: str):
        """The widget box of the view that has a control labelled `label`."""
        return self.page.locator(".widget-vbox").filter(
            has=self.page.locator(".widget-label", has_text=re.compile(f"^{re.escape(label)}$"))).last

    def control(self, label: str, kind: str):
        return self.page.locator(f".widget-{kind}").filter(
            has=self.page.locator(".widget-label", has_text=re.compile(f"^{re.escape(label)}$"))).last

    def shown(self, view) -> str:
        """What a view's output shows: its figure's bytes (the img src) or its table / text."""
        out = view.locator(".widget-output .jp-OutputArea-output")
        img = out.locator("img")
        if img.count():
            return img.first.get_attribute("src") or ""
        return " ".join(out.all_inner_texts())

    def readout(self, label: str) -> str:
        return self.control(label, "slider").locator(".widget-readout").inner_text().strip()

    def press_slider(self, label: str, key: str = "ArrowRight", times: int = 1):
        """Move a slider by `times` steps from the keyboard (a focused noUiSlider handle takes arrow keys)."""
        handle = self.control(label, "slider").locator(".noUi-handle")
        handle.scroll_into_view_if_needed()
        handle.focus()
        for _ in range(times):
            handle.press(key)

    def choose(self, label: str, option: str):
        select = self.control(label, "dropdown").locator("select")
        select.scroll_into_view_if_needed()
        select.select_option(option)

    def wait_changed(self, view, before: str, what: str, timeout: float):
        """Wait until the view's output differs from `before` (and is not empty); fail with what went wrong."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = self.shown(view)
            if now and now != before:
                return now
            if self.errors():
                break
            self.page.wait_for_timeout(250)
        errors = self.errors()
        raise AssertionError(f"{what}: the view's output did not change"
                             + (f"; errors:\n" + "\n\n".join(errors) if errors else f" within {timeout:g} s"))


@contextmanager
def served(notebook: Path, browser, tmp_path: Path, *, fast: bool = True, timeout: float = 900):
    """Serve `notebook` with `taskvec lab --voila` on a free 127.0.0.1 port; yield an App once its widgets
    are on the page. The figures the notebook saves go to a temporary folder."""
    port = free_port()
    log = tmp_path / f"voila-{notebook.stem}.log"
    env = {**os.environ, "TASKVEC_FIGURES": str(tmp_path / "figures"), "TASKVEC_NO_PROGRESS": "1",
           "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "taskvec.cli", "lab", "--voila", str(notebook), "--port", str(port),
            "--no-browser", *(["--fast"] if fast else []), "--", "--VoilaConfiguration.show_tracebacks=True"]
    with open(log, "w") as out:
        server = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=notebook.parent,
                                  start_new_session=True)
    context = None
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 120
        while True:   # up when it answers HTTP at all
            try:
                urllib.request.urlopen(url + "api/", timeout=5)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"Voilà did not start (exit {server.poll()}):\n{log.read_text()}")
                time.sleep(0.3)
        context = browser.new_context(viewport={"width": 1200, "height": 1000})
        page = context.new_page()
        app = App(page, log)
        page.on("console", app._on_console)
        page.on("pageerror", lambda e: app.problems.append(f"page error: {e}"))
        page.on("requestfailed", app._on_failed)
        page.on("websocket", app._on_websocket)
        # Voilà runs the whole notebook before the widgets appear: wait for the page, then for the controls
        page.goto(url, timeout=timeout * 1000, wait_until="domcontentloaded")
        page.wait_for_selector(".widget-slider, .widget-dropdown, .voila-error", timeout=timeout * 1000)
        page.wait_for_load_state("networkidle", timeout=timeout * 1000)
        yield app
    finally:
        if context is not None:
            context.close()
        # the launcher and the Voilà server it started, one process group (their kernels exit with Voilà)
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
            try:
                os.killpg(server.pid, sig)
            except ProcessLookupError:
                break
            try:
                server.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue


def expect_controls(app: App, sliders: list[str], dropdowns: list[str]):
    for label in sliders:
        assert app.control(label, "slider").count(), f"no slider labelled {label!r} on the page"
    for label in dropdowns:
        assert app.control(label, "dropdown").count(), f"no dropdown labelled {label!r} on the page"


def drive(app: App, slider: str, readout: str, dropdown: str | None = None, option: str | None = None, *,
          key: str = "ArrowRight", times: int = 1, timeout: float = 60):
    """Move `slider` from the keyboard (its readout must then read `readout`), then pick `option` in
    `dropdown`: the view's output must change after each. Returns the view."""
    view = app.view(slider)
    before, old = app.shown(view), app.readout(slider)
    app.press_slider(slider, key, times)
    assert app.readout(slider) == readout
    now = app.wait_changed(view, before, f"{slider} {old} -> {readout}", timeout)
    if dropdown is not None:
        app.choose(dropdown, option)
        app.wait_changed(view, now, f"{dropdown} -> {option}", timeout)
    return view


def test_tour_widgets_render_and_respond(browser, shots, tmp_path):
    with served(NOTEBOOKS / "00_model_merging_tour.ipynb", browser, tmp_path) as app:
        app.assert_clean()
        expect_controls(app, ["λ", "density k", "drop rate p", "seed", "t"], ["negate task", "elect by"])
        assert app.page.locator(".widget-output img").count() >= 4   # one figure per view
        app.page.screenshot(path=shots / "00-tour-page.png")   # the app as it opens

        app.view("λ").screenshot(path=shots / "00-tour-task-arithmetic-before.png")
        drive(app, "λ", "0.55", "negate task", "A").screenshot(path=shots / "00-tour-task-arithmetic-after.png")
        drive(app, "density k", "0.25", "elect by", "count", key="ArrowLeft", times=2).screenshot(
            path=shots / "00-tour-ties-after.png")
        drive(app, "seed", "1")                                  # an IntSlider, in the DARE view
        app.assert_clean()


def test_dare_notebook_widgets_render_and_respond(browser, shots, tmp_path):
    with served(NOTEBOOKS / "04_dare.ipynb", browser, tmp_path) as app:
        app.assert_clean()
        expect_controls(app, ["drop rate p"], ["task"])
        app.view("drop rate p").screenshot(path=shots / "04-dare-slider-before.png")
        tasks = app.control("task", "dropdown").locator("option").all_inner_texts()
        # p 0.90 -> 0.89, then the second task: each is one evaluation on the fast zoo
        view = drive(app, "drop rate p", "0.89", "task", tasks[1], key="ArrowLeft", timeout=300)
        view.screenshot(path=shots / "04-dare-slider-after.png")
        app.assert_clean()


BROKEN = '''\
%matplotlib inline
import matplotlib.pyplot as plt
from taskvec.widgets import Control, interact

def view(x):
    if x != 0.5 and {broken}:
        raise RuntimeError("deliberately broken slider callback")
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.bar([0], [x])
    ax.set_ylim(0, 1)
    plt.close(fig)
    return fig

interact(view, Control("x", 0.5, 0.0, 1.0, 0.1, label="x"))
'''


def tiny_notebook(path: Path, broken: bool) -> Path:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(BROKEN.format(broken=broken))]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


@pytest.mark.parametrize("broken", [False, True], ids=["working", "broken"])
def test_the_harness_fails_on_a_broken_callback(browser, tmp_path, broken):
    """The same checks as above on a one-cell notebook: they pass when the callback works and fail, naming the
    exception, when it raises (taskvec's View prints the traceback into the widget's output area, re-raises, and
    the figure is gone)."""
    nb = tiny_notebook(tmp_path / ("broken.ipynb" if broken else "working.ipynb"), broken)
    with served(nb, browser, tmp_path, fast=False, timeout=120) as app:
        app.assert_clean()
        if not broken:
            drive(app, "x", "0.60", timeout=30)
            app.assert_clean()
            return
        with pytest.raises(AssertionError, match="deliberately broken slider callback") as failure:
            drive(app, "x", "0.60", timeout=30)
            app.assert_clean()
        assert "RuntimeError" in str(failure.value)
