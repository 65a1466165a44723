"""infra/Dockerfile, linted in place of a build (no container builder or registry here): its stages and their
order, the layers' order (dependencies before code), Docker's scoping of build arguments, and the
README's build commands against the arguments the file declares."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

from tests.helpers import REPO_ROOT

DOCKERFILE = REPO_ROOT / "infra" / "Dockerfile"
README = REPO_ROOT / "infra" / "README.md"
CODE = ("platform", "jobs", "pipelines", "serve", "infra")
BUILD_TOOLS = {"build-essential", "git", "python3-venv"}
VARIABLE = re.compile(r"\$\{?(\w+)")


@dataclass
class Stage:
    """One ``FROM ... AS name`` and its instructions, as (keyword, arguments) in order."""

    name: str
    parent: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [text for kw, text in self.instructions if kw == keyword]

    def declared(self) -> set[str]:
        """Names its ARG and ENV instructions declare."""
        names = {text.split("=")[0] for text in self.args("ARG")}
        for text in self.args("ENV"):
            names |= set(re.findall(r"(?:^|\s)(\w+)=", text))
        return names


def instructions(text: str) -> list[tuple[str, str]]:
    """(keyword, arguments) of every instruction: comment lines dropped (a backslash ending one continues
    nothing), then continued lines joined."""
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    found = []
    for line in code.replace("\\\n", " ").splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            found.append((keyword.upper(), " ".join(rest.split())))
    return found


def parse() -> tuple[set[str], list[Stage]]:
    """The global ARGs (before the first FROM) and the stages."""
    global_args, stages = set(), []
    for keyword, text in instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            image, _, name = text.partition(" AS ")
            stages.append(Stage(name=name.strip(), parent=image.strip()))
        elif not stages:
            assert keyword == "ARG", f"only ARG may come before the first FROM, not {keyword}"
            global_args.add(text.split("=")[0])
        else:
            stages[-1].instructions.append((keyword, text))
    return global_args, stages


def stage(name: str) -> Stage:
    return {s.name: s for s in parse()[1]}[name]


def index(stage_: Stage, keyword: str, pattern: str) -> int:
    """Position of the first ``keyword`` instruction matching ``pattern`` in ``stage_``."""
    hits = [i for i, (kw, text) in enumerate(stage_.instructions) if kw == keyword and re.search(pattern, text)]
    assert hits, f"{stage_.name}: no {keyword} matching {pattern!r}"
    return hits[0]


def apt_packages(stage_: Stage) -> set[str]:
    return {pkg for text in stage_.args("RUN") for chunk in re.findall(r"apt-get install ([^&;]+)", text)
            for pkg in chunk.split() if not pkg.startswith("-")}


def test_stages_come_in_build_order_and_the_runtime_is_the_default_target():
    global_args, stages = parse()
    assert [(s.name, s.parent) for s in stages] == [
        ("base", "${BASE_IMAGE}"), ("deps", "base"), ("vllm", "deps"), ("runtime", "base")]
    assert global_args == {"BASE_IMAGE"}, "a global ARG is visible only in FROM lines"


def test_dependencies_are_installed_from_pyproject_alone_before_any_code():
    deps, vllm = stage("deps"), stage("vllm")
    assert [text.split()[0] for text in deps.args("COPY")] == ["pyproject.toml", "infra/install.sh"]
    assert deps.args("COPY")[0] == "pyproject.toml ./", "README.md changes often and no dependency reads it"
    assert vllm.args("COPY") == ["infra/install-vllm.sh infra/install-vllm.sh"]
    assert index(deps, "RUN", r"install\.sh --deps-only") > index(deps, "COPY", "install.sh")


def test_runtime_takes_the_environments_then_the_code_then_compiles_it_and_drops_root():
    runtime = stage("runtime")
    venv = index(runtime, "COPY", r"^--from=deps /opt/venv /opt/venv$")
    vllm = index(runtime, "COPY", r"^--from=vllm /opt/vllm-venv /opt/vllm-venv$")
    code = [index(runtime, "COPY", rf"^{name} {name}$") for name in CODE]
    project = index(runtime, "RUN", r"install\.sh --project-only")
    compiled = index(runtime, "RUN", r"compileall .* /app$")
    assert venv < vllm < min(code), "the environments' layers come before any code"
    assert code[0] < project < min(code[1:]), "the core library is installed, then the often-changing packages"
    assert max(code) < compiled < len(runtime.instructions) - 2
    assert runtime.instructions[-2:] == [("USER", "1000:1000"), ("WORKDIR", "/home/ray")], \
        "numeric, so that runAsNonRoot can verify it"


def test_build_tools_stay_in_the_build_stage():
    assert BUILD_TOOLS <= apt_packages(stage("deps"))
    assert not (BUILD_TOOLS | {"build-essential"}) & (apt_packages(stage("base")) | apt_packages(stage("runtime")))
    (jit,) = [text for text in stage("runtime").args("RUN") if "apt-get install" in text]
    assert jit.startswith("if [ -d /usr/local/cuda ]; then"), "compilers only on CUDA bases (kernels built on use)"
    assert apt_packages(stage("runtime")) == {"gcc", "g++", "python3-dev"}


def test_the_vllm_environment_and_its_variable_exist_only_when_asked_for():
    vllm, runtime = stage("vllm"), stage("runtime")
    (install,) = vllm.args("RUN")
    assert re.search(r'if \[ -n "\$VLLM_DEVICE" \]; then python3 -m venv /opt/vllm-venv && sh infra/install-vllm\.sh',
                     install)
    (variable,) = [text for text in runtime.args("ENV") if text.startswith("LLAVA_VLLM_PYTHON=")]
    assert variable == "LLAVA_VLLM_PYTHON=${VLLM_DEVICE:+/opt/vllm-venv/bin/python}", \
        "empty (unset for the engine) unless VLLM_DEVICE is given"


def test_every_variable_a_stage_uses_is_declared_in_it_or_inherited():
    """Docker's scoping: an ARG declared before FROM or in another stage is empty here (a silent default)."""
    stages = {s.name: s for s in parse()[1]}
    for current in stages.values():
        visible, parent = current.declared() | {"PATH", "HOME"}, stages.get(current.parent)
        while parent is not None:  # ENV is inherited from the stage built on, ARG is not
            visible |= {n for text in parent.args("ENV") for n in re.findall(r"(?:^|\s)(\w+)=", text)}
            parent = stages.get(parent.parent)
        for keyword, text in current.instructions:
            if keyword in ("RUN", "ENV", "COPY", "WORKDIR", "USER"):
                unknown = set(VARIABLE.findall(text)) - visible
                assert not unknown, f"{current.name}: {keyword} uses {sorted(unknown)}, not declared in the stage"


