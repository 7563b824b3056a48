"""The GPU benchmark (``benchmarks/gpu.py``) runs end to end, and survives failures.

There is no GPU here: ``--smoke`` runs every line of its Python on CPU (a gloo group
of one rank, tiny shapes, torch's Function replaced by its CPU re-implementation,
"graphed" steps run eagerly), with two faults injected — one candidate's capture
fails, one worker dies in the middle of an item — so that the paths a real GPU run
needs when something breaks are checked too: a failure row, a restarted worker, and
results written whatever happened. One subprocess, well under a minute.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"

CAPTURE_FAULT_ITEM = "layer 4x8x6x6 bf16_cl"
DEAD_ITEM = "layer_counts 2x16x3x3 fp32"


def _load_script():
    name = "distnorm_gpu_benchmark"
    if name not in sys.modules:  # registered first: its dataclasses look their module up
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _load(part: str):
    """One of the script's modules (gpu_measure, gpu_report, ...): loading the script
    puts benchmarks/ on sys.path, as running it does."""
    _load_script()
    return importlib.import_module(part)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-smoke")
    env = dict(os.environ, PYTHONWARNINGS="ignore",
               DISTNORM_GPU_BENCH_FAULT=f"exit:{DEAD_ITEM};capture:distnorm@{CAPTURE_FAULT_ITEM}")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_smoke_cpu.json").read_text())
    md = (out / "gpu_smoke_cpu.md").read_text()
    return SimpleNamespace(out=out, proc=proc, report=report, md=md)


@pytest.mark.slow
def test_smoke_run_writes_every_column(smoke):
    report, md = smoke.report, smoke.md
    assert sorted(p.name for p in smoke.out.iterdir()) == ["gpu_smoke_cpu.json", "gpu_smoke_cpu.md"]
    assert report["meta"]["smoke"] is True and report["meta"]["device"] == "cpu"
    assert report["meta"]["backend"] == "gloo" and report["meta"]["workers_started"] == 2

    # Per layer: 2 shapes × 2 batches × 2 dtypes, four candidates each.
    layers = {(tuple(r["shape"]), r["dtype"], r["candidate"]): r for r in report["layers"]}
    configs = {(shape, dtype) for shape, dtype, _ in layers}
    assert len(configs) == 8
    for shape, dtype in configs:
        item = f"layer {'x'.join(map(str, shape))} {dtype}"
        for name in ("local", "torch", "distnorm", "floor"):
            row = layers[(shape, dtype, name)]
            assert row["eager"]["ms"] > 0 and row["eager"]["host_ms"] > 0, row
            if item == CAPTURE_FAULT_ITEM and name == "distnorm":
                assert "graphed" not in row and "injected fault" in row["errors"]["capture"]
            else:
                assert row["graphed"]["ms"] > 0 and row["capture_mode"] == "emulated on CPU", row
            counted = f"layer_counts {'x'.join(map(str, shape))} {dtype}" != DEAD_ITEM
            assert ("counts" in row) == counted, row
        # The synced candidates did synchronize (distnorm forced at W = 1), local did not.
        assert layers[(shape, dtype, "local")]["collectives"] == []
        assert layers[(shape, dtype, "torch")]["collectives"]
        assert any(c.startswith("all_reduce") for c in layers[(shape, dtype, "distnorm")]["collectives"])
        # ... and computed BatchNorm: the first step agrees with nn.BatchNorm2d.
        tol = 1e-5 if dtype == "fp32" else 2e-2
        parity = layers[(shape, dtype, "distnorm")]["parity"]
        assert max(parity.values()) < tol, parity
        assert layers[(shape, dtype, "local")]["ideal_bytes"] > 0

    # Per ResNet-50 step: three candidates, eager and "graphed", each checked against
    # an eager step from the same state (exactly equal on CPU, where nothing differs).
    models = {r["candidate"]: r for r in report["models"]}
    assert set(models) == {"local", "torch", "distnorm"}
    for name, row in models.items():
        assert row["eager"]["ms"] > 0 and row["graphed"]["ms"] > 0 and not row["errors"], row
        assert row["graph_check"]["loss_rel"] == 0 and row["graph_check"]["update_rel"] == 0, row
        assert "counts" in row
    assert sum(models["distnorm"]["collectives"].values()) >= 2 * 53

    # Every synced variant's kernels and syncs per layer, one shape per dtype.
    variants = {(r["candidate"], r["dtype"]): r for r in report["variants"]}
    assert {c for c, _ in variants} == {"sync", "brn", "cmbn", "cbn", "bin", "switchable"}
    assert len(variants) == 12 and all("counts" in r and not r["errors"] for r in variants.values())
    # The extra communicator (issue 23): created and used, its times recorded.
    (comm,) = report["communicator"]
    assert comm["communicator"]["backend"] == "gloo" and comm["communicator"]["create_s"] >= 0
    assert report["meta"]["bandwidth"]["copy_gb_s"] > 0
    # Issue 25: precise_bn over B batches beside B plain forwards, last in the plan; its
    # per-batch header exchange forced over the one-rank group like the layers' sync.
    precise = {r["candidate"]: r for r in report["precise_bn"]}
    assert set(precise) == {"forward", "precise_bn"}
    for row in precise.values():
        assert row["eager"]["ms"] > 0 and not row["errors"] and row["batches"] == 2, row
    assert precise["precise_bn"]["samples_used"] == 2 * 2
    assert precise["precise_bn"]["collectives"]["all_reduce int64"] == 2 + 1  # a header per round
    assert "## distnorm.precise_bn over B = 2 batches" in md and "precise_bn / forward" in md
    assert any(t["target"].startswith("precise_bn over 2 batches") for t in report["targets"])
    assert report["meta"]["complete"] is True

    # The report: sections, ratio columns, the targets (never "met" in a smoke run).
    for heading in ("## Targets (issues 16 and 22)", "## ResNet-50 training step", "## Per layer, float32 NCHW",
                    "## Per layer, bf16 channels_last", "## Achieved memory bandwidth", "## Failures",
                    "## Per synced variant", "## An extra communicator"):
        assert heading in md, heading
    assert "| N×C×H×W | local | torch | distnorm | floor |" in md
    assert "(d−l)/(t−l)" in md and "distnorm / torch eager" in md and "% of peak" in md
    assert "| CrossMiniBatchNorm | 2×8×6×6, float32 NCHW |" in md
    assert report["targets"] and all(t["met"] is None for t in report["targets"])
    assert "Targets (issues 16 and 22):" in smoke.proc.stdout
    assert "not rendered" not in md


@pytest.mark.slow
def test_smoke_run_survives_a_failed_capture_and_a_dead_worker(smoke):
    report, md = smoke.report, smoke.md
    # The dead worker's item is charged once; a new worker ran every item after it.
    assert [f["id"] for f in report["failures"]] == [DEAD_ITEM]
    assert "exited with code 9" in report["failures"][0]["error"]
    assert f"item {DEAD_ITEM}:" in md and "injected fault" in md
    assert not report["skipped"]
    later = [r for r in report["layers"] if r["dtype"] == "bf16_cl" and r["shape"] == [4, 16, 3, 3]]
    assert len(later) == 4 and all("counts" in r for r in later)


@pytest.mark.slow
def test_the_report_is_written_as_items_finish_and_printed_when_stopped(tmp_path):
    """Under `timeout` (SIGTERM) the run stops, and the report written so far — rewritten
    after each item — is completed and printed: a GPU run cut short still reports."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--smoke", "--only", "layers", "--out", str(tmp_path)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    md = tmp_path / "gpu_smoke_cpu.md"
    try:
        deadline = time.monotonic() + 240
        while not md.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert md.exists(), "no report while the run went on"
        assert proc.poll() is None, "the run ended before it could be stopped"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 2, err[-3000:]
    report = json.loads((tmp_path / "gpu_smoke_cpu.json").read_text())
    assert report["meta"]["stopped_by"] == "SIGTERM" and report["meta"]["complete"] is False
    assert 0 < report["meta"]["items_finished"] < report["meta"]["items_planned"]
    assert "# GPU benchmark" in out and "Targets (issues 16 and 22):" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_smoke_cpu.json", "gpu_smoke_cpu.md"]


