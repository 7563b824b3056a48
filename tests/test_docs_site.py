"""The documentation site (mkdocs.yml: docs/ and the API pages mkdocstrings generates
from the docstrings) builds with warnings as errors.

Skipped when mkdocs or mkdocstrings' Python handler is not installed
(``pip install "mkdocs>=1.6" "mkdocstrings[python]>=0.26"``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings_handlers.python")

ROOT = Path(__file__).resolve().parents[1]


def test_site_builds_with_warnings_as_errors(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}{result.stderr}"
    assert (tmp_path / "site" / "api" / "index.html").exists()
