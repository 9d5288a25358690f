"""A Chromium for the browser tests, found or installed so that `python -m pytest` needs no set-up of its own.

In order: a system Chromium on PATH (`chromium`, `chromium-browser`); Playwright's own build if it was installed
before; Debian's `chromium` package through apt-get where apt is available and the tests run as root; Playwright's
`playwright install chromium` where its download is reachable. The session fixture `chromium` (registered in
conftest) does this once per test session.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

SYSTEM_NAMES = ("chromium", "chromium-browser")
APT_PACKAGES = ("chromium", "fonts-liberation")
INSTALL_TIMEOUT_S = 900


def system_chromium() -> str | None:
    return next((path for name in SYSTEM_NAMES if (path := shutil.which(name))), None)


def playwright_chromium() -> str | None:
    with sync_playwright() as driver:
        path = driver.chromium.executable_path
    return path if Path(path).exists() else None


def _run(command: list[str], env: dict[str, str] | None = None) -> str:
    """The command's combined output; empty when it succeeded, its tail when it failed or could not start."""
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"{' '.join(command)}: {error}"
    return "" if done.returncode == 0 else f"{' '.join(command)}: {(done.stdout + done.stderr)[-800:]}"


def install_with_apt() -> str:
    """Installs Debian's chromium; returns why it could not ("" when it ran)."""
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return "apt-get: not available, or the tests do not run as root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return _run(["apt-get", "update", "-qq"], env) or _run(["apt-get", "install", "-y", "-qq", *APT_PACKAGES], env)


def install_with_playwright() -> str:
    return _run([sys.executable, "-m", "playwright", "install", "chromium"])


def find_or_install_chromium() -> str:
    """The path of a Chromium executable Playwright can launch, installing one when none is found."""
    found = system_chromium() or playwright_chromium()
    if found:
        return found
    failures = []
    for install, find in ((install_with_apt, system_chromium), (install_with_playwright, playwright_chromium)):
        failures.append(install() or f"{install.__name__}: it ran, yet no Chromium was found after it")
        found = find()
        if found:
            return found
    pytest.fail("no Chromium for the browser tests, and installing one failed:\n" + "\n".join(filter(None, failures)))


@pytest.fixture(scope="session")
def chromium() -> str:
    return find_or_install_chromium()
