"""Screenshot dashboard pages of a served LFP Explorer (for the README and for looking at changes).

    python scripts/screenshot.py --url http://127.0.0.1:8501 --out docs/overview.png [--page overview]

Uses Debian's Chromium through Playwright (no browser download).
"""

from __future__ import annotations

import argparse
import os
import shutil

from playwright.sync_api import sync_playwright

FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8501")
    ap.add_argument("--page", default="", help="url path of the page ('' for Overview, layers, ...)")
    ap.add_argument("--query", default="", help="extra query string, e.g. run=demo")
    ap.add_argument("--out", required=True)
    ap.add_argument("--wait-for", default="Run ·", help="text to wait for before the shot")
    ap.add_argument("--height", type=int, default=1500)
    ap.add_argument("--full-page", action="store_true")
    ap.add_argument("--click", action="append", default=[], help="press the button with this label first (repeatable)")
    ap.add_argument("--scroll-to", default="", help="scroll so this text is at the top of the shot")
    args = ap.parse_args()
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        raise SystemExit("needs Chromium (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": args.height})
        page.goto(f"{args.url}/{args.page}{'?' + args.query if args.query else ''}", wait_until="domcontentloaded")
        page.get_by_text(args.wait_for).first.wait_for(timeout=90_000)
        # Streamlit draws skeletons while a script runs; wait until the last one is replaced.
        page.wait_for_function("document.querySelectorAll('[data-testid=\"stSkeleton\"]').length === 0", timeout=90_000)
        page.wait_for_timeout(int(os.environ.get("LFP_SHOT_WAIT_MS", "2500")))  # let charts draw
        for label in args.click:
            page.get_by_role("button", name=label).first.click()
            page.wait_for_timeout(1000)
            page.wait_for_function(
                'document.querySelectorAll(\'[data-testid="stSkeleton"], [data-testid="stSpinner"]\').length === 0',
                timeout=120_000,
            )
            page.wait_for_timeout(2500)
        if args.scroll_to:
            page.get_by_text(args.scroll_to).first.evaluate("e => e.scrollIntoView({block: 'start'})")
            page.wait_for_timeout(1500)
        page.screenshot(path=args.out, full_page=args.full_page)
        browser.close()


if __name__ == "__main__":
    main()