def test_a_section_that_fails_leaves_the_others():
    report_module = _load("gpu_report")
    report = {"meta": {"smoke": True, "device": "cpu"}, "settings": {}, "targets": [], "models": [],
              "layers": [], "variants": [], "communicator": [], "failures": [], "skipped": []}
    md = report_module.markdown(report)  # the header needs the settings' repetitions
    assert "header section not rendered: KeyError" in md and "## Targets (issues 16 and 22)" in md


def test_cuda_only_measurements_with_a_stubbed_device(monkeypatch):
    """The CUDA branches of the peak bandwidth and the peak memory, on CPU: torch.cuda's
    answers stubbed, the arithmetic checked (an H100 SXM's HBM3: 2 × 2619 MHz × 5120 bit)."""
    import torch

    device = _load("gpu_device")
    measure = _load("gpu_measure")
    dev = SimpleNamespace(cuda=True, device=torch.device("cpu"), name="NVIDIA H100 80GB HBM3",
                          marker=device._HostMark, sync=lambda: None)
    props = SimpleNamespace(memory_clock_rate=2_619_000, memory_bus_width=5120)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: props)
    got = device.device_bandwidth(dev, copy_mb=1)
    assert got["peak_gb_s"] == pytest.approx(3352.3, abs=0.1) and "5120 bit" in got["peak_source"]
    assert got["copy_mb"] == 1 and got["copy_gb_s"] > 0
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace())
    assert device.device_bandwidth(dev, copy_mb=1)["peak_gb_s"] == 3350.0  # the data sheet's

    allocated = {"now": 100 * 2**20, "peak": 100 * 2**20}
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: allocated.update(peak=allocated["now"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: allocated["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: allocated["peak"])
    steps = []
    run = measure.Runnable("x", lambda: (steps.append(1), allocated.update(peak=allocated["now"] + 30 * 2**20)),
                           lambda: None)
    assert measure.step_peak_memory(run, dev) == {"peak_mb": 130.0, "step_mb": 30.0} and steps == [1]
    dev.cuda = False
    assert measure.step_peak_memory(run, dev) is None


def test_kernel_counting_reads_kineto_activity_types():
    measure = _load("gpu_measure")

    class Event:
        def __init__(self, name, activity=None, device="DeviceType.CUDA"):
            self._name, self._device = name, device
            if activity is not None:
                self.activity_type = lambda: activity

        def name(self):
            return self._name

        def device_type(self):
            return self._device

    events = [Event("aten::add", "cpu_op", "DeviceType.CPU"),
              Event("cudaLaunchKernel", "cuda_runtime", "DeviceType.CPU"),
              Event("void at::native::vectorized_elementwise_kernel<4, Add>(int, Add)", "kernel"),
              Event("ncclDevKernel_AllReduce_Sum_f64_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "kernel"),
              Event("Memcpy DtoH (Device -> Pinned)", "gpu_memcpy"),
              Event("Memset (Device)", "gpu_memset"),
              # An older torch without activity_type: device and name decide.
              Event("triton_red_fused_0"), Event("Memcpy HtoD (Pageable -> Device)"),
              Event("aten::mul", device="DeviceType.CPU")]
    counts, names = measure.classify_device_events(events)
    assert counts == {"kernels": 3, "memcpy": 2, "memset": 1}
    assert names == {"at::native::vectorized_elementwise_kernel": 1,
                     "ncclDevKernel_AllReduce_Sum_f64_RING_LL": 1, "triton_red_fused_0": 1}


def test_overhead_ratio_and_targets_on_made_up_rows():
    gpu = _load("gpu_report")

    def row(name, eager, graphed, kind="model", **extra):
        return {"kind": kind, "candidate": name, "batch": 2, "dtype": "fp32",
                "eager": {"ms": eager}, "graphed": {"ms": graphed}, "errors": {}, **extra}

    report = {"meta": {"smoke": False},
              "models": [row("local", 10.0, 4.0, memory={"step_mb": 100.0}), row("torch", 30.0, 5.0),
                         row("distnorm", 19.0, 6.0, memory={"step_mb": 103.0})],
              "variants": [{"kind": "variant", "candidate": "sync", "batch": 2, "dtype": "fp32", "errors": {},
                            "counts": {"kernels": 8.0, "collective_kernels": 2.0}, "host_syncs": 0.0},
                           {"kind": "variant", "candidate": "brn", "batch": 2, "dtype": "fp32", "errors": {},
                            "counts": {"kernels": 9.0, "collective_kernels": 2.0}, "host_syncs": 1.0}],
              "layers": [row("distnorm", 1.0, 0.1, kind="layer", shape=[2, 64, 56, 56],
                             counts={"kernels": 12.0, "memcpy": 1.0, "memset": 0.0}, host_syncs=0.0)],
              "precise_bn": [row("forward", 1000.0, 0.0, kind="precise_bn", batches=200),
                             row("precise_bn", 1150.0, 0.0, kind="precise_bn", batches=200)]}
    assert gpu.overhead_ratio(19.0, 30.0, 10.0) == pytest.approx(0.45)
    assert gpu.overhead_ratio(19.0, 9.0, 10.0) is None  # torch no slower than local
    met = {t["target"].split(":")[0]: t["met"] for t in gpu.evaluate_targets(report)}
    assert met["ResNet-50 step eager, batch 2, float32 NCHW"] is True        # 9 ≤ 0.5 × 20
    assert met["ResNet-50 step graphed, batch 2, float32 NCHW"] is False     # 2 > 1 × 1
    assert met["≤ 10 GPU kernels per layer forward + backward (distnorm)"] is False
    assert met["0 host syncs per layer forward + backward (distnorm)"] is True
    assert met["ResNet-50 step peak memory, batch 2, float32 NCHW"] is False                # 1.03 > 1.02
    assert met["SyncBatchNorm"] is True                     # 6 own + 2 collectives
    assert met["0 host syncs per layer forward + backward, every synced variant"] is False   # BRN: 1
    assert met["precise_bn over 200 batches of a synced ResNet-50, 2 images"] is True       # 1.15 ≤ 1.2
    report["precise_bn"][1]["eager"]["ms"] = 1250.0
    met = {t["target"].split(":")[0]: t["met"] for t in gpu.evaluate_targets(report)}
    assert met["precise_bn over 200 batches of a synced ResNet-50, 2 images"] is False
    assert gpu.slug("NVIDIA H200") == "nvidia_h200"
    assert _load("gpu_measure").sync_warnings(["UserWarning: called a synchronizing CUDA operation (Triggered internally at ...)\nmore",
                              "some other warning"]) == [
        "UserWarning: called a synchronizing CUDA operation (Triggered internally at ...)"]
