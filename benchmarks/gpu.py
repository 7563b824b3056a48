"""GPU benchmark: distnorm's synced layers beside torch's SyncBatchNorm on one CUDA device.

One GPU, one process, a one-rank NCCL group. Both synced implementations are made
to synchronize over it, although each would run as local BatchNorm at W = 1:
torch's through its autograd Function (``torch.nn.modules._functions.SyncBatchNorm``;
its module falls back to ``F.batch_norm`` at W = 1, the Function does not), distnorm's
through :func:`force_distnorm_sync`. What a synced layer costs beyond local BatchNorm
on one GPU is then what it adds on every GPU of a job, less the wire time of the
collectives (the *floor* below measures them at W = 1). Side by side, in one run:

**Per layer** (ResNet-50 and detection shapes; batch 2 and 32; float32 NCHW and
bfloat16 channels_last with float32 parameters, as under autocast), forward +
backward of

* ``local``    — ``nn.BatchNorm2d`` in training mode;
* ``torch``    — ``nn.SyncBatchNorm`` routed through torch's autograd Function over
  the group (all-gather forward, all-reduce backward, 3 host syncs);
* ``distnorm`` — ``distnorm.SyncBatchNorm`` over the group;
* ``floor``    — one all-reduce of 2C + 1 float64 and one of 2C float32 numbers, alone:
  what any one-all-reduce-per-direction design must pay;

each timed eager (CUDA events, the GPU idle before each step) and captured in a CUDA
graph (replays), plus GPU kernels per step (torch.profiler; memcpy and memset counted
apart), host synchronizations per step (``torch.cuda.set_sync_debug_mode("warn")``),
agreement with local BatchNorm on the first step, and the achieved memory bandwidth
(see :data:`IDEAL_PASSES`).

**Per synced variant** (SyncBatchNorm, BatchRenorm, CrossMiniBatchNorm,
CrossIterationBatchNorm, and the mixtures BatchInstanceNorm and SwitchableNorm,
whose BN part is synced; one shape per dtype): GPU kernels and host syncs per
layer forward + backward.

**Per ResNet-50 training step** (torchvision ``resnet50(weights=None)``, 224 px,
forward + backward + SGD with momentum; batch 2 and 32, float32 and bfloat16
autocast with channels_last): local BN, torch's SyncBN (``convert_sync_batchnorm``,
each layer through the Function) and distnorm (``convert_model``), eager and with the
whole step captured in a CUDA graph (static inputs, as torch's "whole network
capture" recipe); the first replay is checked against an eager step of a copy taken
just before capture. Kernels, host syncs and peak memory per step too, and each
rank's first-step (warm-up) time. The issue's targets are printed with whether each
is met.

**What ``distnorm.precise_bn`` costs** (issue 25): ResNet-50 converted with
``convert_model(mode="sync")``, 2 images per rank at 224 px, B = 200 batches:
``precise_bn(model, batches)`` beside B plain training-mode forwards under
``torch.no_grad()``, interleaved, each pass timed whole with CUDA events; the ratio
against the target of 1.2. precise_bn's per-batch exchange over the group is forced
at W = 1 like the layers' synchronisation. Last in the plan, with time kept for it.

**The device and its communicators**: the memory's peak bandwidth (from the device's
properties) beside a large device-to-device copy, against which the per-layer
bandwidths are given; and what an extra NCCL communicator costs (a ``new_group`` of
the same ranks and its first collective: creation time and device memory), the
price of giving distnorm's collectives a group of their own.

The run is a list of items (one ResNet-50 configuration, or one layer shape with its
four candidates); the timing items come first, the counting ones (profiler, sync
debug mode) last. The GPU time is scarce, so the run always finishes and writes its
results: the items run in a worker process; a candidate that fails (a capture, say)
becomes a row with the error's first line; a worker that dies or hangs
(:data:`ITEM_TIMEOUT`) is restarted for the items left; items not started within the
time budget (``--budget``) are listed as skipped. The report (``.json`` and ``.md``)
is rewritten after every finished item, so a run cut short (``timeout`` sends
SIGTERM: the table is then printed with what was measured) still leaves one.

The code, by concern: ``gpu_settings.py`` (shapes, candidates, targets,
repetitions), ``gpu_device.py`` (the device, its group, peak and copy bandwidth, an
extra communicator's cost), ``gpu_measure.py`` (timing, capture, kernel, sync and
memory counting), ``gpu_candidates.py`` (torch's and distnorm's layers made to
synchronize at W = 1), ``gpu_layer.py`` (per-layer and per-variant items),
``gpu_resnet.py`` (ResNet-50 items), ``gpu_precise.py`` (the precise_bn item), ``gpu_report.py`` (merging, targets, tables);
this file plans the items, runs and supervises the workers, and writes the report.

Usage::

    python benchmarks/gpu.py              # all shapes; a 210 s budget, about 4 minutes in all
    python benchmarks/gpu.py --quick      # 3 layer shapes, fewer reps (a 150 s budget)
    python benchmarks/gpu.py --smoke      # CPU, gloo, tiny shapes: runs every line of
                                          # Python but the CUDA-only measurements

Results: ``<out>/gpu_<device>.md`` and ``.json`` (``--out``, default
``./distnorm-bench-results``; ``--out benchmarks/results`` refreshes the committed ones; ``--smoke`` writes ``gpu_smoke_cpu.*`` to a temporary folder
unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import faulthandler
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _common import distnorm_provenance, machine_info  # noqa: E402
from gpu_candidates import force_distnorm_sync  # noqa: E402
from gpu_device import (CURRENT_ITEM, Device, Poisoned, describe, device_bandwidth,  # noqa: E402
                        inject_fault, run_communicator)
from gpu_layer import run_layer, run_layer_counts, run_variant_counts  # noqa: E402
from gpu_precise import run_precise_bn  # noqa: E402
from gpu_report import build_report, markdown, slug, summary  # noqa: E402
from gpu_resnet import run_model, run_model_counts  # noqa: E402
from gpu_settings import (BATCHES, DEFAULT_OUT, DTYPES, ITEM_TIMEOUT, LAYER_SHAPES, MAX_RESTARTS,  # noqa: E402
                          MODEL_CONFIGS, PRECISE_BN_BATCH, PRECISE_BN_RESERVE_S, QUICK_LAYER_SHAPES,
                          QUICK_PRECISE_BN_RESERVE_S, SMOKE_BATCHES, SMOKE_LAYER_SHAPES,
                          SMOKE_MODEL_CONFIGS, SMOKE_VARIANT_SHAPE, VARIANT_BATCH, VARIANT_SHAPE, Settings,
                          settings_for)

# Seconds between two looks at the workers' records while they run (the report is
# rewritten whenever another item has finished).
PROGRESS_S = 2.0

RUNNERS: dict[str, Callable[..., list[dict[str, Any]]]] = {
    "model": run_model, "layer": run_layer, "layer_counts": run_layer_counts,
    "model_counts": run_model_counts, "variant_counts": run_variant_counts,
    "communicator": run_communicator, "precise_bn": run_precise_bn}


def worker_meta(dev: Device, smoke: bool) -> dict[str, Any]:
    import torch

    import distnorm
    from distnorm import kernels

    meta: dict[str, Any] = dict(machine_info(), **distnorm_provenance())
    meta.update(device=dev.name, backend=dev.backend, smoke=smoke,
                distnorm_compiled_kernels=kernels.enabled(),
                distnorm_version=getattr(distnorm, "__version__", None))
    try:
        import torchvision
        meta["torchvision"] = torchvision.__version__
    except ImportError:
        meta["torchvision"] = None
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    if dev.cuda:
        props = torch.cuda.get_device_properties(dev.device)
        meta.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    nccl=".".join(map(str, torch.cuda.nccl.version())),
                    gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}",
                    cudnn_benchmark=torch.backends.cudnn.benchmark,
                    cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                    matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    return meta


def _dynamo_counters() -> dict[str, Any]:
    """torch.compile's counters in this worker (graphs compiled, recompilations): how
    much of distnorm's compiled work ran, and whether a cache limit was hit."""
    try:
        from torch._dynamo.utils import counters
        return {group: dict(values) for group, values in counters.items()
                if group in ("stats", "frames", "recompiles", "graph_break", "inductor")
                and values}
    except Exception as error:  # noqa: BLE001 - informational only
        return {"error": describe(error)}


