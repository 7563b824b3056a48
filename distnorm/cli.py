"""The ``distnorm`` command line: ``distnorm demo``, ``distnorm bench``."""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from typing import List, Optional


def _bench(argv: List[str]) -> int:
    script = os.path.join(os.getcwd(), "benchmarks", "layer.py")
    if not os.path.exists(script):
        print("distnorm bench runs benchmarks/layer.py from a checkout of the repository "
              "(run it from the repository root)", file=sys.stderr)
        return 2
    sys.argv = [script] + argv
    runpy.run_path(script, run_name="__main__")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="distnorm", description="distnorm: batch "
                                     "normalization for small per-GPU batches")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="2-process CPU demo: synced BN over 2×2 equals BN over 4",
                   add_help=False)
    sub.add_parser("bench", help="per-layer benchmark (benchmarks/layer.py)", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    return _bench(rest)


if __name__ == "__main__":
    raise SystemExit(main())
