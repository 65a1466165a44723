"""One Ray head node for the whole test run, started as users start one (``ray start --head``).

The test process joins it as a driver (``ray.init(address=...)``) and jobs are submitted to it with
``ray job submit``, so in-process tests and submitted jobs share one Ray instance. Its logical CPUs
are a budget, not the machine's cores: every test and job asks for fractions of a CPU so that a
submitted job running in the background never starves the test in the foreground.

The head gets its own temp folder and ports; only its own processes are stopped at the end
(``ray stop`` would stop every Ray instance on the machine, the chaos scenarios' included).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.helpers import REPO_ROOT
from tests.helpers.servers import VENV_BIN, free_port, which

JOB_RUNTIME_ENV = REPO_ROOT / "jobs" / "runtime_env.yaml"


@dataclass
class SubmittedJob:
    """A ``ray job submit`` running in the background; ``wait()`` returns its output."""

    command: list[str]
    log: Path
    process: subprocess.Popen
    started: float = field(default_factory=time.monotonic)

    def wait(self, timeout_s: float = 1500) -> str:
        """Block until the job ends; fail (with the end of its log) unless it succeeded."""
        code = self.process.wait(timeout=max(1.0, timeout_s - (time.monotonic() - self.started)))
        output = self.log.read_text()
        if code != 0:
            raise AssertionError(f"`{' '.join(self.command[:8])} ...` exited {code}:\n{output[-6000:]}")
        return output


def use_token_auth() -> None:
    """Token authentication (Ray's default since 2.60) with a token of this test run's, in this process's
    environment: Ray reads it when it is first imported, so this runs before any test module imports ray.
    The head node, the jobs submitted to it and this process (a driver) all use it."""
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))


class RayHead:
    """A one-node Ray cluster on 127.0.0.1 with the run's auth token (``use_token_auth``)."""

    def __init__(self, num_cpus: int, env: dict[str, str]):
        # Ray's socket paths must stay under 108 characters: a short folder directly in /tmp.
        self.temp_dir = tempfile.mkdtemp(prefix="rayt-", dir="/tmp")
        self.num_cpus = num_cpus
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = {**os.environ, **env, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}  # jobs run this venv's python
        self.env.pop("RAY_ADDRESS", None)

    def start(self) -> RayHead:
        ports = {"--port": self.gcs_port, "--dashboard-port": self.dashboard_port,
                 "--ray-client-server-port": free_port(), "--dashboard-agent-listen-port": free_port(),
                 "--dashboard-agent-grpc-port": free_port(), "--metrics-export-port": free_port(),
                 "--runtime-env-agent-port": free_port()}
        command = [which("ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--dashboard-host",
                   "127.0.0.1", "--num-cpus", str(self.num_cpus), "--temp-dir", self.temp_dir,
                   "--disable-usage-stats", *[str(part) for flag, port in ports.items() for part in (flag, port)]]
        # Workers start in the head's working directory: a scratch folder, never the repository.
        subprocess.run(command, check=True, env=self.env, capture_output=True, timeout=180, cwd=self.temp_dir)
        return self

    def submit(self, *entrypoint: str, log: Path, runtime_env: Path = JOB_RUNTIME_ENV) -> SubmittedJob:
        """``ray job submit --working-dir . -- python -m <entrypoint>`` from the repository root, as the
        README shows, in the background (the CLI follows the job's log until it ends); ``.wait()`` for
        its output. The job's own environment comes from ``runtime_env`` (the CLI's does not reach it)."""
        command = [which("ray"), "job", "submit", "--address", self.dashboard, "--working-dir", ".",
                   "--runtime-env", str(runtime_env), "--", "python", "-m", *entrypoint]
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as out:
            process = subprocess.Popen(command, cwd=REPO_ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        return SubmittedJob(command, log, process)

    def stop(self) -> None:
        """Kill this head's processes (those naming its temp folder: GCS, raylet, dashboard, ...) and their
        descendants (the workers, which renamed themselves ``ray::...``)."""
        doomed: dict[int, psutil.Process] = {}
        for process in psutil.process_iter(["cmdline"]):
            try:
                if any(self.temp_dir in part for part in process.info["cmdline"] or []):
                    doomed.update({p.pid: p for p in [process, *process.children(recursive=True)]})
            except psutil.Error:
                pass
        for process in doomed.values():
            try:
                process.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(list(doomed.values()), timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
