"""Every command of README "After the demo", as written and in README order, on a fresh clone and a fresh
home folder: ``make demo`` (shortened: the recipe overrides below), ``serve run serve/config.yaml`` and a
curl call, then the cluster block (``ray start``, an ``mlflow server``, two ``ray job submit``, an openai
call, ``ray stop``). ``make walkthrough`` runs it (about 6 minutes; not part of ``make test``, and alone:
the README's ``ray stop`` stops every Ray instance on the machine).

The only change to the README's commands: the lines that run the pipeline (``make demo``, ``python -m
jobs.pipeline``) get ``SHORT`` appended, a few training steps on a small dataset instead of 10 minutes.
The clone uses this checkout's ``.venv`` (a link; ``make`` finds it up to date).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

SECTION = "## After the demo"
SHORT = ["synthetic.train_records=64", "synthetic.caption_records=32", "synthetic.eval_records=8",
         "stage1.max_steps=2", "stage2.max_steps=4", "checkpoint.every_n_steps=2", "evaluation.batch_size=4"]
"""Appended to every command that runs the pipeline: the same steps, a few minutes instead of ten."""
ENDPOINT = "http://127.0.0.1:8000"


def readme_blocks(readme: Path = REPO_ROOT / "README.md") -> list[str]:
    """The bash blocks of README's "After the demo" section, in order."""
    text = readme.read_text()
    start = text.index(SECTION)
    section = text[start:text.index("\n## ", start + 1)]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.S)


def shortened(block: str) -> str:
    """``block`` with ``SHORT`` appended to each command (lines joined by ``\\``) that runs the pipeline."""
    lines, command = [], []
    for line in block.splitlines():
        command.append(line)
        if line.endswith("\\"):
            continue
        if any("jobs.pipeline" in part for part in command):
            command[-1] = f"{line} {' '.join(SHORT)}"
        lines.extend(command)
        command = []
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Clone:
    repo: Path
    env: dict[str, str]
    logs: Path

    def run(self, script: str, name: str, timeout_s: float) -> str:
        """``bash -e`` on ``script`` in the clone; its output (failing with the end of it unless it succeeded)."""
        log = self.logs / f"{name}.log"
        with open(log, "wb") as out:
            code = subprocess.run(["bash", "-e", "-c", script], cwd=self.repo, env=self.env, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=timeout_s).returncode
        output = log.read_text(errors="replace")
        assert code == 0, f"{name} exited {code}:\n{output[-6000:]}"
        return output


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Clone:
    root = tmp_path_factory.mktemp("walkthrough")
    repo, home, logs = root / "repo", root / "home", root / "logs"
    home.mkdir()
    logs.mkdir()
    subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(repo)], check=True)
    (repo / ".venv").symlink_to(REPO_ROOT / ".venv")
    (REPO_ROOT / ".venv" / ".installed").touch()  # newer than the clone's files: make reuses the environment
    # a new user's shell: none of this test session's Ray, MLflow or S3 settings, no ~/.ray of anyone's
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_"))}
    env.update(HOME=str(home), PATH=os.environ["PATH"].replace(f"{REPO_ROOT / '.venv' / 'bin'}:", ""))
    yield Clone(repo, env, logs)
    # whatever a failed step left running: this clone's Ray (the README's `ray stop`) and servers
    subprocess.run(["bash", "-c", ". .venv/bin/activate && ray stop --force"], cwd=repo, env=env,
                   capture_output=True, timeout=120)
    subprocess.run(["pkill", "-f", f"mlflow server .*{repo.name}|outputs/mlflow-server.db"], capture_output=True)


def wait_until_ready(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"{process.args} exited {process.returncode} before serving"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    raise AssertionError(f"nothing served {url} within {timeout_s} s")


def ask(image: Path, question: str) -> str:
    """The endpoint's greedy answer (as the demo asks it) to ``question`` about ``image``."""
    import base64

    import openai

    url = f"data:image/jpeg;base64,{base64.b64encode(image.read_bytes()).decode()}"
    return openai.OpenAI(base_url=f"{ENDPOINT}/v1", api_key="unused", max_retries=0).chat.completions.create(
        model="tiny-cpu-demo", max_tokens=8, temperature=0, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}],
    ).choices[0].message.content


def test_the_readme_commands_work_in_readme_order(clone):
    serve_block, curl_block, cluster_block = readme_blocks(clone.repo / "README.md")
    assert serve_block.strip() == ".venv/bin/serve run serve/config.yaml"

    # 1. the demo, as `make demo` runs it (shortened)
    clone.run(f"make demo ARGS='{' '.join(SHORT)}'", "1-demo", timeout_s=1200)
    result = json.loads((clone.repo / "outputs" / "tiny-cpu-demo" / "latest" / "result.json").read_text())
    assert result["model_uri"] == "models:/tiny-cpu-demo/1" and result["demo"]["answer"] is not None
    assert Path(clone.env["HOME"], ".ray", "auth_token").exists(), \
        "the demo's local Ray left no token: the README's RAY_AUTH_MODE line would be untested"

    # 2. `serve run serve/config.yaml` serves the model the demo trained, the curl call gets an answer
    log = clone.logs / "2-serve-run.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(["bash", "-c", serve_block], cwd=clone.repo, env=clone.env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_ready(f"{ENDPOINT}/healthz", server, timeout_s=300)
        reply = json.loads(clone.run(curl_block, "3-curl", timeout_s=120))
        assert reply["model"] == "tiny-cpu-demo" and reply["choices"][0]["message"]["role"] == "assistant"
        demo = result["demo"]
        assert ask(clone.repo / demo["image"], demo["question"]) == demo["answer"], \
            "serve run answers the demo's question differently: it is not serving the demo's model"
        with urllib.request.urlopen(f"{ENDPOINT}/", timeout=30) as page:
            assert b"<title>LLaVA Platform chat</title>" in page.read()
    finally:
        os.killpg(server.pid, signal.SIGINT)  # Ctrl-C
        server.wait(timeout=120)

    # 3. the cluster block: ray start, mlflow server, the submitted pipeline and deploy, an openai call
    output = clone.run(shortened(cluster_block), "4-cluster", timeout_s=1800)
    answers = [line for line in output.splitlines() if line.startswith("answer: ")]
    assert len(answers) == 1, output[-3000:]
    submitted = json.loads((clone.repo / "outputs" / "submitted" / "result.json").read_text())
    assert submitted["tracking_uri"] == "http://127.0.0.1:5000", "the tracking URI did not reach the job"
    assert submitted["model_uri"] == "models:/tiny-cpu-demo/1"
    import mlflow

    registry = mlflow.MlflowClient(f"sqlite:///{clone.repo / 'outputs' / 'mlflow-server.db'}")
    version = registry.get_model_version("tiny-cpu-demo", "1")
    assert version.run_id == submitted["runs"]["stage2"], "the server's registry does not hold the job's model"
