"""The ``distnorm`` command line: ``distnorm demo``, ``distnorm train``, ``distnorm bench``, ``distnorm slurm``."""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from typing import List, Optional


_BENCHMARKS = {"layer": "layer.py", "model": "model.py"}


def _bench(argv: List[str]) -> int:
    """``distnorm bench [layer|model] ARGS``: run that benchmark script (default: layer)."""
    name = argv.pop(0) if argv and argv[0] in _BENCHMARKS else "layer"
    script = os.path.join(os.getcwd(), "benchmarks", _BENCHMARKS[name])
    if not os.path.exists(script):
        print(f"distnorm bench {name} runs benchmarks/{_BENCHMARKS[name]} from a checkout of the "
              "repository (run it from the repository root)", file=sys.stderr)
        return 2
    sys.argv = [script] + argv
    runpy.run_path(script, run_name="__main__")
    return 0


def _train(argv: List[str]) -> int:
    """Run examples/detection/train.py of this checkout (it parses its own arguments)."""
    relative = os.path.join("examples", "detection", "train.py")
    roots = (os.getcwd(), os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = next((os.path.join(r, relative) for r in roots
                   if os.path.exists(os.path.join(r, relative))), None)
    if script is None:
        print(f"distnorm train runs {relative} from a checkout of the repository (run it "
              "from the repository root, or pip install -e the checkout)", file=sys.stderr)
        return 2
    import importlib.util

    name = "distnorm_example_detection_train"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, script)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    try:
        return int(module.main(argv, prog="distnorm train"))
    except SystemExit as exit_:  # argparse: --help, bad arguments
        return exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="distnorm", description="distnorm: batch "
                                     "normalization for small per-GPU batches")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="2-process CPU demo: synced BN over 2×2 equals BN over 4",
                   add_help=False)
    sub.add_parser("train", help="detection-style small-batch training job "
                   "(examples/detection/train.py; --norm bn|sync|cbn|brn|cmbn|gn|frozen)",
                   add_help=False)
    sub.add_parser("bench", help="benchmarks: per layer (default; benchmarks/layer.py) or "
                   "`bench model` per ResNet-50 step (benchmarks/model.py)", add_help=False)
    sub.add_parser("slurm", help="Slurm: submit jobs (submitit), sbatch helpers, cluster benchmark",
                   add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    if args.command == "train":
        return _train(rest)
    if args.command == "slurm":
        from .launch.slurm import main as slurm_main

        return slurm_main(rest)
    return _bench(rest)


if __name__ == "__main__":
    raise SystemExit(main())
