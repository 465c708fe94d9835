"""The README's screenshots: each main page of the app on a sample run, in headless Chromium.

    python analysis/screenshots.py [--run sample_runs/study] [--out docs/screenshots]

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

# (page path, query string, file name, charts it draws at least): the views the README shows.
PAGES = (
    ("runs", "", "runs.png", 0),
    ("regions", "p=0.5", "regions.png", 2),
    ("overlap", "layer=10", "overlap.png", 2),
    ("grouping", "tau=0.007", "grouping.png", 2),
    ("fusion", "", "fusion.png", 2),
    ("drift", "", "drift.png", 1),
    ("compare", "", "compare.png", 2),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=str(ROOT / "sample_runs" / "study"))
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
            for path, query, name, charts in PAGES:
                page.goto(f"{url}/{path}?{query}", timeout=180_000)
                # Drawn when no spinner or loading skeleton is left and the page's charts have their SVG.
                page.wait_for_function(
                    "charts => document.querySelector('h1') && "
                    "!document.querySelector('[data-testid=\"stSpinner\"], [data-testid=\"stSkeleton\"]') && "
                    "document.querySelectorAll('.stPlotlyChart svg.main-svg').length >= charts",
                    arg=charts, timeout=180_000,
                )
                page.wait_for_timeout(1500)
                page.screenshot(path=str(out / name), full_page=True)
                print(f"{name}: {path}?{query}")
            browser.close()


if __name__ == "__main__":
    main()
