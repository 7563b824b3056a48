"""Every Python block of the README and docs/ runs as it is, or says it is a fragment.

A fenced ```` ```python ```` block whose first line starts with ``# fragment`` is a
piece of a larger program (a config file, a snippet that needs your model) and is
only checked to be marked. Every other Python block is a complete program: it is
written to a file in a temporary folder and run — with
``python -m torch.distributed.run --standalone --nproc_per_node=N`` when its first
line says ``run with: torchrun ... --nproc_per_node=N``, else with ``python`` — on
CPU (gloo), with distnorm's compiled kernels off to keep it to seconds. A block
whose run stops at a missing optional package (``ModuleNotFoundError`` for anything
but distnorm) is skipped.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List, NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                   re.MULTILINE | re.DOTALL)
TORCHRUN = re.compile(r"run with: torchrun\b.*--nproc_per_node[= ](?P<n>\d+)")
MISSING = re.compile(r"ModuleNotFoundError: No module named '(?P<name>[\w.]+)'")

pytestmark = pytest.mark.slow


class Block(NamedTuple):
    page: str
    line: int
    info: str
    code: str

    @property
    def fragment(self) -> bool:
        return self.code.lstrip().startswith("# fragment")

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def blocks() -> List[Block]:
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            indent = match.group("indent")
            body = "\n".join(line[len(indent):] for line in match.group("body").splitlines())
            found.append(Block(str(page.relative_to(ROOT)), text.count("\n", 0, match.start()) + 1,
                               match.group("info").strip(), body + "\n"))
    return found


PYTHON = [b for b in blocks() if b.info.split()[:1] == ["python"]]
COMPLETE = [b for b in PYTHON if not b.fragment]


def test_the_pages_have_complete_examples():
    assert len(COMPLETE) >= 4, [str(b) for b in COMPLETE]
    assert any(b.page == "README.md" for b in COMPLETE)


@pytest.mark.parametrize("block", PYTHON, ids=str)
def test_every_python_block_parses_or_is_a_marked_fragment(block):
    if block.fragment:
        return
    try:
        compile(block.code, str(block), "exec")
    except SyntaxError as error:
        pytest.fail(f"{block}: not valid Python ({error}); complete it, or start it with "
                    f"'# fragment: ...'")


@pytest.mark.parametrize("block", COMPLETE, ids=str)
def test_complete_python_block_runs(block, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(block.code, encoding="utf-8")
    first = block.code.splitlines()[0]
    torchrun = TORCHRUN.search(first)
    command = [sys.executable, "example.py"]
    if torchrun:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={torchrun.group('n')}", "example.py"]
    env = dict(os.environ, DISTNORM_COMPILE="0", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        missing = MISSING.search(output)
        if missing and not missing.group("name").startswith("distnorm"):
            pytest.skip(f"{block} needs {missing.group('name')}, which is not installed")
    assert proc.returncode == 0, f"{block} failed:\n{output[-3000:]}"
