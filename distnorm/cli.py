"""The ``distnorm`` command line (also ``python -m distnorm``).

::

    distnorm --version
    distnorm demo                     # 2-process CPU demo: synced BN over 2x2 equals BN over 4
    distnorm train --norm sync        # the detection job (examples/detection/train.py)
    distnorm bench layer|model|gpu|precise_bn  # benchmarks/layer.py, model.py, gpu.py, precise_bn.py
    distnorm slurm submit|bench|...   # Slurm through submitit

Each subcommand has its own ``--help``. The detection job and the benchmarks are
installed with the package (as ``distnorm._detection`` and ``distnorm._bench``), so
these run from a wheel as well as from a checkout of the repository.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import textwrap
import types
from pathlib import Path
from typing import List, NoReturn, Optional

from . import _scripts
from ._scripts import script_path

__all__ = ["BENCHMARKS", "main", "script_path"]

# name -> (script file, one-line summary for `distnorm bench --help`).
BENCHMARKS = {
    "layer": ("layer.py", "per layer: forward and forward+backward of one synced layer at "
                          "ResNet-50 shapes, distnorm beside local BN, torch's algorithm and "
                          "fairscale (CPU, gloo)"),
    "model": ("model.py", "per model step: ResNet-50 training steps with every normalization "
                          "(CPU, gloo)"),
    "gpu": ("gpu.py", "on CUDA devices: distnorm's synced layers beside torch.nn.SyncBatchNorm "
                      "(NCCL)"),
    "precise_bn": ("precise_bn.py", "what distnorm.precise_bn costs: B batches through it "
                                    "beside B plain forward passes of a synced ResNet-50 "
                                    "(CPU, gloo)"),
}
_RESULTS = "distnorm-bench-results"


def _version() -> str:
    from . import __version__

    try:
        import torch

        return f"distnorm {__version__} (torch {torch.__version__}, Python {sys.version.split()[0]})"
    except Exception:  # noqa: BLE001 - --version must answer even with a broken torch
        return f"distnorm {__version__}"


def _exit_code(stop: SystemExit) -> int:
    code = stop.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # SystemExit("message"): the message goes to stderr
    return 1


def _run_script(path: Path, prog: str, argv: List[str]) -> int:
    """Run ``path`` as ``__main__`` with ``argv``, its ``--help`` showing ``prog``.

    Like ``runpy.run_path``, except that ``sys.argv[0]`` is ``prog`` rather than the
    file name, so that the script's own argparse usage line reads
    ``usage: distnorm bench layer ...``. The module keeps its real ``__file__``, so
    processes it spawns (multiprocessing's spawn) re-import it from there.
    """
    code = compile(path.read_text(encoding="utf-8"), str(path), "exec")
    module = types.ModuleType("__main__")
    module.__file__ = str(path)
    saved_main, saved_argv = sys.modules.get("__main__"), sys.argv
    sys.modules["__main__"], sys.argv = module, [prog, *argv]
    try:
        exec(code, module.__dict__)
        return 0
    except SystemExit as stop:
        return _exit_code(stop)
    finally:
        sys.argv = saved_argv
        if saved_main is not None:
            sys.modules["__main__"] = saved_main


def _bench_parser() -> argparse.ArgumentParser:
    lines = []
    for name, (file, summary) in BENCHMARKS.items():
        path = script_path("bench", file)
        where = f"benchmarks/{file}" + ("" if path else ", not in this installation")
        lines.append(textwrap.fill(f"{summary} ({where})", width=88,
                                   initial_indent=f"  {name:10s} ", subsequent_indent=" " * 13))
    parser = argparse.ArgumentParser(
        prog="distnorm bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        usage=f"distnorm bench {{{','.join(BENCHMARKS)}}} [ARGS ...]",
        description="Run one of distnorm's benchmarks; `distnorm bench NAME --help` lists "
                    "its options.\n\n" + "\n".join(lines),
        epilog="Without NAME, `distnorm bench ARGS` runs the per-layer benchmark. Results go "
               f"to --out, by default ./{_RESULTS} in the current directory, never into "
               "the installed package or a checkout's files; in a checkout, --out "
               "benchmarks/results refreshes the committed results.")
    parser.add_argument("name", choices=list(BENCHMARKS), nargs="?", help="which benchmark")
    return parser


def _bench(argv: List[str]) -> int:
    """``distnorm bench [layer|model|gpu|precise_bn] ARGS``: run that script (default: layer)."""
    if argv and argv[0] in ("-h", "--help"):
        _bench_parser().print_help()
        return 0
    name = argv.pop(0) if argv and argv[0] in BENCHMARKS else "layer"
    if argv and not argv[0].startswith("-"):
        _bench_parser().error(f"unknown benchmark {argv[0]!r} (choose from "
                              f"{', '.join(BENCHMARKS)})")
    file = BENCHMARKS[name][0]
    path = script_path("bench", file)
    if path is None:
        print(f"distnorm bench {name}: this installation of distnorm has no benchmarks/{file} "
              f"(looked in {_scripts._PACKAGE / '_bench'} and {_scripts._CHECKOUT / 'benchmarks'}); "
              "install a distnorm release that ships it, or run it from a checkout of the "
              "repository", file=sys.stderr)
        return 2
    return _run_script(path, f"distnorm bench {name}", argv)


def _train(argv: List[str]) -> int:
    """Run the detection job (examples/detection/train.py), which parses its own arguments."""
    path = script_path("detection", "train.py")
    if path is None:
        print("distnorm train: this installation of distnorm has no detection job "
              f"(looked in {_scripts._PACKAGE / '_detection'} and {_scripts._CHECKOUT / 'examples/detection'})",
              file=sys.stderr)
        return 2
    name = "distnorm_example_detection_train"
    module = sys.modules.get(name)
    if module is None or getattr(module, "__file__", None) != str(path):
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    try:
        return int(module.main(argv, prog="distnorm train"))
    except SystemExit as stop:  # argparse: --help, bad arguments
        return _exit_code(stop)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n(`distnorm --help` lists the commands)\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; each subcommand parses its own arguments."""
    parser = _Parser(prog="distnorm", description="distnorm: batch normalization for small "
                     "per-GPU batches. Each command has its own --help.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("demo", add_help=False,
                   help="2-process CPU demo: synced BN over 2x2 samples equals BN over 4")
    sub.add_parser("train", add_help=False,
                   help="the detection-style small-batch training job "
                        "(examples/detection/train.py; --norm bn or a convert_model mode)")
    sub.add_parser("bench", add_help=False,
                   help="benchmarks: `bench layer` (per layer), `bench model` (per ResNet-50 "
                        "step), `bench gpu` (CUDA), `bench precise_bn` (its cost)")
    sub.add_parser("slurm", add_help=False,
                   help="Slurm: submit jobs (submitit), run tasks, cluster benchmark")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``distnorm`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = build_parser().parse_known_args(argv)
    # parse_known_args may take options that belong to the subcommand: hand it
    # everything after the command word instead.
    rest = argv[argv.index(args.command) + 1:]
    if args.command == "demo":
        from .demo import main as demo_main

        try:
            return demo_main(rest)
        except SystemExit as stop:
            return _exit_code(stop)
    if args.command == "train":
        return _train(rest)
    if args.command == "slurm":
        from .launch.slurm import main as slurm_main

        return slurm_main(rest)
    return _bench(rest)


if __name__ == "__main__":
    raise SystemExit(main())
