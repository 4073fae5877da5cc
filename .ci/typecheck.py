"""mypy over the package as it installs: mailmeter.relay, mailmeter.metering and mailmeter.policies.

Those subpackages live in relay/, metering/ and policies/ (pyproject.toml's package-dir), and
mypy cannot follow the editable install's import hook to them. So this lays the package out
under its installed names with symlinks in a temporary directory, runs mypy there with
pyproject.toml's [tool.mypy] settings, and prints what it finds with the repository's paths.
Usage: .venv/bin/python .ci/typecheck.py  (exit status: mypy's).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def folders() -> dict[str, str]:
    """Each top-level package and mapped subpackage, as installed name -> its folder in the repository."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = dict(setuptools.get("package-dir", {}))
    tops = {package for package in setuptools["packages"] if "." not in package}
    return {**{top: mapped.get(top, top) for top in tops}, **mapped}


def main() -> int:
    layout = folders()
    with tempfile.TemporaryDirectory(prefix="mailmeter-typecheck.") as work:
        view = Path(work)
        for name, folder in sorted(layout.items(), key=lambda item: item[0].count(".")):
            target = view.joinpath(*name.split("."))
            if "." not in name:  # a real directory: its subpackages are linked into it
                target.mkdir(parents=True)
                for entry in (REPO / folder).iterdir():
                    if entry.name != "__pycache__":
                        (target / entry.name).symlink_to(entry)
            else:
                target.symlink_to(REPO / folder)
        command = [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(REPO / "pyproject.toml"),
            "--cache-dir",
            str(REPO / ".mypy_cache"),
            *(f"--package={top}" for top in layout if "." not in top),
        ]
        done = subprocess.run(command, cwd=view, capture_output=True, text=True, check=False)
    # Back to the repository's paths, the deepest mapping first (mailmeter/relay/ before mailmeter/).
    output = done.stdout + done.stderr
    for name, folder in sorted(layout.items(), key=lambda item: -item[0].count(".")):
        output = output.replace(name.replace(".", "/") + "/", folder + "/" if "." in name else f"\0{folder}/")
    sys.stdout.write(output.replace("\0", ""))
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
