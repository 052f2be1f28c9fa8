"""The distribution installs one top-level import name, ``iiotfl``, with every package and config file."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, cwd=out, capture_output=True)
    (found,) = out.glob("iiotfl-*.whl")
    return found


def test_the_wheel_adds_one_top_level_import_name(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"iiotfl"}
    for folder in ("configs", "compat", "tasks", "strategies", "links", "security", "privacy", "clients", "server"):
        sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / folder).rglob("*.py")}
        packed = {n.removeprefix("iiotfl/") for n in names if n.startswith(f"iiotfl/{folder}/") and n.endswith(".py")}
        assert packed == sources, f"{folder}: not in the wheel: {sorted(sources - packed)}"
    yaml = {p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml")}
    assert yaml <= {n.removeprefix("iiotfl/") for n in names}


def test_the_installed_package_composes_its_configs(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    # the wheel's copy first on the path: it is found before the editable install's finder
    probe = ("import sys; sys.path.insert(0, %r); "
             "import iiotfl.configs as c; from iiotfl.server.launch import validate; "
             "validate(c.compose()); print(c.__file__)") % str(target)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().startswith(str(target))
