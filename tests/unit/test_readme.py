"""Every command in README.md's code blocks and figures table still exists as written: a renamed module, flag
or make target fails here, not in a newcomer's terminal.

- ``python -m jobs.<name> ...`` with a ``--dry-run``: the whole command, dry (its flags and overrides resolve);
  without one: ``--help``, and every ``--flag`` the README passes must be in it;
- ``make <target>``: ``make -n`` (the target exists);
- other programs of the environment (``ray``, ``serve``, ``mlflow``): ``<program> <subcommand> --help``, and the
  flags the README passes must be in it.

The README's front matter stays true too: at most 200 lines, and no commit hashes (history lives in git).
"""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT
from tests.helpers.servers import VENV_BIN

README = REPO_ROOT / "README.md"
DRY_RUN_JOBS = ("pipeline", "compose", "preprocess", "train")
"""The jobs whose ``--dry-run`` resolves a whole command without running it."""
PROGRAMS = ("ray", "serve", "mlflow")


def commands(text: str) -> list[str]:
    """The commands of the README's bash blocks (continuation lines joined) and of its backticked table cells."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        block = re.sub(r"<<'(\w+)'\n.*?\n\1\n", "\n", block, flags=re.S)  # a heredoc's body is not a command
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                found.append(line)
    found += [c for c in re.findall(r"\| `((?:python|make) [^`]+)` \|", text)]
    return found


def runnable(command: str) -> list[str] | None:
    """The command as argv, its program resolved in the project's environment (``None``: not ours to check)."""
    argv = shlex.split(command.replace("$PWD", str(REPO_ROOT)).replace("$MLFLOW_TRACKING_URI", "http://127.0.0.1:9"))
    program = argv[0].removeprefix(".venv/bin/")
    if program == "python" and argv[1:2] == ["-"]:  # a script on standard input
        return None
    if program == "python":
        return [sys.executable, *argv[1:]]
    if program == "make" or program in PROGRAMS:
        return [program if program == "make" else str(VENV_BIN / program), *argv[1:]]
    return None


def test_the_readme_is_a_front_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    assert not re.search(r"\b(commit|at) [0-9a-f]{7,40}\b", text), "no commit hashes: history lives in git"


def readme_commands() -> list[str]:
    return [c for c in commands(README.read_text()) if runnable(c)]


def test_the_readme_commands_are_found():
    found = readme_commands()
    assert any("jobs.pipeline" in c for c in found) and any(c.startswith("make demo") for c in found)
    assert any("ray job submit" in c for c in found) and any("jobs.perf.serve" in c for c in found)


@pytest.mark.parametrize("command", readme_commands())
def test_every_readme_command_resolves(command, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)  # a dry run writes nothing, but if one did it would land here
    argv = runnable(command)
    inner = argv.index("--") if "--" in argv else None  # `ray job submit ... -- python -m jobs.x ...`
    if inner is not None:
        check(runnable(shlex.join(argv[inner + 1:])), command, capsys)
        argv = argv[:inner]
    check(argv, command, capsys)


def check(argv: list[str], command: str, capsys) -> None:
    """Resolve one command in this process (the modules' and CLIs' own parsers; nothing runs)."""
    if argv[0] == "make":
        done = subprocess.run(["make", "-n", *argv[1:2]], cwd=REPO_ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return
    if argv[1:2] == ["-m"]:
        module = importlib.import_module(argv[2])
        dry = argv[2].removeprefix("jobs.") in DRY_RUN_JOBS
        head, rest = argv[:3], argv[3:]
        with pytest.raises(SystemExit) as exit_info:
            module.main([*rest, "--dry-run"] if dry else ["--help"])
        printed = capsys.readouterr()
        assert exit_info.value.code in (0, None), f"{command}: {printed.err[-2000:]}"
        if dry:
            return
        help_text = printed.out
    else:
        words = [w for w in argv[1:] if not w.startswith("-")]
        head = [argv[0], *(words[:2] if words[:1] == ["job"] else words[:1])]
        help_text = click_help(Path(argv[0]).name, head[1:])
        rest = argv[len(head):]
    flags = {w.split("=")[0] for w in rest if w.startswith("--")}
    missing = sorted(f for f in flags if f not in help_text)
    assert not missing, f"{command}: {missing} not in `{' '.join(Path(h).name for h in head)} --help`"


def click_help(program: str, subcommand: list[str]) -> str:
    """``<program> <subcommand> --help`` of the environment's click CLIs (``ray``, ``serve``, ``mlflow``)."""
    from click.testing import CliRunner

    if program == "ray":
        from ray.scripts.scripts import cli
    elif program == "serve":
        from ray.serve.scripts import cli
    else:
        from mlflow.cli import cli
    result = CliRunner().invoke(cli, [*subcommand, "--help"])
    assert result.exit_code == 0, f"{program} {' '.join(subcommand)} --help: {result.output[-2000:]}"
    return result.output


def test_a_renamed_module_or_flag_fails_the_check(capsys):
    """Negative control: what a stale README line would look like."""
    with pytest.raises(AssertionError, match=r"\['--engines'\] not in"):
        check(runnable("python -m jobs.deploy --model m --engines vllm"), "stale flag", capsys)
    with pytest.raises(ModuleNotFoundError):
        check(runnable("python -m jobs.benchmarks.serve"), "stale module", capsys)
    with pytest.raises(AssertionError, match=r"\['--head-node'\] not in"):
        check(runnable("ray start --head-node"), "stale CLI flag", capsys)
