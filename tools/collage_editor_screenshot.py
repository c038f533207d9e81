"""The screenshot of the web UI's collage editor in docs/composition.md (docs/images/collage-editor.png): the
default model served on 127.0.0.1, a 128x128 layout placed in headless Chromium (two layers typed as text,
a third added with the toolbar and given an RGBA image the model drew first), generated, and the form, the Collage
tab and the results photographed. Run once; the output is committed.

    python tools/collage_editor_screenshot.py [--out docs/images/collage-editor.png]
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import threading
import time
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
LAYOUT = """{"layers": [
  {"prompt": "red apple", "box": [8, 48, 60, 100], "strength": 0.25},
  {"prompt": "slice of pizza", "box": [68, 48, 120, 100], "strength": 0.25}
]}"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs/images/collage-editor.png")
    args = ap.parse_args()

    import uvicorn
    from playwright.sync_api import sync_playwright

    from dreamlab.generate import GenerationRequest, generate
    from dreamlab.loading.model import load_model
    from dreamlab.server.app import create_app

    model = load_model()
    tmp = Path(tempfile.mkdtemp())
    star = tmp / "star.png"  # an RGBA layer of the model's own, to upload
    generate(model, GenerationRequest(prompt="glowing star", seed=3, steps=20)).images[0].save(star)
    app = create_app(model, tmp / "data")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}")
            page.wait_for_selector("#generate")
            page.locator("#prompt textarea").fill("a picnic")
            for elem_id, value in (("steps", 20), ("width", 128), ("height", 128)):
                box = page.locator(f"#{elem_id} input[type=number]")
                box.fill(str(value))
                box.press("Enter")
            page.locator("#seed input").fill("0")
            page.get_by_role("tab", name="Collage").click()
            page.wait_for_function("document.querySelector('#collage-editor .dl-status')?.textContent.startsWith('128 × 128')")
            page.locator("#collage-layout textarea").fill(LAYOUT)
            page.click("#collage-editor [data-act=add]")
            page.keyboard.type("star")
            for name, value in (("x0", 40), ("y0", 4), ("x1", 88), ("y1", 52), ("strength", 0.3)):
                page.locator(f"#collage-editor .dl-panel [name={name}]").fill(str(value))
            page.locator("#collage-editor input.dl-file").set_input_files(str(star))
            page.wait_for_selector("#collage-editor .dl-layer img")
            page.click("#generate")
            page.wait_for_function("document.querySelector('#progress').textContent.includes('done')", timeout=300_000)
            page.wait_for_function("[...document.querySelectorAll('#results .thumbnail-item img')].every(i => i.complete)")
            top, bottom, right = (page.locator(sel).bounding_box() for sel in ("#prompt", "#collage-layout", "#results"))
            x0, y0 = top["x"] - 8, top["y"] - 8
            x1, y1 = right["x"] + right["width"] + 8, max(bottom["y"] + bottom["height"], right["y"] + right["height"]) + 8
            page.screenshot(path=str(args.out), full_page=True, clip={"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0})
            browser.close()
    finally:
        server.should_exit = True
    print(args.out)


if __name__ == "__main__":
    main()
