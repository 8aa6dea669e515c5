"""The package as Python users install it: ``pip install .`` gives ``seemore_ds`` and a ``seemore-ds``
command that work from any folder, not only from the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_installed_package_runs_from_any_folder(tmp_path):
    source, target, elsewhere = tmp_path / "source", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Built from a copy of what the package needs, so that the build leaves nothing in the checkout.
    shutil.copytree(REPO / "seemore_ds", source / "seemore_ds", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "requirements.txt", "README.md"):
        shutil.copy(REPO / name, source / name)
    # --no-build-isolation: build with this environment's setuptools instead of fetching one.
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, cwd=tmp_path, capture_output=True)
    # Only the installed copy is importable: no checkout on the path, and the command runs outside it.
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import seemore_ds; print(seemore_ds.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(target)
    script = target / "bin" / "seemore-ds"
    made = subprocess.run([sys.executable, str(script), "data", "synth", "--out", "shapes.csv", "--n", "3"],
                          cwd=elsewhere, env=env, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    assert len((elsewhere / "shapes.csv").read_text().splitlines()) == 4  # header + 3 rows
    refused = subprocess.run([sys.executable, str(script), "train", "no.such_key=1"], cwd=elsewhere, env=env,
                             capture_output=True, text=True)
    assert refused.returncode == 2 and refused.stderr.startswith("error: ")
