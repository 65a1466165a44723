"""Real servers on 127.0.0.1 for the tests: ``mlflow server`` in its own process (moto's S3 server and the
port helpers are the product's test facilities: ``llava_platform.testing.local_servers``)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from llava_platform.testing.local_servers import S3_TEST_ENV, VENV_BIN, MotoServer, free_port, wait_for_http

__all__ = ["S3_TEST_ENV", "VENV_BIN", "MlflowServer", "MotoServer", "free_port", "wait_for_http", "which"]

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
