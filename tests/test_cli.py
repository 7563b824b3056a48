"""The ``distnorm`` command: version, help of every subcommand, ``python -m distnorm``,
the scripts found in an installed package, and what the wheel ships."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import distnorm
from distnorm import cli

ROOT = Path(__file__).resolve().parents[1]


def _run(argv, capsys):
    """cli.main's status (a SystemExit's code counts as returned) and its output."""
    try:
        code = cli.main(argv)
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_version(capsys):
    code, out = _run(["--version"], capsys)
    assert code == 0 and out.startswith(f"distnorm {distnorm.__version__} (torch ")


def test_python_dash_m_distnorm():
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "distnorm", "--version"], cwd=ROOT.parent,
                          capture_output=True, text=True, timeout=120, check=False,
                          env=dict(os.environ, PYTHONPATH=path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"distnorm {distnorm.__version__}")


def test_top_level_help_lists_every_command(capsys):
    code, out = _run(["--help"], capsys)
    assert code == 0 and "--version" in out
    for command in ("demo", "train", "bench", "slurm"):
        assert command in out


def test_bench_help_lists_the_benchmarks(capsys):
    code, out = _run(["bench", "--help"], capsys)
    assert code == 0 and out.startswith("usage: distnorm bench {layer,model,gpu,precise_bn}")
    for name in ("layer", "model", "gpu", "precise_bn"):
        assert f"benchmarks/{name}.py" in out


@pytest.mark.parametrize("name, option", [("layer", "--shapes"), ("model", "--methods"),
                                          ("precise_bn", "--batches")])
def test_each_benchmark_has_its_own_help(capsys, name, option):
    code, out = _run(["bench", name, "--help"], capsys)
    assert code == 0
    assert out.startswith(f"usage: distnorm bench {name} ") and option in out


def test_bench_gpu_dispatches_to_its_script(capsys):
    code, out = _run(["bench", "gpu", "--help"], capsys)
    if cli.script_path("bench", "gpu.py") is None:
        assert code == 2 and "no benchmarks/gpu.py" in out
    else:
        assert code == 0 and out.startswith("usage: distnorm bench gpu")


def test_unknown_benchmark_and_command_are_errors(capsys):
    code, out = _run(["bench", "nope"], capsys)
    assert code == 2 and "unknown benchmark 'nope'" in out
    code, out = _run(["nope"], capsys)
    assert code == 2 and "invalid choice" in out


@pytest.mark.parametrize("command", ["train", "demo"])
def test_subcommand_help(capsys, command):
    if command == "train":
        pytest.importorskip("torchvision")  # the job's modules import it
    code, out = _run([command, "--help"], capsys)
    assert code == 0 and out.startswith(f"usage: distnorm {command} ")


# -- the layout of an installed (non-editable) package ------------------------------------

SCRIPT = '''"""A stand-in benchmark: report what it was run with."""
import argparse, json, os, sys
parser = argparse.ArgumentParser()
parser.add_argument("--out", default=os.path.abspath("distnorm-bench-results"))
parser.add_argument("--quick", action="store_true")
args = parser.parse_args()
print(json.dumps({"prog": parser.prog, "out": args.out, "file": __file__, "name": __name__}))
raise SystemExit(3 if args.quick else 0)
'''


def test_installed_scripts_run_from_the_package(tmp_path, monkeypatch, capsys):
    package = tmp_path / "site-packages" / "distnorm"
    (package / "_bench").mkdir(parents=True)
    (package / "_bench" / "layer.py").write_text(SCRIPT)
    from distnorm import _scripts

    monkeypatch.setattr(_scripts, "_PACKAGE", package)
    monkeypatch.setattr(_scripts, "_CHECKOUT", package.parent)
    monkeypatch.chdir(tmp_path)
    assert cli.script_path("bench", "layer.py") == package / "_bench" / "layer.py"
    assert cli.script_path("bench", "model.py") is None
    code, out = _run(["bench", "layer"], capsys)
    assert code == 0
    report = __import__("json").loads(out)
    # The script's own help names the command; results do not go into site-packages.
    assert report == {"prog": "distnorm bench layer", "name": "__main__",
                      "out": str(tmp_path / "distnorm-bench-results"),
                      "file": str(package / "_bench" / "layer.py")}
    code, out = _run(["bench", "layer", "--quick", "--out", "mine"], capsys)
    assert code == 3 and '"out": "mine"' in out
    code, out = _run(["bench", "model"], capsys)
    assert code == 2 and "no benchmarks/model.py" in out
    code, out = _run(["train"], capsys)
    assert code == 2 and "no detection job" in out


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def test_pyproject_lists_every_package_and_one_version():
    config = _pyproject()
    setuptools = config["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts)
               for p in (ROOT / "distnorm").rglob("__init__.py")}
    missing = on_disk - listed
    assert not missing, f"add {sorted(missing)} to [tool.setuptools] packages in pyproject.toml"
    for package, folder in setuptools["package-dir"].items():
        assert package in listed and (ROOT / folder).is_dir()
    assert "version" not in config["project"] and "version" in config["project"]["dynamic"]
    assert setuptools["dynamic"]["version"] == {"attr": "distnorm.__version__"}


@pytest.mark.slow
def test_wheel_ships_the_scripts_and_license(tmp_path):
    pytest.importorskip("setuptools")
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", "*.egg-info", "build", "results", "runs", ".pytest_cache"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path / "dist"), str(source)],
                          capture_output=True, text=True, timeout=300, check=False,
                          env=dict(os.environ, PIP_NO_INDEX="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("distnorm-*.whl")
    assert wheel.name.startswith(f"distnorm-{distnorm.__version__}-")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in ("distnorm/__main__.py", "distnorm/check.py", "distnorm/_bench/layer.py",
                 "distnorm/_bench/model.py", "distnorm/_bench/_common.py",
                 "distnorm/_detection/train.py", "distnorm/_detection/data.py"):
        assert path in names, path
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE")
               for n in names)
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    assert "Requires-Dist: torch<2.15,>=2.11" in text or "Requires-Dist: torch>=2.11,<2.15" in text


# -- where the benchmarks write -------------------------------------------------------------

def test_every_benchmark_help_names_the_same_default_out(capsys):
    """`distnorm bench --help` and every script's --help agree: ./distnorm-bench-results."""
    code, out = _run(["bench", "--help"], capsys)
    assert code == 0 and "./distnorm-bench-results" in " ".join(out.split())
    for name in cli.BENCHMARKS:
        if cli.script_path("bench", cli.BENCHMARKS[name][0]) is None:
            continue
        code, out = _run(["bench", name, "--help"], capsys)
        text = " ".join(out.split())
        assert code == 0 and "--out" in text and "./distnorm-bench-results" in text, name
        assert "default: benchmarks/results" not in text, name


def test_bench_run_from_another_folder_writes_there_not_into_the_checkout(tmp_path):
    """`distnorm bench model --report` (a real run of the script, without ranks) from a
    folder of the user's: the results appear under it, the checkout's stay untouched."""
    pytest.importorskip("matplotlib")
    from tests.test_benchmarks import committed_results

    saved = ROOT / "benchmarks" / "results" / "model_cpu.json"
    if not saved.is_file():
        pytest.skip("no committed model_cpu.json in this checkout")
    before = committed_results()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, "-m", "distnorm", "bench", "model", "--report", str(saved)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    written = tmp_path / "distnorm-bench-results"
    assert (written / "model_cpu.md").is_file() and (written / "model_cpu.png").is_file()
    assert committed_results() == before, "distnorm bench wrote into the checkout's benchmarks/results"


def test_train_help_states_each_default_once(capsys):
    code, out = _run(["train", "--help"], capsys)
    text = " ".join(out.split())
    assert code == 0 and "(default: None)" not in text
    assert text.count("default: the number of GPUs, else 2") == 1
    assert "adamw: torch's defaults (default: adamw)" in text
