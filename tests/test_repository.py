"""
Repository hygiene the MONAI model zoo enforces on a bundle: flake8, black and isort at 120 columns (settings in
``setup.cfg`` and ``pyproject.toml``), JSON configs indented by 4 spaces, no tracked file over 1 MB, and
documentation whose links and ``python -m scripts...`` commands resolve.

The checks look at the files git tracks, which is what a clone of the bundle (and the zoo's CI) sees; outputs
ignored by git (``models/``, ``eval/``, ``data/``) and work not yet added are not the repository's content.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_FILE_BYTES = 1024 * 1024  # the zoo's pre-commit ``check-added-large-files --maxkb=1024``


def _tracked(*patterns: str) -> list[str]:
    """Paths, relative to the repository root, of the tracked files that match the git pathspec ``patterns``."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    result = subprocess.run(
        ["git", "ls-files", "-z", "--", *patterns], cwd=REPO, capture_output=True, text=True, check=True
    )
    return [name for name in result.stdout.split("\0") if name]


def _run_tool(module: str, *args: str) -> None:
    """Run ``python -m <module> <args>`` on the tracked python files in the repository root; fail with its output."""
    files = _tracked("*.py")
    assert files, "git tracks no python file"
    result = subprocess.run(
        [sys.executable, "-m", module, *args, *files], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{module} failed:\n{result.stdout}\n{result.stderr}"


def test_flake8():
    _run_tool("flake8")


def test_black():
    _run_tool("black", "--check", "--quiet")


def test_isort():
    _run_tool("isort", "--check-only", "--diff")


def test_json_configs_are_indented_by_four_spaces():
    # the zoo's pre-commit hook ``pretty-format-json --indent=4 --no-sort-keys`` writes exactly this text
    files = _tracked("configs/*.json", "configs/**/*.json")
    assert files, "git tracks no JSON config"
    for name in files:
        text = (REPO / name).read_text()
        assert text == json.dumps(json.loads(text), indent=4) + "\n", f"{name} is not indented by 4 spaces"


def test_no_large_files():
    too_large = [
        name for name in _tracked() if (REPO / name).is_file() and (REPO / name).stat().st_size > MAX_FILE_BYTES
    ]
    assert not too_large, f"tracked files over {MAX_FILE_BYTES} bytes (ship them as large_files.yml links): {too_large}"


def test_documentation_links_and_commands_resolve():
    """Every relative link of the tracked Markdown files names a tracked file, and every ``python -m scripts.x``
    a module of the bundle: the docs move with the code."""
    tracked = set(_tracked())
    broken = []
    checked = 0
    for name in _tracked("*.md", "**/*.md"):
        text = (REPO / name).read_text()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target or target.startswith("mailto:"):
                continue
            path = os.path.normpath(Path(name).parent / target)
            if path not in tracked and not (REPO / path).is_dir():
                broken.append(f"{name}: {target}")
            checked += 1
        for module in re.findall(r"python -m (scripts(?:\.\w+)+)", text):
            if f"{module.replace('.', '/')}.py" not in tracked:
                broken.append(f"{name}: python -m {module}")
    assert not broken, f"links or commands that point at nothing: {broken}"
    assert checked > 10, "the link pattern found (almost) no links"
