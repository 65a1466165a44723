"""Nothing in this repository may shadow the standard library's `platform` module."""

import subprocess
import sys

from tests.helpers import REPO_ROOT


def test_no_package_named_platform():
    assert not (REPO_ROOT / "platform" / "__init__.py").exists()
    assert not (REPO_ROOT / "platform.py").exists()


def test_import_platform_from_repo_root_is_the_standard_library():
    """What `python -m jobs.x` and `ray job submit --working-dir .` see: the repo root on sys.path."""
    code = (
        "import platform, sysconfig; "
        "print(platform.system()); print(platform.__file__); print(sysconfig.get_paths()['stdlib'])"
    )
    env = {"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    system, module_file, stdlib = out[0], out[1], out[2]
    assert system == "Linux"
    assert module_file.startswith(stdlib), f"`platform` resolved to {module_file}, not the standard library"


def test_core_library_imports_alongside_stdlib_platform():
    code = "import platform, llava_platform, torch, ray; print(platform.machine(), llava_platform.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "platform/llava_platform/__init__.py" in out
