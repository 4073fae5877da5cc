"""The distribution as a user gets it: the wheel installs one top-level package, `mailmeter`.

The wheel is built from a copy of this checkout (`pip wheel`, as `pip install .` builds
it), installed apart from the checkout and its editable install (`pip install --no-deps
--target`), and run from there: every module of relay/, metering/, policies/ and mailmeter/
is in it under the `mailmeter` name and imports from the installed copy, and the `mailmeter`
command answers --help. Nothing else is installed at the top level, so no name collides
with another distribution in the user's environment (`relay`, `metering` and `policies`
did before issue 16).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCES = {
    "mailmeter": "mailmeter",
    "relay": "mailmeter/relay",
    "metering": "mailmeter/metering",
    "policies": "mailmeter/policies",
}


def _run(
    argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, (argv, done.stdout[-2000:], done.stderr[-2000:])
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this checkout (tracked and new files, as committed or being committed)."""
    work = tmp_path_factory.mktemp("wheel")
    files = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO).stdout
    source = work / "source"
    for name in filter(None, files.split("\0")):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((REPO / name).read_bytes())
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(work / "dist"), str(source)])
    [built] = (work / "dist").glob("mailmeter-*.whl")
    return built


def test_the_wheel_installs_one_top_level_package_named_mailmeter(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if ".dist-info/" not in name} == {"mailmeter"}
    [top_level] = [name for name in names if name.endswith(".dist-info/top_level.txt")]
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["mailmeter"]
    expected = {
        f"{installed}/{path.relative_to(REPO / folder).as_posix()}"
        for folder, installed in SOURCES.items()
        for path in (REPO / folder).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert {name for name in names if name.endswith(".py")} == expected


def test_the_installed_wheel_imports_every_module_and_runs_the_command(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(wheel)])
    modules = sorted(
        ".".join(path.relative_to(target).with_suffix("").parts).removesuffix(".__init__")
        for path in (target / "mailmeter").rglob("*.py")
    )
    assert "mailmeter.metering.sqlite.ledger" in modules and "mailmeter.relay.smtpd" in modules
    # The installed copy first on the path; the dependencies come from this venv.
    env = {**os.environ, "PYTHONPATH": str(target)}
    check = (
        "import importlib\n"
        f"for name in {modules!r}:\n"
        "    module = importlib.import_module(name)\n"
        f"    assert module.__file__.startswith({str(target)!r}), (name, module.__file__)\n"
    )
    _run([sys.executable, "-c", check], cwd=tmp_path, env=env)
    helped = _run([str(target / "bin" / "mailmeter"), "--help"], cwd=tmp_path, env=env)
    assert helped.stdout.startswith("usage: mailmeter")
    as_module = _run([sys.executable, "-m", "mailmeter.cli", "--help"], cwd=tmp_path, env=env)
    assert as_module.stdout == helped.stdout
