"""What users' tools look for in the installed package: type information, the docs the docstrings name, the configs."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> set[str]:
    pytest.importorskip("setuptools")
    out, source = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):  # a copy: the build writes its build/ and egg-info beside them
        shutil.copy(ROOT / name, source / name)
    for name in ("fastface_pl", "conf", "docs"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = out.glob("fastface_pl-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def test_the_wheel_is_typed_and_carries_every_doc_and_config(wheel_names):
    assert "fastface_pl/py.typed" in wheel_names
    docs = sorted(path.name for path in (ROOT / "docs").glob("*.md"))
    assert docs and all(f"fastface_pl/docs/{name}" in wheel_names for name in docs)
    configs = [path.relative_to(ROOT / "conf").as_posix() for path in (ROOT / "conf").rglob("*.yaml")]
    assert configs and all(f"fastface_pl/conf/{name}" in wheel_names for name in configs)


def test_every_doc_a_docstring_names_exists():
    import re

    named = set()
    for path in (ROOT / "fastface_pl").rglob("*.py"):
        named |= set(re.findall(r"docs/([a-z_]+\.md)", path.read_text()))
    missing = sorted(name for name in named if not (ROOT / "docs" / name).is_file())
    assert named and not missing, f"docstrings name docs that do not exist: {missing}"


def test_every_result_file_readme_and_docs_quote_is_stored():
    import re

    quoted = set()
    for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        quoted |= set(re.findall(r"benchmarks/results/[\w.-]+\.(?:json|png|csv)", path.read_text()))
    waiting = {"benchmarks/results/gpu_check.json"}  # written by benchmarks/gpu_check.py on a GPU machine
    missing = sorted(name for name in quoted - waiting if not (ROOT / name).is_file())
    assert quoted and not missing, f"figures quoted without their stored file: {missing}"
