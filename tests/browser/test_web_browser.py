"""The web page in a real headless browser (Debian chromium driven by Playwright).

The app runs under uvicorn in a background thread on a free loopback port with the
FakeCaptioner, so no trained model is needed. Screenshots go to /tmp/web_*.png.
"""

from __future__ import annotations

import base64
import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from web_fakes import FakeCaptioner  # noqa: E402

CHROMIUM = os.environ.get("CAPTIONER_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [pytest.mark.browser, pytest.mark.slow]

if not Path(CHROMIUM).exists():
    pytest.skip(
        f"{CHROMIUM} not found (apt-get install chromium to run browser tests)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright not installed (pip install playwright)"
)

SCREENSHOTS = Path("/tmp")


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def server_url():
    from captioner.web.app import ServeSettings, create_app
    from captioner.web.background import BackgroundServer

    fake = FakeCaptioner(delay_s=0.05)
    app = create_app(lambda: fake, ServeSettings(max_upload_mb=2))
    with BackgroundServer(app, start_timeout_s=20) as server:  # the fake loads at once
        yield server.url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def photo(tmp_path) -> Path:
    """A synthetic 'photo': sky gradient, grass, a sun and a red house."""
    w, h = 640, 427
    y = np.linspace(0, 1, h)[:, None, None]
    sky = (np.array([90, 150, 230]) * (1 - y) + np.array([200, 225, 250]) * y).astype(np.uint8)
    img = Image.fromarray(np.broadcast_to(sky, (h, w, 3)).copy())
    d = ImageDraw.Draw(img)
    d.rectangle([0, 300, w, h], fill=(70, 150, 60))
    d.ellipse([470, 50, 560, 140], fill=(250, 210, 60))
    d.rectangle([140, 200, 300, 320], fill=(190, 50, 40))
    d.polygon([(120, 205), (220, 120), (320, 205)], fill=(110, 40, 30))
    d.rectangle([200, 260, 240, 320], fill=(60, 35, 25))
    path = tmp_path / "house.png"
    img.save(path)
    return path


def new_page(browser, server_url, width, height, errors):
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))

    def on_console(msg):
        # Chromium logs every non-2xx fetch as "Failed to load resource"; those are expected.
        if msg.type == "error" and "Failed to load resource" not in msg.text:
            errors.append(f"console: {msg.text}")

    page.on("console", on_console)
    page.goto(server_url + "/")
    sync_api.expect(page.locator("#health")).to_contain_text("model ready", timeout=10_000)
    return context, page


OVERLAY_JS = """() => {
  const c = document.getElementById('overlay');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0, best = -1, bx = 0, by = 0;
  for (let i = 3; i < d.length; i += 4) {
    if (d[i] > 0) n++;
    if (d[i] > best) {
      best = d[i];
      const p = (i - 3) / 4;
      bx = p % c.width;
      by = Math.floor(p / c.width);
    }
  }
  return {n, w: c.width, h: c.height, maxAlpha: best, x: bx / c.width, y: by / c.height,
          token: c.dataset.token ?? null};
}"""


def overlay(page) -> dict:
    return page.evaluate(OVERLAY_JS)


def expected_cell(t: int, g: int = 7) -> tuple[float, float]:
    """Centre (x, y) in [0, 1] of the FakeCaptioner's attention blob for token t."""
    cy, cx = (t * 2 + 1) % g, (t * 3 + 1) % g
    return (cx + 0.5) / g, (cy + 0.5) / g


def upload_and_check_caption(page, photo: Path):
    page.set_input_files("#file", str(photo))
    sync_api.expect(page.locator("#caption")).to_contain_text(
        "picture 512x342", timeout=10_000
    )  # decoded at <= 512 px
    words = page.locator("#words .word")
    assert words.count() == 7
    assert page.locator("#alternatives li").count() == 3
    assert page.locator("#preview").evaluate("img => img.complete && img.naturalWidth") == 640


# --------------------------------------------------------------------------- tests
def test_caption_and_attention_overlay_desktop(browser, server_url, photo):
    errors: list[str] = []
    context, page = new_page(browser, server_url, 1280, 860, errors)
    try:
        upload_and_check_caption(page, photo)
        assert overlay(page)["n"] == 0  # nothing drawn before a word is chosen

        # hover: the overlay shows that word's map, hottest where the model looked
        page.locator("#words .word").nth(1).hover()
        info = overlay(page)
        assert info["token"] == "1"
        assert info["n"] > 0.5 * info["w"] * info["h"]
        ex, ey = expected_cell(1)
        assert abs(info["x"] - ex) < 1.5 / 7 and abs(info["y"] - ey) < 1.5 / 7, info

        # moving away clears it; clicking pins it
        page.mouse.move(5, 5)
        assert overlay(page)["n"] == 0
        page.locator("#words .word").nth(3).click()
        page.mouse.move(5, 5)
        info = overlay(page)
        assert info["token"] == "3" and info["n"] > 0
        ex, ey = expected_cell(3)
        assert abs(info["x"] - ex) < 1.5 / 7 and abs(info["y"] - ey) < 1.5 / 7, info
        assert page.locator("#words .word").nth(3).get_attribute("aria-pressed") == "true"
        page.screenshot(path=str(SCREENSHOTS / "web_desktop.png"), full_page=True)
    finally:
        context.close()
    assert errors == []


