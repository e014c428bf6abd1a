"""Build the docs site, serve it on 127.0.0.1, and screenshot four pages in headless Chromium.

    python tools/screenshots.py                  # -> build/screenshots/*.png
    python tools/screenshots.py --no-build       # reuse build/site/
    python tools/screenshots.py --out DIR --width 1280 --height 1600

The pages: the landing page, one guide, one rendered demo and one API page. Chromium
comes from the system (Debian: ``apt-get install chromium``); ``--chromium PATH`` picks
another binary. Look at the PNGs: they are how a reader first sees the site.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import shutil
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = {  # screenshot name -> path in the site
    "landing": "",
    "guide-dp": "guides/dp/",
    "demo-worked-example": "demos/01-worked-example/",
    "api-the-linear-layer": "api/the-linear-layer/",
}


@contextlib.contextmanager
def serve(site: Path):
    """An HTTP server for ``site`` on 127.0.0.1 and a free port; yields its base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()


def screenshot(chromium: str, url: str, path: Path, width: int, height: int) -> None:
    subprocess.run(
        [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--window-size={width},{height}", f"--screenshot={path}", url,
        ],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/screenshots.py", description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "screenshots")
    parser.add_argument("--no-build", action="store_true", help="reuse build/site/")
    parser.add_argument("--chromium", default=None, help="the Chromium binary")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1400)
    args = parser.parse_args(argv)

    chromium = args.chromium or shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("no Chromium found: apt-get install chromium (or --chromium PATH)", file=sys.stderr)
        return 2
    if not args.no_build:
        subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict"], cwd=ROOT, check=True)
    site = ROOT / "build" / "site"
    args.out.mkdir(parents=True, exist_ok=True)
    with serve(site) as base:
        for name, page in PAGES.items():
            path = args.out / f"{name}.png"
            screenshot(chromium, base + page, path, args.width, args.height)
            print(f"{base + page} -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
