"""ruff over every Python file of the project: a file ruff skips is checked by nothing. (Its default
`exclude` holds names such as `dist` and `build`: the Ray layer, once in dsum/dist/, went unchecked.)"""

import subprocess
import sys

from conftest import ROOT

CHECKED = ("dsum", "tests", "bench")


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True)


def test_ruff_clean():
    proc = _ruff("check", *CHECKED)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_checks_every_python_file_of_the_project():
    """ruff's own list of the files it checks (--show-files) against the tree's .py files."""
    listed = {line.strip() for line in _ruff("check", "--show-files", *CHECKED).stdout.splitlines() if line.strip()}
    tree = {str(p) for d in CHECKED for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts}
    assert tree and tree - listed == set()
