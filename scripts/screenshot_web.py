"""Redraw the README's web-page screenshot with the bundled model (docs/figures/web_demo.png).

    python scripts/screenshot_web.py [--word 5] [--out docs/figures/web_demo.png]

Serves the real app on a free loopback port, uploads matplotlib's sample photo (Grace Hopper: the
repo's figures may only show photos that ship inside installed packages) in headless Chromium,
pins one word's attention overlay and takes the screenshot. Needs Debian `chromium` and
`playwright` (both installed by `.ci/run`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import matplotlib
from playwright import sync_api

from captioner.api import Captioner
from captioner.web.app import create_app
from captioner.web.background import BackgroundServer

REPO = Path(__file__).resolve().parents[1]
PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
CHROMIUM = os.environ.get("CAPTIONER_CHROMIUM", "/usr/bin/chromium")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--word", type=int, default=5, help="which word's attention to pin")
    parser.add_argument("--out", default=str(REPO / "docs" / "figures" / "web_demo.png"))
    args = parser.parse_args()

    app = create_app(Captioner.from_pretrained)  # the bundled model
    with BackgroundServer(app) as server, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(server.url)
        page.set_input_files("#file", str(PHOTO))
        words = page.locator("#words .word")
        words.first.wait_for(timeout=60_000)
        words.nth(args.word).click()
        page.mouse.move(5, 5)
        page.screenshot(path=args.out)
        print(f"caption: {page.locator('#caption').inner_text()}")
        print(f"wrote {args.out}")
        browser.close()


if __name__ == "__main__":
    main()