def build_commands(text: str) -> list[list[str]]:
    """Every ``docker build`` command of ``text`` (README blocks, or the Dockerfile's header comment)."""
    text = re.sub(r"^#\s?", "", text, flags=re.M)
    joined = text.replace("\\\n", " ")
    return [shlex.split(line[line.index("docker build"):]) for line in joined.splitlines() if "docker build" in line]


def build_args(command: list[str]) -> dict[str, str]:
    return dict(command[i + 1].split("=", 1) for i, arg in enumerate(command) if arg == "--build-arg")


def test_readme_builds_what_the_dockerfile_documents_with_vllm_in_the_cuda_image():
    readme = build_commands("\n".join(re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)))
    header = build_commands(DOCKERFILE.read_text().split("\nARG ")[0])
    assert readme == header and len(readme) == 2, "the README and the Dockerfile give the same two builds"
    cpu, cuda = readme
    declared = {name for s in parse()[1] for name in s.declared()} | parse()[0]
    for command in readme:
        assert command[:4] == ["docker", "build", "-f", "infra/Dockerfile"] and command[-1] == "."
        assert set(build_args(command)) <= declared, "a misspelt --build-arg would be ignored"
    assert build_args(cpu) == {}
    args = build_args(cuda)
    assert args["VLLM_DEVICE"] == "gpu", "LLAVA_VLLM_PYTHON points at an environment the image holds"
    cuda_version = re.search(r"cuda:(\d+)\.(\d+)", args["BASE_IMAGE"])
    assert args["TORCH_INDEX_URL"].endswith(f"/cu{cuda_version[1]}{cuda_version[2]}"), "torch's CUDA = the base's"
