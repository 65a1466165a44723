"""Real servers on 127.0.0.1 for the tests: ``mlflow server`` and moto's S3 server, each in its own process."""

from __future__ import annotations

import os
import shutil
import signal
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


class MlflowServer:
    """A real ``mlflow server`` (sqlite backend, proxied artifact store) on 127.0.0.1, on a fixed port
    and database, so that a test can stop it and start it again.

    MLflow's job runner (a dozen ``huey`` consumer processes for GenAI jobs, ~55 s of CPU per start
    on 2 cores, and polling ever after) is switched off: nothing here submits MLflow jobs.
    """

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> str:
        log_path = self.root / "server.log"
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                 "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                 "--artifacts-destination", str(self.root / "artifacts")],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # a group: mlflow + its uvicorn
                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        wait_for_http(f"{self.uri}/health", 180, self.process, log_path)  # a loaded 2-core machine can take a minute
        return self.uri

    def stop(self) -> None:
        """SIGTERM to the server's process group; returns once nothing answers on the port."""
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=30)
        for _ in range(300):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"mlflow server on {self.uri} still answers after SIGTERM")


def which(name: str) -> str:
    """A command of this virtual environment (``ray``, ``mlflow``), else from ``PATH``."""
    return shutil.which(name, path=str(VENV_BIN)) or shutil.which(name) or name
