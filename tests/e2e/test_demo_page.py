"""The demo page in a real browser: headless Chromium (Debian's package) driven by Playwright,
against a real uvicorn serving both bundled models, galleries built by `byorl demo-gallery`."""

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, SAMPLE
from tests.live import free_port, kill_group, start_process, uvicorn_argv, wait_ready

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("BYORL_TEST_ARTIFACTS", ROOT / ".cache" / "test-artifacts"))
K = 8
# Test images per class in each gallery; docs/demo-attack.png: BYORL_DEMO_PER_CLASS=100
PER_CLASS = int(os.environ.get("BYORL_DEMO_PER_CLASS", "30"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def demo_api(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "BYORL_MODEL_DIRS": "models/default,models/byol-reference",
           "BYORL_DATA_DIR": str(tmp / "data"), "BYORL_REDIS_URL": "", "BYORL_API_KEY": "",
           "BYORL_THREADS": "1"}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_process(uvicorn_argv(port), env, tmp / "api.log", ROOT)
    try:
        wait_ready(url)
        out = subprocess.run([sys.executable, "-m", "byorl.cli", "demo-gallery",
                              "--api", url, "--data", str(SAMPLE), "--per-class", str(PER_CLASS)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        assert out.stdout.count(f"{10 * PER_CLASS} images of 10 classes") == 2, out.stdout
        yield url
    finally:
        kill_group(proc, signal.SIGTERM)


def test_search_and_attack_in_headless_chromium(demo_api, tmp_path):
    if not Path(CHROMIUM).is_file() or shutil.which("chromium") is None:
        pytest.fail("the browser test needs Chromium at /usr/bin/chromium: apt-get install "
                    "--no-install-recommends chromium (.ci/run installs it as root)")
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 900})
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(demo_api + "/")
            assert page.url.endswith("/demo")
            expect(page.locator("#models input")).to_have_count(2)
            expect(page.locator("#items img")).to_have_count(30)
            # an upload: the first gallery image's own JPEG finds it first, at cosine 1
            with np.load(SAMPLE) as f:
                (tmp_path / "query.jpg").write_bytes(f["jpeg"][: f["offsets"][1]].tobytes())
            page.set_input_files("#upload", str(tmp_path / "query.jpg"))
            expect(page.locator("#query-name")).to_have_text("query.jpg")
            page.click("#search")
            expect(page.locator(".column .neighbours .hit")).to_have_count(2 * K)
            for key in page.locator(".column").evaluate_all(
                    "cols => cols.map(c => c.querySelector('.hit').dataset.key)"):
                assert key == "test-00000"
            page.locator("#items img").nth(3).click()  # a gallery item: test-00003
            expect(page.locator("#query-name")).to_contain_text("test-00003")
            page.click("#search")
            columns = page.locator(".column")
            expect(columns).to_have_count(2)
            expect(page.locator(".column .neighbours .hit")).to_have_count(2 * K)  # both done
            names = sorted(columns.locator("h2").all_inner_texts())
            assert names[0].startswith("BYOL ·") and names[1].startswith("BYORL ·"), names
            for i in range(2):  # the query is a gallery item: its own top hit, cosine 1
                first = columns.nth(i).locator(".neighbours .hit").first
                assert first.get_attribute("data-key") == "test-00003"
                assert first.inner_text().strip().endswith("1.000")
            page.click("#attack")
            expect(page.locator(".attacked")).to_have_count(2, timeout=240_000)
            expect(page.locator("#status")).to_have_text("attack done")
            overlaps = {}
            for i in range(2):
                col = columns.nth(i)
                name = col.locator("h2").inner_text().split(" ·")[0]
                shown = col.locator(".attacked").inner_text()
                got = re.search(r"l∞ = ([\d.]+)/255 \(budget ([\d.]+)/255\)", shown)
                assert got and got.group(2) == "8.00", shown  # the budget asked, as stated
                assert float(got.group(1)) <= 8.005, shown  # the perturbation within it
                assert "white-box" in shown and "AutoPGD 20 steps" in shown
                expect(col.locator(".attacked .hit")).to_have_count(K)
                kept = col.locator(".attacked .hit.kept").count()
                overlaps[name] = int(col.locator(".overlap").inner_text().split("/")[0])
                assert overlaps[name] == kept  # the stated overlap is the green cells
            assert overlaps["BYORL"] >= overlaps["BYOL"], overlaps  # Fig. 1
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shot = ARTIFACTS / "demo-attack.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            assert not errors, errors
            print(f"screenshot: {shot}; top-{K} overlaps under attack: {overlaps}")
        finally:
            browser.close()