def worker_main(plan_path: str) -> int:
    """Run the plan's items in order, one JSON line per event in the results file.

    Returns 0, or 3 when the device stopped working (the parent restarts a worker
    for the items left).
    """
    with open(plan_path) as f:
        plan = json.load(f)
    settings = Settings(**plan["settings"])
    smoke = plan["smoke"]
    if smoke:
        # Tiny CPU tensors stay below distnorm's compile threshold anyway; this keeps a
        # smoke run from ever waiting on a C++ compiler.
        os.environ.setdefault("DISTNORM_COMPILE", "0")
        import torch
        # One thread: on a busy machine, OpenMP threads spinning on shared cores make
        # steps 10× slower and erratic (a smoke run measures nothing anyway).
        torch.set_num_threads(1)
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    out = open(plan["results"], "a", buffering=1)

    def emit(record: dict[str, Any]) -> None:
        out.write(json.dumps(record) + "\n")
        out.flush()

    dev = Device(smoke)
    force_distnorm_sync()
    emit({"event": "meta", "meta": worker_meta(dev, smoke)})
    with contextlib.suppress(Exception):  # informational: never fails the run
        emit({"event": "bandwidth", "bandwidth": device_bandwidth(dev)})
    code = 0
    try:
        for item in plan["items"]:
            if time.time() > item["deadline"]:
                emit({"event": "skipped", "id": item["id"], "reason": "time budget"})
                continue
            print(f"[{time.strftime('%H:%M:%S')}] {item['id']}", file=sys.stderr, flush=True)
            emit({"event": "start", "id": item["id"]})
            CURRENT_ITEM["id"] = item["id"]
            inject_fault("exit", item["id"])
            start = time.perf_counter()
            faulthandler.dump_traceback_later(ITEM_TIMEOUT[item["kind"]], exit=True)
            try:
                rows = RUNNERS[item["kind"]](item, dev, settings)
                emit({"event": "result", "id": item["id"], "rows": rows,
                      "seconds": time.perf_counter() - start})
            except Poisoned as error:
                emit({"event": "died", "id": item["id"], "error": f"device unusable: {error}"})
                code = 3
                break
            except Exception as error:  # noqa: BLE001 - the item fails, the run goes on
                traceback.print_exc(file=sys.stderr)
                emit({"event": "died", "id": item["id"], "error": describe(error)})
                try:
                    dev.recover()
                except Poisoned:
                    code = 3
                    break
            finally:
                faulthandler.cancel_dump_traceback_later()
            if dev.cuda:
                import torch
                torch.cuda.empty_cache()
        emit({"event": "compiles", "counters": _dynamo_counters()})
    finally:
        out.close()
    if code == 0:
        dev.close()
    return code


