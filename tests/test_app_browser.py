"""The app in a real browser: ``streamlit run`` on a free localhost port, driven by headless Chromium.

Opens every page at its own URL path (deep links), and the Grouping page on the tiny run, where it
moves τ with the keyboard and checks that the graph and the groups change; a screenshot of each
state is saved under the test's tmp path. Chromium is Debian's ``chromium`` package: installed
here with apt when it is missing and this runs as root; the test is skipped, saying why, only
where it cannot be installed. The server is started by ``app/serve.py``, as for the README's
screenshots.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "app"))  # app/ is not a package

from serve import APP, CHROMIUM, running_app


def ensure_chromium() -> None:
    """Install Debian's chromium where it is missing (as root, with apt); skip when that cannot be done."""
    if os.path.exists(CHROMIUM):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"{CHROMIUM} is missing and cannot be installed here (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]):
        done = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=900)
        if done.returncode != 0:
            pytest.skip(f"could not install chromium: `{' '.join(command)}` failed: {done.stderr.strip()[-300:]}")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"apt installed chromium but {CHROMIUM} does not exist")


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    """``streamlit run app/main.py`` on a free port, opening the tiny run by default."""
    with running_app(tiny_run.path, tmp_path_factory.mktemp("streamlit") / "server.log") as url:
        yield url


def app_pages() -> list[tuple[str, str]]:
    """``(url_path, title)`` of each page in the app's menu, read from the ``st.Page`` calls of app/main.py."""
    pages = []
    for node in ast.walk(ast.parse(APP.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "Page":
            options = {keyword.arg: ast.literal_eval(keyword.value) for keyword in node.keywords}
            if options.get("url_path"):  # the root ("") is not a menu entry
                pages.append((options["url_path"], options["title"]))
    return pages


def graph_title(page, showing: str) -> str:
    """The similarity graph's title once plotly has drawn one containing ``showing`` and the
    previous graph is gone (while a fragment reruns, the old chart stays until the new one is drawn)."""
    page.wait_for_function(
        "text => { const titles = [...document.querySelectorAll('.gtitle')]"
        ".filter(t => t.textContent.includes('Tasks linked at'));"
        " return titles.length === 1 && titles[0].textContent.includes(text); }",
        arg=showing, timeout=120_000,
    )
    return page.locator(".gtitle", has_text="Tasks linked at τ").text_content()


def test_every_page_opens_at_its_own_url_path(server):
    pages = app_pages()
    assert {"runs", "regions", "overlap", "grouping", "fusion", "drift", "training", "compare"} <= dict(pages).keys()
    ensure_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        try:
            page = browser.new_page()
            for path, title in [*pages, ("", "Runs")]:  # the root opens the Runs page, at /runs
                page.goto(f"{server}/{path}", timeout=120_000)
                page.locator("h1", has_text=title).wait_for(timeout=120_000)
                # "Page not found" arrives before the page's elements, so it would be shown by now.
                assert page.get_by_text("Page not found").count() == 0, f"/{path}"
            page.wait_for_url(re.compile(re.escape(server) + r"/runs(\?|$)"), timeout=30_000)
        finally:
            browser.close()


def test_grouping_page_tau_slider_in_chromium(server, tiny_run, tmp_path):
    ensure_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1600})
            page.goto(f"{server}/grouping?tau=0.0", timeout=120_000)
            before = graph_title(page, "1 group,")  # τ = 0 links every pair
            legend_before = page.locator(".legendtext").all_text_contents()
            page.screenshot(path=str(tmp_path / "grouping-tau-0.png"), full_page=True)

            thumb = page.get_by_role("slider", name="τ: link threshold on the Jaccard overlap")
            thumb.focus()
            thumb.press("End")  # the slider's largest τ: above every overlap, each task alone
            n_tasks = len(tiny_run.config["data"]["tasks"])
            after = graph_title(page, f"{n_tasks} groups, 0 edges")
            assert after != before
            legend_after = page.locator(".legendtext").all_text_contents()
            assert legend_after != legend_before
            assert sum(text.startswith("group ") for text in legend_after) == n_tasks
            assert "tau=" in page.url and "tau=0.0" not in page.url  # the new τ is in the link
            page.screenshot(path=str(tmp_path / "grouping-tau-max.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "grouping-tau-max.png").stat().st_size > 10_000
