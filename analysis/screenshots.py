"""The README's screenshots: each main page of the app on a sample run, in headless Chromium.

    python analysis/screenshots.py [--run sample_runs/all_methods] [--out docs/screenshots]

Starts the app on a free localhost port (``app/serve.py``), opens each page, waits until its
figures are drawn and saves a PNG per page. Needs Debian's ``chromium`` (``/usr/bin/chromium``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "app"))

from serve import CHROMIUM, running_app  # noqa: E402

# (page path, query string, file name): the views the README shows.
PAGES = (
    ("runs", "", "runs.png"),
    ("regions", "p=0.5", "regions.png"),
    ("overlap", "layer=10", "overlap.png"),
    ("grouping", "tau=0.007", "grouping.png"),
    ("fusion", "", "fusion.png"),
    ("drift", "", "drift.png"),
    ("compare", "", "compare.png"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=str(ROOT / "sample_runs" / "all_methods"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    parser.add_argument("--width", type=int, default=1400)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, running_app(args.run, Path(tmp) / "server.log") as url:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
            page = browser.new_page(viewport={"width": args.width, "height": 1000})
            for path, query, name in PAGES:
                page.goto(f"{url}/{path}?{query}", timeout=180_000)
                # Drawn when Streamlit has stopped running the script and every plotly chart has its SVG.
                page.wait_for_selector("[data-testid='stApp']", timeout=180_000)
                page.wait_for_function(
                    "() => !document.querySelector('[data-testid=\"stStatusWidget\"]') && "
                    "[...document.querySelectorAll('.stPlotlyChart')].every(c => c.querySelector('svg.main-svg'))",
                    timeout=180_000,
                )
                page.wait_for_timeout(1500)
                page.screenshot(path=str(out / name), full_page=True)
                print(f"{name}: {path}?{query}")
            browser.close()


if __name__ == "__main__":
    main()
