"""Open a report in headless Chromium and read back whether its figures decoded.

The report marks ``<html data-images-ok=N data-images-total=M>`` on load; Chromium's
``--dump-dom`` prints the DOM after scripts ran, so a broken data URI or a missing
figure shows up as ok < total. Used by the tests and by ``midtrain report --check``
style tooling; needs Debian's ``chromium`` package (``apt-get install chromium``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise FileNotFoundError("no Chromium found: install Debian's `chromium` package (apt-get install chromium)")


def check_report_in_browser(html_path: Path, screenshot: Path | None = None, timeout_s: float = 60) -> dict:
    """Load ``html_path`` headless; return ``{"images_ok", "images_total", "title"}``.

    With ``screenshot`` also writes a full-width PNG of the first screen.
    """
    chromium = find_chromium()
    url = Path(html_path).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="midtrain-chromium-") as profile:
        base = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=10000"]
        dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=timeout_s)
        if dom.returncode != 0:
            raise RuntimeError(f"chromium failed on {html_path}: {dom.stderr.strip()[-500:]}")
        if screenshot is not None:
            subprocess.run(
                [*base, f"--screenshot={Path(screenshot).resolve()}", "--window-size=1280,2000", url],
                capture_output=True, text=True, timeout=timeout_s, check=True,
            )  # fmt: skip
    ok = re.search(r'data-images-ok="(\d+)"', dom.stdout)
    total = re.search(r'data-images-total="(\d+)"', dom.stdout)
    title = re.search(r"<title>(.*?)</title>", dom.stdout)
    if not ok or not total:
        raise RuntimeError(f"{html_path}: the page's load check did not run (no data-images-ok attribute)")
    return {"images_ok": int(ok.group(1)), "images_total": int(total.group(1)), "title": title.group(1) if title else ""}
