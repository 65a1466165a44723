"""A real headless browser for the page tests: Debian's Chromium (``make browser`` installs it), driven
by Playwright's Python client with the system browser's ``executable_path`` (Playwright's own browser
downloads are never used). Screenshots go to ``ARTIFACTS``."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.helpers import REPO_ROOT

ARTIFACTS = REPO_ROOT / "outputs" / "test-artifacts"
"""Where browser tests leave their screenshots (ignored by git; CI keeps the working tree)."""

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
"""As root with no display and no internet: no sandbox, no GPU, and none of Chromium's own traffic."""


def chromium_path() -> str:
    """The system Chromium; a clear error naming the make target when it is missing."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise RuntimeError("no chromium on PATH: `make browser` installs Debian's chromium (make test runs it)")
    return path


@contextmanager
def page(user_data_dir: Path) -> Iterator:
    """A fresh page in a headless Chromium with its own empty profile in ``user_data_dir``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(user_data_dir), executable_path=chromium_path(), headless=True, args=CHROMIUM_FLAGS)
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()
