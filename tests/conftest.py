"""Shared fixtures: tiny towers saved once per session, and tiny composed LLaVA models."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `jobs`, `pipelines`, `serve` import from the repo root
    sys.path.insert(0, str(REPO_ROOT))

from llava_platform.model.compose import compose_llava, save_llava  # noqa: E402
from llava_platform.testing.tiny import save_tiny_language_model, save_tiny_vision_tower  # noqa: E402

TILE = 56
PINPOINTS = [(56, 112), (112, 56), (112, 112), (168, 56), (56, 168)]
"""The default LLaVA-NeXT pinpoints scaled from 336 px tiles to 56 px tiles."""


@pytest.fixture(scope="session")
def towers(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("towers")
    return {
        "clip": str(save_tiny_vision_tower(root / "clip", family="clip", image_size=TILE)),
        "siglip": str(save_tiny_vision_tower(root / "siglip", family="siglip", image_size=TILE)),
        "llama": str(save_tiny_language_model(root / "llama")),
    }


@pytest.fixture(scope="session")
def tokenizer(towers):
    from transformers import AutoTokenizer

    from llava_platform.model.compose import add_image_token

    tok = AutoTokenizer.from_pretrained(towers["llama"])
    add_image_token(tok)
    return tok


def compose(towers, arch: str, family: str = "clip", projector: str = "mlp2x_gelu", mode: str | None = None):
    return compose_llava(
        towers[family], towers["llama"], arch=arch, projector=projector, vision_feature_layer=-2,
        image_size=TILE, image_mode=mode or ("anyres" if arch == "llava_next" else "pad"),
        template="vicuna_v1", pinpoints=PINPOINTS if arch == "llava_next" else None,
    )


@pytest.fixture(scope="session")
def saved_checkpoints(towers, tmp_path_factory) -> dict[str, Path]:
    """Composed tiny LLaVA and LLaVA-NeXT checkpoints, saved in folders whose names avoid 'llava'."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {arch: save_llava(*compose(towers, arch), root / f"ckpt_{i}") for i, arch in enumerate(MODEL_ARCHS)}


MODEL_ARCHS = ("llava", "llava_next")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session.

    4 logical CPUs on the 2-core machines: actor pools of earlier tests release their reservations
    asynchronously, and a trainer's workers plus a preprocessing pool must still fit beside them.
    """
    import ray

    ray.init(num_cpus=4, include_dashboard=False, ignore_reinit_error=True,
             runtime_env={"env_vars": S3_TEST_ENV})
    yield ray
    ray.shutdown()


S3_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3-compatible server on 127.0.0.1 (a real HTTP server in its own process)."""
    import os
    import shutil
    import subprocess
    import time
    import urllib.request

    port = free_port()
    binary = shutil.which("moto_server", path=os.path.dirname(sys.executable))
    process = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update(S3_TEST_ENV)
    yield endpoint
    process.terminate()
    process.wait(timeout=10)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """A real ``mlflow server`` (sqlite backend, proxied artifact store) on 127.0.0.1, on a fixed port
    and database, so that a test can stop it and start it again."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self) -> str:
        import os
        import shutil
        import subprocess
        import time
        import urllib.request

        binary = shutil.which("mlflow", path=os.path.dirname(sys.executable))
        with open(self.root / "server.log", "ab") as log:
            self.process = subprocess.Popen(
                [binary, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                 "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                 "--artifacts-destination", str(self.root / "artifacts")],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # a group: mlflow + its uvicorn
        deadline = time.monotonic() + 180  # a loaded 2-core machine can take a minute or more
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=1)
                return self.uri
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}") \
                        from None
                time.sleep(0.1)
        raise RuntimeError(f"mlflow server did not answer on {self.uri}")

    def stop(self) -> None:
        """SIGTERM to the server's process group; returns once nothing answers on the port."""
        import os
        import signal
        import socket
        import time

        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=30)
        for _ in range(300):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"mlflow server on {self.uri} still answers after SIGTERM")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1 for the whole session; yields its URI."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    yield server.start()
    server.stop()


def tiny_pipeline_overrides(root: Path, records: int = 24, eval_records: int = 8, steps: int = 2) -> list[str]:
    """Recipe overrides that run ``tiny_cpu_demo``'s whole pipeline on a few records below ``root`` in minutes."""
    data = root / "data"
    return [
        f"synthetic.out_dir={data}", f"synthetic.train_records={records}", f"synthetic.eval_records={eval_records}",
        f"stage1.data.train_files=[{data / 'stage1.json'}]", f"stage2.data.train_files=[{data / 'stage2.jsonl'}]",
        f"stage1.data.image_root={data}", f"stage2.data.image_root={data}",
        f"stage1.data.preprocessed={root / 'shards1'}", f"stage2.data.preprocessed={root / 'shards2'}",
        f"evaluation.data_files=[{data / 'eval.jsonl'}]", f"evaluation.image_root={data}",
        f"stage1.max_steps={steps}", f"stage2.max_steps={steps}", "stage1.global_batch_size=4",
        "stage1.micro_batch_size=2", "stage2.global_batch_size=4", "stage2.micro_batch_size=2",
        "tracking.system_metrics=false",
    ]


# The reliability table: every test marked ``@pytest.mark.fault("what is injected")`` is one row;
# `make chaos` runs just those (`pytest -m fault`), any other run prints the rows it included.
# A test reports what it could not deliver with ``record_property("lost", n)`` (default 0).
_FAULT_ROWS: list[tuple[str, str, str]] = []


def pytest_configure(config):
    config.addinivalue_line("markers", "fault(description): a fault-injection test, one row of the reliability table")
    config.addinivalue_line("markers", "chaos: a fault-injection test too slow for `make test`; `make chaos` runs it")


def pytest_addoption(parser):
    parser.addoption("--chaos", action="store_true", help="also run the @pytest.mark.chaos tests (make chaos)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--chaos"):
        return
    skip = pytest.mark.skip(reason="a slow fault-injection test: `make chaos` runs it")
    for item in items:
        if item.get_closest_marker("chaos"):
            item.add_marker(skip)


def pytest_runtest_logreport(report):
    counted = report.when == "call" or (report.when == "setup" and report.outcome != "passed")
    fault = getattr(report, "fault", None)
    if counted and fault:
        lost = dict(report.user_properties).get("lost", 0 if report.passed else "?")
        _FAULT_ROWS.append((fault, "survived" if report.passed else report.outcome.upper(), str(lost)))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    marker = item.get_closest_marker("fault")
    if marker:
        report.fault = marker.args[0]
    return report


def pytest_terminal_summary(terminalreporter):
    if not _FAULT_ROWS:
        return
    width = max(len(row[0]) for row in _FAULT_ROWS)
    terminalreporter.section("reliability: faults injected vs survived")
    terminalreporter.write_line(f"{'fault injected':<{width}}  {'result':<9} lost")
    for fault, result, lost in _FAULT_ROWS:
        terminalreporter.write_line(f"{fault:<{width}}  {result:<9} {lost}")
    survived = sum(result == "survived" for _, result, _ in _FAULT_ROWS)
    terminalreporter.write_line(f"{survived}/{len(_FAULT_ROWS)} survived")