def test_mobile_width_375(browser, server_url, photo):
    errors: list[str] = []
    context, page = new_page(browser, server_url, 375, 812, errors)
    try:
        upload_and_check_caption(page, photo)
        page.locator("#words .word").nth(2).click()
        info = overlay(page)
        assert info["n"] > 0 and info["token"] == "2"
        assert page.evaluate("document.documentElement.scrollWidth") <= 375  # no sideways scroll
        box = page.locator("#preview").bounding_box()
        assert box is not None and box["width"] <= 375
        page.screenshot(path=str(SCREENSHOTS / "web_mobile.png"), full_page=True)
    finally:
        context.close()
    assert errors == []


def test_overlay_covers_only_the_letterboxed_picture(browser, server_url, tmp_path):
    tall = tmp_path / "tall.png"
    Image.new("RGB", (300, 900), (30, 30, 220)).save(tall)
    errors: list[str] = []
    context, page = new_page(browser, server_url, 1280, 800, errors)
    try:
        page.set_input_files("#file", str(tall))
        sync_api.expect(page.locator("#caption")).to_contain_text(
            "171x512", timeout=10_000
        )  # decoded at <= 512 px
        page.locator("#words .word").nth(0).click()
        img = page.locator("#preview").bounding_box()
        canvas = page.locator("#overlay").bounding_box()
        assert canvas["width"] < img["width"] * 0.6  # the picture is narrower than its box
        assert abs(canvas["height"] / canvas["width"] - 3.0) < 0.05
        assert abs((canvas["x"] + canvas["width"] / 2) - (img["x"] + img["width"] / 2)) < 2
        assert overlay(page)["n"] > 0
    finally:
        context.close()
    assert errors == []


def test_drag_and_drop(browser, server_url, photo):
    errors: list[str] = []
    context, page = new_page(browser, server_url, 1024, 768, errors)
    try:
        data = base64.b64encode(photo.read_bytes()).decode()
        page.evaluate(
            """(b64) => {
              const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
              const dt = new DataTransfer();
              dt.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
              const zone = document.getElementById('dropzone');
              zone.dispatchEvent(new DragEvent('dragover', {dataTransfer: dt, bubbles: true}));
              zone.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));
            }""",
            data,
        )
        sync_api.expect(page.locator("#caption")).to_contain_text("512x342", timeout=10_000)
    finally:
        context.close()
    assert errors == []


def test_bad_file_shows_server_message(browser, server_url, tmp_path, photo):
    errors: list[str] = []
    context, page = new_page(browser, server_url, 1280, 860, errors)
    try:
        upload_and_check_caption(page, photo)  # a good one first: the error must replace it
        notes = tmp_path / "notes.txt"
        notes.write_text("this is not a picture\n")
        page.set_input_files("#file", str(notes))
        error = page.locator("#error")
        sync_api.expect(error).to_be_visible(timeout=10_000)
        sync_api.expect(error).to_contain_text("Not a supported image")
        sync_api.expect(error).to_contain_text("notes.txt: unsupported file type (text)")
        assert page.locator("#output").is_hidden()
        assert page.locator("#stage").is_hidden()

        broken = tmp_path / "broken.png"
        broken.write_bytes(photo.read_bytes()[:2000])
        page.set_input_files("#file", str(broken))
        sync_api.expect(error).to_contain_text("broken.png", timeout=10_000)
        sync_api.expect(error).to_contain_text("Could not read this image")
        page.screenshot(path=str(SCREENSHOTS / "web_error.png"), full_page=True)

        # a file over the server's limit (2 MB here) is refused before uploading
        big = tmp_path / "big.png"
        buf = io.BytesIO()
        noise = np.random.default_rng(0).integers(0, 255, (1200, 1200, 3), dtype=np.uint8)
        Image.fromarray(noise).save(buf, "PNG")
        big.write_bytes(buf.getvalue())
        page.set_input_files("#file", str(big))
        sync_api.expect(error).to_contain_text("File too large", timeout=10_000)

        # and it recovers with a good file
        upload_and_check_caption(page, photo)
        assert error.is_hidden()
    finally:
        context.close()
    assert errors == []


def test_concepts_and_out_of_domain_warning(browser, server_url, tmp_path, photo):
    """The page lists what the encoder sees and warns, in words, about an out-of-domain photo
    (the fake calls a pure blue image out of domain)."""
    blue = tmp_path / "blue.png"
    Image.new("RGB", (64, 48), (30, 30, 220)).save(blue)
    errors: list[str] = []
    context, page = new_page(browser, server_url, 1280, 860, errors)
    try:
        upload_and_check_caption(page, photo)
        sync_api.expect(page.locator("#concepts li")).to_have_count(1)
        assert page.locator("#in-domain").inner_text() == "0.500"
        assert page.locator("#ood-warning").is_hidden()
        page.set_input_files("#file", str(blue))
        sync_api.expect(page.locator("#caption")).to_contain_text("blue", timeout=10_000)
        sync_api.expect(page.locator("#ood-warning")).to_be_visible()
        assert "may well be wrong" in page.locator("#ood-warning").inner_text()
        assert page.locator("#concepts li").first.inner_text() == "blue 0.90"
    finally:
        context.close()
    assert errors == []
