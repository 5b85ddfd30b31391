"""The course in a real browser: JupyterLab driven by headless Chromium (Playwright), as a learner meets it.

A student notebook shows no error output, only pending lines for unwritten exercises, and
live widgets that come back after it is saved and reopened (the widget-state setting the
course installs); a solution notebook shows a passed report under every check cell. A
screenshot of the student chapter is kept in ``.ci/artifacts/``. Chromium comes from the
system (Debian's ``chromium``), never Playwright's own download.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTER = "01_logits_softmax_cross_entropy"
ARTIFACTS = ROOT / ".ci" / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no Chromium: install it with `apt-get install -y chromium` (.ci/run does)",
    ),
]
playwright = pytest.importorskip(
    "playwright.sync_api", reason="no Playwright: python3 -m pip install playwright"
)

#: What the open notebook shows: error outputs, tracebacks, widgets and check lines.
SNAPSHOT_JS = """() => {
  const nb = window.jupyterapp.shell.currentWidget;
  const outs = [...nb.node.querySelectorAll('.jp-OutputArea-output')];
  const text = (e) => e.textContent || '';
  const modelWidgets = nb.content.widgets.filter(c => c.model.type === 'code')
      .map(c => c.model.outputs.toJSON().filter(o => o.data &&
          o.data['application/vnd.jupyter.widget-view+json']).length)
      .reduce((a, b) => a + b, 0);
  const rendered = outs.filter(e => !e.parentElement.closest('.widget-output') &&
      e.querySelector(':scope > .jupyter-widgets'));
  const checks = nb.content.widgets.filter(c => c.model.type === 'code' &&
      c.model.sharedModel.getSource().includes('cu.check('));
  return {
    errors: outs.filter(e => e.getAttribute('data-mime-type') ===
        'application/vnd.jupyter.stderr' || text(e).includes('Traceback')).map(text),
    widgetOutputs: modelWidgets,
    widgetsRendered: rendered.length,
    widgetAsText: outs.filter(e => text(e).includes('Error displaying widget') ||
        text(e).startsWith('interactive(')).length,
    checkCells: checks.length,
    checkOutputs: checks.map(c => [...c.node.querySelectorAll('.jp-OutputArea-output')]
        .map(text).join(' ')),
  };
}"""

RAN_JS = """() => {
  const nb = window.jupyterapp.shell.currentWidget;
  const kernel = nb.sessionContext.session && nb.sessionContext.session.kernel;
  const cells = nb.content.widgets.filter(c => c.model.type === 'code');
  return kernel && kernel.status === 'idle' && cells.every(c => c.model.executionCount !== null);
}"""


#: Where a notebook that did not finish stands: kernel status and cells not run yet.
STATE_JS = """() => {
  const nb = window.jupyterapp.shell.currentWidget;
  const k = nb.sessionContext.session && nb.sessionContext.session.kernel;
  const cells = nb.content.widgets.filter(c => c.model.type === 'code');
  return {kernel: k ? k.status : 'none', notRun: cells.map((c, i) => [i, c.model.executionCount])
      .filter(([i, n]) => n === null).map(([i]) => i).slice(0, 5), cells: cells.length};
}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A JupyterLab on a free loopback port serving copies of the notebooks; its base URL with token."""
    folder = tmp_path_factory.mktemp("lab")
    shutil.copy(ROOT / "course" / f"{CHAPTER}.ipynb", folder / "student.ipynb")
    shutil.copy(ROOT / "solutions" / f"{CHAPTER}.ipynb", folder / "solution.ipynb")
    # The settings the course's wheel installs into JupyterLab (an editable install cannot):
    # the same file, served from a settings folder of the test's own.
    overrides = folder / "app_settings" / "overrides.d"
    overrides.mkdir(parents=True)
    shutil.copy(ROOT / "course_utils" / "jupyter" / "course-utils.json", overrides)
    port, token = _free_port(), secrets.token_hex(16)
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1"]
    cmd += [f"--LabApp.app_settings_dir={folder / 'app_settings'}"]
    cmd += [f"--port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={folder}"]
    cmd += ["--LabApp.expose_app_in_browser=True", "--ServerApp.open_browser=False"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # as in a container
    env = dict(
        os.environ,
        COURSE_STRICT="0",
        COURSE_PROGRESS="0",
        MPLBACKEND="module://matplotlib_inline.backend_inline",
    )
    log = (folder / "lab.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(
                        f"JupyterLab did not start: {(folder / 'lab.log').read_text()[-500:]}"
                    )
                time.sleep(0.3)
        yield f"{base}|{token}"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _run_notebook(
    lab: str, name: str, screenshot: Path | None = None, reopen: bool = False
) -> tuple[dict, dict | None]:
    """Open ``name``, run every cell and take a snapshot; with ``reopen``, save, reload and snapshot again."""
    base, token = lab.split("|")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            _open(page, base, token, name)
            page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
            page.wait_for_timeout(500)
            try:
                page.wait_for_function(RAN_JS, timeout=240_000)
            except playwright.Error:
                state = page.evaluate(STATE_JS)
                pytest.fail(f"{name} did not finish running in the browser: {state}")
            page.wait_for_timeout(1500)  # widget views render after the kernel goes idle
            if screenshot is not None:
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(screenshot))
            seen = page.evaluate(SNAPSHOT_JS)
            if not reopen:
                return seen, None
            page.evaluate("window.jupyterapp.commands.execute('docmanager:save')")
            page.wait_for_function(
                "() => !window.jupyterapp.shell.currentWidget.context.model.dirty", timeout=30_000
            )
            page.evaluate("window.jupyterapp.commands.execute('kernelmenu:shutdown')")
            page.close()
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            _open(page, base, token, name)
            # the saved widget state is restored after the kernel is up: wait until every
            # widget output shows either a control or an error
            settled = f"() => {{ const s = ({SNAPSHOT_JS})(); return s.widgetOutputs > 0 &&"
            settled += " s.widgetsRendered + s.widgetAsText >= s.widgetOutputs; }"
            try:
                page.wait_for_function(settled, timeout=30_000)
            except playwright.Error:
                pass  # judged by the test from the snapshot below
            return seen, page.evaluate(SNAPSHOT_JS)
        finally:
            browser.close()


def _open(page: Any, base: str, token: str, name: str) -> None:
    # a workspace of its own, reset: JupyterLab would otherwise reopen the tabs of the
    # previous test and the notebook under test might not be the current one
    workspace = f"w{secrets.token_hex(4)}"
    page.goto(f"{base}/lab/workspaces/{workspace}/tree/{name}?token={token}&reset")
    page.wait_for_function(
        "() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
        " const k = w && w.sessionContext && w.sessionContext.session &&"
        " w.sessionContext.session.kernel; return k && k.status === 'idle'; }",
        timeout=120_000,
    )


def test_a_student_notebook_shows_pending_lines_and_live_widgets_and_no_error(lab: str) -> None:
    seen, reopened = _run_notebook(
        lab, "student.ipynb", screenshot=ARTIFACTS / f"browser_{CHAPTER}.png", reopen=True
    )
    assert seen["errors"] == [], seen["errors"][:2]
    assert seen["checkCells"] >= 5
    for output in seen["checkOutputs"]:
        assert "not implemented yet (pending)" in output, output[:200]
    assert seen["widgetOutputs"] >= 1 and seen["widgetsRendered"] == seen["widgetOutputs"]
    assert seen["widgetAsText"] == 0
    assert (ARTIFACTS / f"browser_{CHAPTER}.png").stat().st_size > 10_000
    # saved, closed and reopened: the widgets come back from the state saved with the notebook
    assert reopened["widgetAsText"] == 0, "a reopened widget shows 'Error displaying widget'"
    assert reopened["widgetOutputs"] == seen["widgetOutputs"]
    assert reopened["widgetsRendered"] == reopened["widgetOutputs"]


def test_a_solution_notebook_shows_a_passed_report_under_every_check(lab: str) -> None:
    seen, _ = _run_notebook(lab, "solution.ipynb")
    assert seen["errors"] == [], seen["errors"][:2]
    nb = nbformat.read(ROOT / "solutions" / f"{CHAPTER}.ipynb", as_version=4)
    expected = sum("cu.check(" in c.source for c in nb.cells if c.cell_type == "code")
    assert seen["checkCells"] == expected
    for output in seen["checkOutputs"]:
        assert ": passed" in output, output[:200]