def plan_items(smoke: bool, quick: bool, only: str | None, budget: float,
               start: float) -> list[dict[str, Any]]:
    """The extra communicator's cost first (a few seconds), then the timing items, then
    the counting ones (the profiler's CUPTI, once loaded, may slow later launches),
    each with the time after which it is skipped; precise_bn's cost last, with time
    kept for it."""
    shapes = SMOKE_LAYER_SHAPES if smoke else QUICK_LAYER_SHAPES if quick else LAYER_SHAPES
    batches = SMOKE_BATCHES if smoke else BATCHES
    models = SMOKE_MODEL_CONFIGS if smoke else MODEL_CONFIGS
    # Keep time for the counts and precise_bn at the end (they are among the targets).
    precise_reserve = 0.0 if smoke else QUICK_PRECISE_BN_RESERVE_S if quick else PRECISE_BN_RESERVE_S
    timing_deadline = start + budget - min(65.0, 0.3 * budget) - precise_reserve
    count_deadline = start + budget - precise_reserve
    items: list[dict[str, Any]] = [{"kind": "communicator", "batch": 1, "dtype": "fp32",
                                    "deadline": timing_deadline}]
    if only in (None, "model"):
        items += [{"kind": "model", "batch": b, "dtype": d, "deadline": timing_deadline}
                  for b, d in models]
    if only in (None, "layers"):
        items += [{"kind": "layer", "batch": b, "dtype": d, "shape": list(sh), "deadline": timing_deadline}
                  for sh in shapes for b in batches for d in DTYPES]
        items += [{"kind": "layer_counts", "batch": b, "dtype": d, "shape": list(sh),
                   "deadline": count_deadline} for sh in shapes for b in batches for d in DTYPES]
        variant_shape = SMOKE_VARIANT_SHAPE if smoke else VARIANT_SHAPE
        items += [{"kind": "variant_counts", "batch": VARIANT_BATCH, "dtype": d,
                   "shape": list(variant_shape), "deadline": count_deadline} for d in DTYPES]
    if only in (None, "model"):
        items += [{"kind": "model_counts", "batch": b, "dtype": d, "deadline": count_deadline}
                  for b, d in models]
        items.append({"kind": "precise_bn", "batch": PRECISE_BN_BATCH, "dtype": "fp32",
                      "deadline": start + budget})
    for item in items:
        where = "x".join(map(str, [item["batch"], *item.get("shape", [])]))
        item["id"] = f"{item['kind']} {where} {item['dtype']}"
    return items


