"""The served dashboard in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

Starts ``streamlit run app.py`` on a free loopback port, checks ``/_stcore/health``, and reads the
Overview page as a user would. Skips when Chromium is absent, unless LFP_REQUIRE_E2E=1 (CI).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from lfp_core.config import REPO_ROOT
from lfp_core.store import RunWriter, put_rows

pytestmark = pytest.mark.e2e
ARTIFACTS = REPO_ROOT / "test-artifacts"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium() -> str:
    path = os.environ.get("LFP_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        if os.environ.get("LFP_REQUIRE_E2E") == "1":
            pytest.fail("LFP_REQUIRE_E2E=1 but no chromium binary was found")
        pytest.skip("needs Chromium (Debian package 'chromium') for browser tests")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(quick_run, tmp_path_factory):
    """A served dashboard over a runs folder holding the quick run and a run with HTML in its text."""
    runs = quick_run.parent
    evil = runs / "evil"
    if not evil.exists():
        w = RunWriter(evil)
        w.set_config("quick", '{"model": "demo", "task": "vader"}')
        with w.transaction() as con:
            RunWriter.put_prompts(
                con,
                [
                    {
                        "prompt_id": 0,
                        "split": "eval",
                        "source": "imdb",
                        "doc_id": "x",
                        "n_tokens": 1,
                        "token_ids": [1],
                        "text": "<img src=x onerror=alert(1)>",
                    }
                ],
            )
            RunWriter.put_completions(
                con,
                [
                    {
                        "role": "base",
                        "prompt_id": 0,
                        "sample_idx": 0,
                        "seed": 0,
                        "n_new": 2,
                        "token_ids": [1, 2],
                        "text": " great <script>alert(1)</script>",
                        "reward": 0.62,
                        "raw_score": 3.1,
                        "lexicon_words": ["great"],
                        "lexicon_valences": [3.1],
                    }
                ],
            )
            evil_tokens = ["<script>alert(1)</script>", " <img src=x onerror=alert(1)>", " fine"]
            put_rows(
                con,
                "features",
                [
                    {
                        "role": "tuned",
                        "layer": 0,
                        "feature": f,
                        "density": 0.01,
                        "n_fired": 3,
                        "mean_act": 1.0,
                        "max_act": 2.0,
                        "hist_counts": [1, 2],
                        "top_tokens": evil_tokens,
                        "freq_base_text": 0.0,
                        "freq_tuned_text": 0.1,
                        "top_logit_tokens": evil_tokens,
                        "top_logit_values": [1.0, 0.5, 0.1],
                        "bottom_logit_tokens": evil_tokens,
                        "bottom_logit_values": [-1.0, -0.5, -0.1],
                        "neighbours": [1 - f],
                        "neighbour_cos": [0.5],
                    }
                    for f in (0, 1)
                ],
            )
            put_rows(
                con,
                "feature_examples",
                [
                    {
                        "role": "tuned",
                        "layer": 0,
                        "feature": 0,
                        "kind": "top",
                        "rank": 0,
                        "interval": -1,
                        "doc_id": 0,
                        "pos": 1,
                        "act": 2.0,
                        "center": 1,
                        "tokens": evil_tokens,
                        "token_ids": [1, 2, 3],
                        "acts": [0.0, 2.0, 1.0],
                    }
                ],
            )
            put_rows(
                con,
                "feature_labels",
                [
                    {
                        "role": "tuned",
                        "layer": 0,
                        "feature": 0,
                        "labeller": "offline",
                        "explanation": "<img src=x onerror=alert(1)> praise",
                        "relevant": True,
                    }
                ],
            )
            w.mark_stage("features", 0, "x", "done", con=con)
    port = _free_port()
    env = {**os.environ, "LFP_RUNS_DIR": str(runs), "PYTHONPATH": str(REPO_ROOT)}
    log = (tmp_path_factory.mktemp("srv") / "streamlit.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            "app.py",
            "--server.address",
            "127.0.0.1",
            "--server.port",
            str(port),
            "--server.headless",
            "true",
            "--browser.gatherUsageStats",
            "false",
            "--",
            "--run",
            str(quick_run),
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/_stcore/health", timeout=2) as r:
                    if r.read().decode().strip() == "ok":
                        break
            except OSError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError(f"streamlit did not become healthy (exit {proc.poll()})")
            time.sleep(0.5)
        yield base, quick_run
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


@pytest.fixture(scope="module")
def browser():
    exe = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_FLAGS)
        yield b
        b.close()


def test_health_endpoint(server):
    base, _ = server
    with urllib.request.urlopen(f"{base}/_stcore/health", timeout=5) as r:
        assert r.read().decode().strip() == "ok"


def test_overview_renders_the_run_in_chromium(server, browser):
    base, run = server
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    page.goto(f"{base}/", wait_until="domcontentloaded")
    page.get_by_text(f"Run · {run.name}").wait_for(timeout=60_000)
    page.locator(".lfp-completion").first.wait_for(timeout=60_000)
    assert page.locator(".lfp-completion").count() == 30
    body = page.inner_text("body")
    assert "Base reward (mean ± s.e.)" in body and "Stages" in body and "Base-model completions" in body
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "overview.png"), full_page=False)
    page.close()


def test_html_in_text_is_shown_not_run(server, browser):
    base, _ = server
    page = browser.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(f"{base}/?run=evil", wait_until="domcontentloaded")
    page.locator(".lfp-completion").first.wait_for(timeout=60_000)
    text = page.locator(".lfp-completion").first.inner_text()
    assert "<script>alert(1)</script>" in text
    assert page.locator(".lfp-completion img").count() == 0 and page.locator(".lfp-completion script").count() == 0
    page.wait_for_timeout(500)
    assert dialogs == []
    page.close()


def test_deep_links_reach_each_page_through_the_app(server, browser):
    """/layers?run=NAME must run app.py (sidebar, navigation, run from the URL), not a bare page file."""
    base, run = server
    page = browser.new_page()
    page.goto(f"{base}/layers?run={run.name}", wait_until="domcontentloaded")
    page.get_by_text("Selected layers").wait_for(timeout=60_000)
    page.get_by_text("Dictionary similarity (MMCS)").wait_for(timeout=60_000)
    # Streamlit streams the page element by element: wait for the last section before reading it
    page.get_by_text("Mutual Feature Regularization vs independent SAEs").wait_for(timeout=60_000)
    body = page.inner_text("body")
    assert "LFP Explorer" in body and "Overview" in body  # the shared sidebar and navigation
    assert "Page not found" not in body
    assert "L1 sweep" in body and "Mutual Feature Regularization vs independent SAEs" in body
    assert page.locator(".stException").count() == 0
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "layers.png"), full_page=True)
    page.close()


def test_probe_pages_render_in_chromium(server, browser):
    base, run = server
    page = browser.new_page(viewport={"width": 1400, "height": 2400})
    page.goto(f"{base}/token-scores?run={run.name}", wait_until="domcontentloaded")
    page.get_by_text("Token viewer").wait_for(timeout=60_000)
    page.locator(".lfp-tokens").first.wait_for(timeout=60_000)
    for text in ("τ, occurrence split", "Sign accuracy", "Implicit reward model"):
        page.get_by_text(text).first.wait_for(timeout=30_000)
    assert page.locator(".stException").count() == 0
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "token_scores.png"))
    page.goto(f"{base}/separation?run={run.name}", wait_until="domcontentloaded")
    page.get_by_text("PCA of the mean-pooled SAE features").wait_for(timeout=60_000)
    assert "Logistic probes" in page.inner_text("body") and page.locator(".stException").count() == 0
    page.close()


PAGES = {
    "": "Stages",
    "layers": "Selected layers",
    "features": "Feature browser",
    "feature": "Density",
    "token-scores": "Token viewer",
    "labels": "Labelled features",
    "separation": "Logistic probes",
    "ablation": "Live lab",
    "reward-model": "Held-out pair accuracy",
}


def test_every_page_renders_without_an_exception(server, browser):
    base, run = server
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    ARTIFACTS.mkdir(exist_ok=True)
    for path, key_text in PAGES.items():
        page.goto(f"{base}/{path}?run={run.name}", wait_until="domcontentloaded")
        page.get_by_text(key_text).first.wait_for(timeout=60_000)
        page.wait_for_function("() => !document.querySelector('[data-testid=\"stSkeleton\"]')", timeout=60_000)
        page.wait_for_timeout(300)
        assert page.locator(".stException").count() == 0, path
        assert "Page not found" not in page.inner_text("body"), path
        page.screenshot(path=str(ARTIFACTS / f"page-{path or 'overview'}.png"))
    # the browser's link opens the feature page of that row
    page.goto(f"{base}/features?run={run.name}", wait_until="domcontentloaded")
    page.get_by_text("features match").wait_for(timeout=60_000)
    page.goto(f"{base}/feature?run={run.name}&role=tuned&layer=99&feature=zz", wait_until="domcontentloaded")
    page.get_by_text("must be a whole number").or_(page.get_by_text("not in this run")).first.wait_for(timeout=60_000)
    assert page.locator(".stException").count() == 0
    page.close()


def test_live_ablation_lab_answers_in_the_browser(server, browser):
    base, run = server
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    page.goto(f"{base}/ablation?run={run.name}", wait_until="domcontentloaded")
    page.get_by_text("Live lab").first.wait_for(timeout=60_000)
    page.get_by_label("Prompt", exact=True).fill("The acting in this film was")
    page.get_by_label("Prompt", exact=True).press("Control+Enter")
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Mean reward, clean").wait_for(timeout=90_000)
    assert page.locator(".stException").count() == 0
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ablation-live.png"), full_page=True)
    page.close()


def test_feature_page_shows_html_tokens_and_labels_as_text(server, browser):
    base, _ = server
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(f"{base}/feature?run=evil&role=tuned&layer=0&feature=0", wait_until="domcontentloaded")
    page.locator(".lfp-context").first.wait_for(timeout=60_000)
    ctx = page.locator(".lfp-context").first.inner_text()
    assert "<script>alert(1)</script>" in ctx and "<img src=x onerror=alert(1)>" in ctx.replace("\xa0", " ")
    assert page.locator(".lfp-context img").count() == 0 and page.locator(".lfp-context script").count() == 0
    assert "<img src=x onerror=alert(1)> praise" in page.inner_text("body")
    assert page.locator("img[src='x']").count() == 0
    page.goto(f"{base}/features?run=evil", wait_until="domcontentloaded")
    page.get_by_text("features match").wait_for(timeout=60_000)
    page.wait_for_timeout(1000)
    assert dialogs == [] and page.locator(".stException").count() == 0
    page.close()
