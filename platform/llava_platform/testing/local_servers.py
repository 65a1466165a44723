"""Stand-ins for remote services, on 127.0.0.1, for tests and benchmarks: moto's S3 server, the helpers to
wait for a server, and the S3 credentials moto accepts. (The scripted OpenAI-protocol teacher and the
throttling S3 proxy are beside this file.)"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
S3_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
"""Credentials moto accepts; set for the test process and every Ray worker."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, timeout_s: float, process: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll ``url`` until it answers (any HTTP status); fail early if ``process`` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if process is not None and process.poll() is not None:
                detail = log.read_text()[-2000:] if log and log.exists() else ""
                raise RuntimeError(f"{process.args[0]} exited before answering on {url}: {detail}") from None
            time.sleep(0.1)
    raise RuntimeError(f"nothing answered on {url} within {timeout_s:.0f} s")


class MotoServer:
    """moto's S3-compatible server (a real HTTP server) on a free loopback port."""

    def __init__(self):
        self.endpoint = f"http://127.0.0.1:{free_port()}"
        self.process: subprocess.Popen | None = None

    def start(self) -> str:
        port = self.endpoint.rsplit(":", 1)[1]
        self.process = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", port],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_http(self.endpoint, 60, self.process)
        return self.endpoint

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
