"""The playground page in a real headless Chromium, against ``deeprnn serve`` run as a subprocess.

Needs the Debian ``chromium`` package and Playwright's Python package (never ``playwright install``).
Where either is missing the test is skipped with the reason printed, unless ``$DEEPRNN_REQUIRE_BROWSER``
is set (CI sets it), in which case it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deeprnn import checkpoint
from deeprnn.checkpoint import load_checkpoint
from deeprnn.generate import generate

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def _chromium() -> str | None:
    if os.path.exists("/usr/bin/chromium"):
        return "/usr/bin/chromium"
    return shutil.which("chromium")


def _need_browser():
    """Playwright's sync API and the chromium path, or skip (fail when CI requires the browser)."""
    missing = []
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
        missing.append("the playwright Python package (pip install playwright)")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        missing.append("fastapi/uvicorn (pip install 'deeprnn[serve]')")
    chromium = _chromium()
    if chromium is None:
        missing.append("Chromium (apt-get install chromium)")
    if missing:
        reason = "browser test needs " + " and ".join(missing)
        if os.environ.get("DEEPRNN_REQUIRE_BROWSER"):
            pytest.fail(reason + "; DEEPRNN_REQUIRE_BROWSER is set, so this is a failure, not a skip")
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    return sync_playwright, chromium


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_run):
    """A directory of two runs (the same tiny training, copied) so the page shows its model picker."""
    root = tmp_path_factory.mktemp("browser") / "runs"
    shutil.copytree(tiny_run, root / "lstm-1x16")
    shutil.copytree(tiny_run, root / "lstm-1x16-copy")
    for ckpt in ("best", "last"):  # the copy's run sampled from another prefix: the page offers it with the model
        path = root / "lstm-1x16-copy" / ckpt / "checkpoint.json"
        meta = json.loads(path.read_text())
        meta["train_config"]["prefix"] = "the time"
        meta[checkpoint.META_DIGEST] = checkpoint._meta_digest({k: v for k, v in meta.items()
                                                                if k != checkpoint.META_DIGEST})
        path.write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def server(runs):
    """``deeprnn serve runs/`` on 127.0.0.1 and a free port; yields its base URL, stopped afterwards."""
    _need_browser()
    import httpx

    port = _free_port()
    log = open(runs.parent / "serve.log", "w+")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DEEPRNN_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "deeprnn", "serve", str(runs), "--host", "127.0.0.1",
                             "--port", str(port), "--log-level", "warning", "--rescan", "0.2"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"deeprnn serve exited with {proc.returncode}:\n{log.read()}")
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("deeprnn serve did not answer /healthz within 90 s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.browser
def test_page_streams_generated_text(server, runs):
    sync_playwright, chromium = _need_browser()
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "serve.png"
    prefix, num_preds, seed = "the time machine", 120, 11
    ckpt = load_checkpoint(runs / "lstm-1x16-copy")
    want = generate(ckpt.model, ckpt.vocab, prefix, num_preds, strategy="sample", seed=seed, num_samples=2,
                    temperature=0.8)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            page.goto(server + "/")
            # The card and the picker come from /api/models.
            page.wait_for_selector("#card-fields dd")
            assert page.is_visible("#model")
            assert page.locator("#model option").all_inner_texts()[1].startswith("lstm-1x16-copy")
            # The prefix box holds the chosen model's own prefix, and follows the picker until typed in.
            assert page.input_value("#prefix") == "time traveller"
            page.select_option("#model", "lstm-1x16-copy")
            assert page.input_value("#prefix") == "the time"
            page.fill("#prefix", "the machine")
            page.select_option("#model", "lstm-1x16")
            assert page.input_value("#prefix") == "the machine"
            page.select_option("#model", "lstm-1x16-copy")
            assert "lstm" in page.inner_text("#card-fields")
            page.wait_for_function("document.getElementById('curve').naturalWidth > 0")

            # A prefix outside the vocabulary is reported, not generated from.
            page.fill("#prefix", "The Time Machine")
            page.click("#generate")
            page.wait_for_selector("#error:not([hidden])")
            assert "not in the vocabulary" in page.inner_text("#error") and "'T'" in page.inner_text("#error")

            page.fill("#prefix", prefix)
            page.select_option("#strategy", "sample")
            page.fill("#num_preds", str(num_preds))
            page.fill("#num_samples", "2")
            page.fill("#seed", str(seed))
            page.locator("#temperature").evaluate("(el) => { el.value = '0.8'; el.dispatchEvent(new Event('input')); }")
            with page.expect_response(lambda r: r.url.endswith("/api/generate")) as resp_info:
                page.click("#generate")
            resp = resp_info.value
            assert resp.status == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            # Streamed: the sample boxes show the prefix as soon as the start event arrives.
            page.wait_for_selector("#output .sample .prefix")
            assert page.inner_text("#output .sample .prefix").startswith(prefix)
            page.wait_for_selector("#output[data-state=done]", timeout=30_000)
            shown = page.locator("#output .sample").all_inner_texts()
            assert all(s.startswith(prefix) for s in shown)
            assert shown == want
            assert page.is_hidden("#error")
            assert "done in" in page.inner_text("#status")
            assert f"seed {seed}" in page.inner_text("#status")

            # Beam search with its width box emptied: the server's default width (the page sent null, refused
            # as "beam_width: Input should be a valid integer"), and, with the seed box emptied too, no seed in
            # the status line (the sample's stayed there).
            page.select_option("#strategy", "beam")
            page.fill("#beam_width", "")
            page.fill("#seed", "")
            page.fill("#num_samples", "1")
            with page.expect_response(lambda r: r.url.endswith("/api/generate")) as resp_info:
                page.click("#generate")
            assert resp_info.value.status == 200
            page.wait_for_selector("#output[data-state=done]", timeout=30_000)
            assert page.locator("#output .sample").all_inner_texts() == generate(
                ckpt.model, ckpt.vocab, prefix, num_preds, strategy="beam", beam_width=4)
            assert page.is_hidden("#error")
            assert "done in" in page.inner_text("#status") and "seed" not in page.inner_text("#status")

            # A run trained while the page is open: offered once the page is back in view (the server looked
            # again), the model chosen and the prefix typed staying as they were.
            shutil.copytree(runs / "lstm-1x16", runs / "lstm-1x16-new")
            time.sleep(0.3)  # past the server's --rescan
            page.evaluate("window.dispatchEvent(new Event('focus'))")
            page.wait_for_function("document.querySelectorAll('#model option').length === 3")
            assert page.locator("#model option").all_inner_texts()[2].startswith("lstm-1x16-new")
            assert page.input_value("#model") == "lstm-1x16-copy" and page.input_value("#prefix") == prefix
            assert errors == []
        finally:
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
    assert shot.stat().st_size > 10_000
