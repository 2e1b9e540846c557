"""`diffcap serve` in a real browser: Debian's chromium driven by Playwright (its own browser download
cannot reach its server here, so the system chromium is used through executable_path).

The page is driven as a person would: upload a demo test scene, read the caption (checked against
CaptionPipeline's), step through and play the trajectory, click one of the run's example scenes, upload
a text file and read the error.
A screenshot is saved as a test artifact (DIFFCAP_TEST_ARTIFACTS, else the test's tmp folder)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
pytest.importorskip("gradio", reason="the serve extra is not installed (pip install -e '.[serve]')")

from serve_helpers import free_port, start_server, stop_server, train_demo_run  # noqa: E402 (after the skips above)

from diffcap.data.contract import read_captions  # noqa: E402
from diffcap.pipeline import CaptionPipeline  # noqa: E402

TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_browser")
    run = train_demo_run(root)
    port = free_port()
    proc = start_server(run, port, log=root / "serve.log")
    try:
        yield run, f"http://127.0.0.1:{port}/"
    finally:
        stop_server(proc)


def demo_test_scene(run: Path, folder: Path, k: int = 0) -> tuple[Path, object]:
    """Test-split scene #k of the run's data as a PNG file, and its pixels as the run's features."""
    from PIL import Image

    data = CaptionPipeline.from_pretrained(run).cfg.data
    image_id = list(dict.fromkeys(r.image_id for r in read_captions(data.captions) if r.split == "test"))[k]
    with safe_open(data.features, framework="pt") as f:
        pixels = f.get_tensor(image_id)
    path = folder / f"{image_id}.png"
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(path)
    return path, pixels[None]


def test_page_captions_an_upload_steps_the_trajectory_and_shows_errors(served, tmp_path):
    run, url = served
    scene, pixels = demo_test_scene(run, tmp_path)
    expected = CaptionPipeline.from_pretrained(run)(pixels, trajectory=True)  # the page starts at the run's defaults
    trajectory = expected.trajectories[0]
    notes = tmp_path / "notes.txt"
    notes.write_text("this is a text file, not a picture\n")
    artifacts = Path(os.environ.get("DIFFCAP_TEST_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 860})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            page.locator("#upload input[type=file]").set_input_files(str(scene))
            caption = page.locator("#caption textarea")
            sync_api.expect(caption).to_have_value(expected.texts[0], timeout=TIMEOUT_MS)
            status = page.locator("#status")
            sync_api.expect(status).to_contain_text(f"{len(trajectory)} steps")
            estimate = page.locator("#estimate textarea")
            t, tokens = trajectory[-1]
            sync_api.expect(estimate).to_have_value(f"step {len(trajectory)}/{len(trajectory)}, t={t}: {tokens}")
            page.screenshot(path=str(artifacts / "serve.png"), full_page=True)

            page.locator("#step input[type=range]").fill("1")  # step back to the first, noisiest estimate
            t, tokens = trajectory[0]
            sync_api.expect(estimate).to_have_value(f"step 1/{len(trajectory)}, t={t}: {tokens}")
            page.locator("#play").click()
            t, tokens = trajectory[-1]
            sync_api.expect(estimate).to_have_value(f"step {len(trajectory)}/{len(trajectory)}, t={t}: {tokens}")

            # The run's own examples are one click away: the second test scene.
            _, second = demo_test_scene(run, tmp_path, k=1)
            shown = page.locator("#preview img").get_attribute("src")
            page.locator("#examples button.thumbnail-item").nth(1).click()
            page.wait_for_function(
                "src => document.querySelector('#preview img').getAttribute('src') !== src", arg=shown
            )  # the page has captioned the example
            sync_api.expect(caption).to_have_value(CaptionPipeline.from_pretrained(run)(second).texts[0])

            page.locator("#upload button[aria-label=Clear]").click()  # the field holds one file
            page.locator("#upload input[type=file]").set_input_files(str(notes))
            sync_api.expect(status).to_contain_text("Error: the upload is not an image")
            page.screenshot(path=str(artifacts / "serve_error.png"), full_page=True)
        finally:
            browser.close()