def _child_env() -> dict[str, str]:
    """The worker's environment: this one, plus the checkout on PYTHONPATH when
    distnorm is not installed (``python benchmarks/gpu.py`` from a checkout)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    checkout = os.path.dirname(HERE)
    if (importlib.util.find_spec("distnorm") is None
            and os.path.isdir(os.path.join(checkout, "distnorm"))):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (checkout, env.get("PYTHONPATH")) if p)
    return env


class Stopped(BaseException):
    """The run was told to stop (SIGTERM from ``timeout``, or Ctrl-C): the report is
    written and printed with what was measured so far."""


def _run_worker(plan: dict[str, Any], workdir: str, attempt_no: int, timeout: float,
                progress: Callable[[], None] = lambda: None) -> tuple[int | None, list[str]]:
    """Start a worker on ``plan``; echo its output; call ``progress`` every couple of
    seconds while it runs; return its exit code (None: killed at the timeout) and its
    last lines. The worker is killed if this process is told to stop."""
    plan_path = os.path.join(workdir, f"plan{attempt_no}.json")
    with open(plan_path, "w") as f:
        json.dump(plan, f)
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", plan_path],
                            env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace")
    tail: collections.deque = collections.deque(maxlen=30)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip())
            sys.stderr.write(line)
        sys.stderr.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    code: int | None = None
    try:
        while True:
            try:
                code = proc.wait(timeout=PROGRESS_S)
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline:
                    code = None
                    break
                progress()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    return code, list(tail)


def _read_records(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a dying worker
                pass
    return records


def supervise(items: list[dict[str, Any]], settings: Settings, smoke: bool, budget: float,
              start: float, workdir: str,
              progress: Callable[[list[dict[str, Any]]], None] = lambda records: None) -> list[dict[str, Any]]:
    """Run ``items`` in workers, restarting one that dies; every item ends up with a
    result, a skip or a failure record. ``progress(records so far)`` is called while
    the workers run (the records are in ``workdir/results.jsonl``)."""
    results = os.path.join(workdir, "results.jsonl")
    remaining = list(items)
    extra: list[dict[str, Any]] = []
    for attempt_no in range(MAX_RESTARTS + 1):
        plan = {"items": remaining, "settings": vars(settings), "smoke": smoke, "results": results}
        timeout = max(start + budget - time.time(), 0) + 150.0
        code, tail = _run_worker(plan, workdir, attempt_no, timeout,
                                 lambda: progress(_read_records(results) + extra))
        records = _read_records(results)
        finished = {r["id"] for r in records if r["event"] in ("result", "skipped", "died")}
        started = [r["id"] for r in records if r["event"] == "start"]
        remaining = [i for i in remaining if i["id"] not in finished]
        if not remaining:
            break
        lost = next((i for i in reversed(started) if i not in finished), None)
        why = ("killed at the time limit" if code is None else f"exited with code {code}")
        # faulthandler's "Timeout (0:01:30)!" says the item hung; else its last words.
        last = next((line for line in tail if line.startswith("Timeout (")), None) or \
            next((line for line in reversed(tail) if line.strip()), "")
        if lost is not None:  # it died inside this item: charge it, go on with the rest
            extra.append({"event": "died", "id": lost, "error": f"worker {why}; last output: {last}"})
            remaining = [i for i in remaining if i["id"] != lost]
        elif code != 3:  # it could not even start an item: no point in retrying
            extra += [{"event": "died", "id": i["id"], "error": f"worker {why} before this item; "
                       f"last output: {last}"} for i in remaining]
            remaining = []
        if not remaining:
            break
        if time.time() > start + budget:
            extra += [{"event": "skipped", "id": i["id"], "reason": "time budget"} for i in remaining]
            remaining = []
            break
        print(f"worker {why}; restarting for {len(remaining)} items", file=sys.stderr, flush=True)
    extra += [{"event": "died", "id": i["id"], "error": "not run: the worker kept dying"}
              for i in remaining]
    return _read_records(results) + extra


def _report(records: list[dict[str, Any]], items: list[dict[str, Any]], settings: Settings,
            args: argparse.Namespace, budget: float, start: float, done: bool) -> dict[str, Any]:
    report = build_report(records, items, settings, smoke=args.smoke, quick=args.quick, only=args.only,
                          budget=budget, wall_s=round(time.time() - start, 1))
    finished = {r.get("id") for r in records if r.get("event") in ("result", "skipped", "died")}
    report["meta"]["complete"] = done and all(i["id"] in finished for i in items)
    report["meta"]["items_finished"] = len(finished & {i["id"] for i in items})
    report["meta"]["items_planned"] = len(items)
    return report


def _write(report: dict[str, Any], out: str, smoke: bool) -> tuple[str, str] | None:
    """Write ``gpu_<device>.json`` and ``.md`` (each replaced whole: a reader never sees
    half a file); returns the markdown and its path, or None before any worker reported
    its device."""
    device = report["meta"].get("device")
    if not device:
        return None
    name = "smoke_cpu" if smoke else slug(device)
    md = markdown(report)
    for suffix, text in (("json", json.dumps(report, indent=1)), ("md", md)):
        path = os.path.join(out, f"gpu_{name}.{suffix}")
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    return md, os.path.join(out, f"gpu_{name}.md")


def _stop(signum: int, frame: Any) -> None:
    raise Stopped(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 layer shapes, fewer reps")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, gloo, tiny shapes: check the script (no CUDA needed)")
    parser.add_argument("--out", default=None,
                        help="results folder (default: ./distnorm-bench-results in the current directory; "
                             "--out benchmarks/results refreshes the committed results; --smoke: a temporary folder)")
    parser.add_argument("--only", choices=("layers", "model"), default=None,
                        help="only the per-layer (and per-variant) or only the ResNet-50 part "
                             "(with precise_bn's cost)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds after which items not yet started are skipped "
                             "(default 210; --quick 150)")
    parser.add_argument("--reps", type=int, default=None, help="timed eager reps (replays: twice as many)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)

    if not args.smoke:
        import torch  # only to ask; the workers use the device

        if not torch.cuda.is_available():
            parser.error("no CUDA device here; --smoke checks the script on CPU")
    start = time.time()
    budget = args.budget or (600.0 if args.smoke else 150.0 if args.quick else 210.0)
    out = args.out or (tempfile.mkdtemp(prefix="distnorm-gpu-smoke-") if args.smoke else DEFAULT_OUT)
    os.makedirs(out, exist_ok=True)
    settings = settings_for(args.smoke, args.quick, args.reps)
    items = plan_items(args.smoke, args.quick, args.only, budget, start)
    print(f"{len(items)} items, budget {budget:.0f} s; results to {out} (rewritten as items finish)",
          file=sys.stderr, flush=True)
    workdir = tempfile.mkdtemp(prefix="distnorm-gpu-")
    written = {"results": -1}

    def progress(records: list[dict[str, Any]]) -> None:
        # Rewrite the report whenever another item has finished.
        finished = sum(1 for r in records if r.get("event") in ("result", "skipped", "died"))
        if finished != written["results"]:
            written["results"] = finished
            try:
                _write(_report(records, items, settings, args, budget, start, done=False), out, args.smoke)
            except Exception:  # noqa: BLE001 - the final write tries again
                traceback.print_exc(file=sys.stderr)

    stopped = None
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        records = supervise(items, settings, args.smoke, budget, start, workdir, progress)
    except Stopped as why:
        stopped = str(why)
        records = _read_records(os.path.join(workdir, "results.jsonl"))
        print(f"stopped by {stopped}: writing the report with what was measured", file=sys.stderr)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    report = _report(records, items, settings, args, budget, start, done=stopped is None)
    if stopped:
        report["meta"]["stopped_by"] = stopped
    written_to = _write(report, out, args.smoke)
    if written_to is None:
        print("no worker reported a device: nothing was measured", file=sys.stderr)
        print(summary(report))
        return 1
    md, path = written_to
    print(md)
    print(summary(report))
    print(f"saved {path} and .json ({report['meta']['wall_s']:.0f} s)", file=sys.stderr)
    return 2 if stopped else 0


if __name__ == "__main__":
    sys.exit(main())
