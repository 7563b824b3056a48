"""The GPU benchmark's report: the workers' records merged into rows, the issue's
targets evaluated, and the markdown tables (each section rendered on its own, so
that one that fails leaves the others)."""

from __future__ import annotations

import math
import re
import traceback
from collections.abc import Callable
from typing import Any

from gpu_settings import (BN_CANDIDATES, DTYPES, EQUAL_TOL, IDEAL_PASSES, LABELS, LAYER_CANDIDATES,
                          MODEL_CANDIDATES, TARGET_EAGER, TARGET_GRAPHED, TARGET_KERNELS, TARGET_MEMORY,
                          TARGET_SYNCS, VARIANTS, TARGET_OWN_KERNELS, TARGET_COLLECTIVES, Settings,
                          PRECISE_BN_CANDIDATES, TARGET_PRECISE_BN, item_row)

# The candidates of each kind of item (a failed item gets a row for each, with the error).
_CANDIDATES = {"model": MODEL_CANDIDATES, "layer": LAYER_CANDIDATES, "variant": tuple(VARIANTS),
               "communicator": ("extra group",), "precise_bn": PRECISE_BN_CANDIDATES}
# Phases of an item that are whole items' failures (listed once, as the item's).
_ITEM_KINDS = ("model", "layer", "layer_counts", "model_counts", "variant_counts", "communicator",
               "precise_bn")


def build_report(records: list[dict[str, Any]], items: list[dict[str, Any]], settings: Settings, *,
                 smoke: bool, quick: bool, only: str | None, budget: float, wall_s: float) -> dict[str, Any]:
    """The whole report from the records so far: rows, run facts and the targets."""
    report = collect(records, items)
    report["settings"] = vars(settings)
    report["meta"].setdefault("smoke", smoke)
    report["meta"].update(quick=quick, only=only, budget_s=budget, wall_s=wall_s,
                          ideal_passes=IDEAL_PASSES)
    report["targets"] = evaluate_targets(report)
    return report


def collect(records: list[dict[str, Any]], items: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge the workers' records: rows by kind (counts folded into the timing rows),
    failures and skips."""
    meta = dict(next((r["meta"] for r in records if r["event"] == "meta"), {}))
    meta["bandwidth"] = next((r["bandwidth"] for r in records if r["event"] == "bandwidth"), None)
    meta["compile_counters"] = [r["counters"] for r in records if r["event"] == "compiles"]
    meta["workers_started"] = sum(1 for r in records if r["event"] == "meta")
    meta["item_seconds"] = {r["id"]: round(r["seconds"], 2) for r in records if r["event"] == "result"}
    by_id = {i["id"]: i for i in items}
    merged: dict[tuple, dict[str, Any]] = {}
    failures, skipped = [], []
    for record in records:
        if record["event"] == "result":
            for row in record["rows"]:
                key = (row["kind"], row["candidate"], row["batch"], row["dtype"],
                       tuple(row.get("shape", ())))
                into = merged.setdefault(key, {"errors": {}})
                errors = {**into.get("errors", {}), **row.get("errors", {})}
                into.update(row)
                into["errors"] = errors
        elif record["event"] == "skipped":
            skipped.append({"id": record["id"], "reason": record.get("reason", "")})
        elif record["event"] == "died":
            failures.append({"id": record["id"], "error": record["error"]})
    for record in failures:  # a failed item still has its rows, each with the error
        item = by_id.get(record["id"])
        if item is None:
            continue
        for name in _CANDIDATES[item_row(item, "")["kind"]]:
            row = item_row(item, name)
            key = (row["kind"], name, row["batch"], row["dtype"], tuple(row.get("shape", ())))
            into = merged.setdefault(key, row)
            into.setdefault("errors", {})[item["kind"]] = record["error"]
    rows = list(merged.values())
    return {"meta": meta, "layers": [r for r in rows if r["kind"] == "layer"],
            "models": [r for r in rows if r["kind"] == "model"],
            "variants": [r for r in rows if r["kind"] == "variant"],
            "communicator": [r for r in rows if r["kind"] == "communicator"],
            "precise_bn": [r for r in rows if r["kind"] == "precise_bn"],
            "failures": failures, "skipped": skipped}


def _ms(row: dict[str, Any] | None, key: str) -> float | None:
    if row is None or key not in row:
        return None
    return row[key]["ms"]


def overhead_ratio(d: float | None, t: float | None, loc: float | None) -> float | None:
    """(distnorm − local) / (torch − local); None when undefined (torch no slower)."""
    if None in (d, t, loc) or t - loc <= 0:  # type: ignore[operator]
        return None
    return (d - loc) / (t - loc)  # type: ignore[operator]


def _index(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, dict[str, Any]]]:
    out: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        out.setdefault((r["batch"], r["dtype"], tuple(r.get("shape", ()))), {})[r["candidate"]] = r
    return out


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with what was measured and whether it is met
    (``None``: not measured)."""
    targets = []
    models = _index(report["models"])
    for key in sorted(models):
        batch, dkey, _ = key
        c = models[key]
        label = f"batch {batch}, {DTYPES[dkey][2]}"
        for mode, factor in (("eager", TARGET_EAGER), ("graphed", TARGET_GRAPHED)):
            loc, t, d = (_ms(c.get(n), mode) for n in MODEL_CANDIDATES)
            met = None if None in (loc, t, d) else (d - loc) <= factor * (t - loc)  # type: ignore[operator]
            measured = ("not measured" if met is None else
                        f"distnorm − local = {d - loc:.2f} ms; {factor:g} × (torch − local) = "  # type: ignore[operator]
                        f"{factor * (t - loc):.2f} ms")  # type: ignore[operator]
            targets.append({"target": f"ResNet-50 step {mode}, {label}: distnorm − local ≤ "
                            f"{factor:g} × (torch SyncBN − local)", "measured": measured, "met": met})
        check = (c.get("distnorm") or {}).get("graph_check")
        if check is not None:
            tol = EQUAL_TOL[dkey]
            local_check = (c.get("local") or {}).get("graph_check") or {}
            floor = max(tol, 10 * local_check.get("update_rel", 0.0))
            met = check["loss_rel"] <= tol and check["update_rel"] <= floor
            targets.append({"target": f"ResNet-50 step graphed = eager (distnorm), {label}",
                            "measured": f"loss {check['loss_rel']:.1e}, update {check['update_rel']:.1e}, "
                                        f"running stats {check['running_rel']:.1e} (relative; "
                                        f"local BN's update {local_check.get('update_rel', float('nan')):.1e}"
                                        f"; tolerance {floor:.0e})", "met": met})
        memory = {n: ((c.get(n) or {}).get("memory") or {}).get("step_mb") for n in ("local", "distnorm")}
        if memory["distnorm"] is not None and memory["local"]:
            ratio = memory["distnorm"] / memory["local"]
            targets.append({"target": f"ResNet-50 step peak memory, {label}: distnorm ≤ "
                            f"{TARGET_MEMORY:g} × local BN",
                            "measured": f"{memory['distnorm']:.0f} MB vs {memory['local']:.0f} MB above "
                                        f"the step's start ({ratio:.3f} ×)",
                            "met": ratio <= TARGET_MEMORY})
    targets += _precise_bn_targets(report)
    if report["meta"].get("smoke"):  # nothing a smoke run measures can meet a target
        for target in targets:
            target["met"] = None
            target["measured"] = f"smoke run: {target['measured']}"
    layers = [r for r in report["layers"] if r["candidate"] == "distnorm"]
    kernels = [r["counts"]["kernels"] for r in layers if "counts" in r]
    syncs = [r["host_syncs"] for r in layers if "host_syncs" in r]
    measured_on_cpu = report["meta"].get("smoke")
    targets.append({"target": f"≤ {TARGET_KERNELS} GPU kernels per layer forward + backward (distnorm)",
                    "measured": (f"{min(kernels):g}–{max(kernels):g} over {len(kernels)} shapes"
                                 if kernels and not measured_on_cpu else "not measured"),
                    "met": (max(kernels) <= TARGET_KERNELS) if kernels and not measured_on_cpu else None})
    targets.append({"target": "0 host syncs per layer forward + backward (distnorm)",
                    "measured": (f"{min(syncs):g}–{max(syncs):g} over {len(syncs)} shapes"
                                 if syncs else "not measured"),
                    "met": (max(syncs) <= TARGET_SYNCS) if syncs else None})
    # Issue 22: SyncBatchNorm's own kernels and its collectives, apart; every variant sync-free.
    own = [(r["counts"]["kernels"] - r["counts"].get("collective_kernels", 0.0),
            r["counts"].get("collective_kernels", 0.0))
           for r in report.get("variants", []) if r["candidate"] == "sync" and "counts" in r]
    measured = bool(own) and not measured_on_cpu
    targets.append({"target": f"SyncBatchNorm: ≤ {TARGET_OWN_KERNELS} kernels of distnorm's own + "
                              f"{TARGET_COLLECTIVES} collectives per layer forward + backward",
                    "measured": ("; ".join(f"{k:g} own + {c:g} collective" for k, c in own)
                                 if measured else "not measured"),
                    "met": all(k <= TARGET_OWN_KERNELS and c <= TARGET_COLLECTIVES for k, c in own)
                    if measured else None})
    variant_syncs = {r["candidate"]: r["host_syncs"] for r in report.get("variants", []) if "host_syncs" in r}
    targets.append({"target": "0 host syncs per layer forward + backward, every synced variant",
                    "measured": (", ".join(f"{VARIANTS.get(k, k).split(' (')[0]} {v:g}"
                                           for k, v in sorted(variant_syncs.items()))
                                 if variant_syncs else "not measured"),
                    "met": max(variant_syncs.values()) <= TARGET_SYNCS if variant_syncs else None})
    return targets


def precise_bn_ratio(report: dict[str, Any]) -> tuple[float, float, float] | None:
    """(precise_bn ms, forward ms, their ratio) over B batches, or None if not measured."""
    rows = {r["candidate"]: r for r in report.get("precise_bn", [])}
    precise, forward = _ms(rows.get("precise_bn"), "eager"), _ms(rows.get("forward"), "eager")
    if precise is None or not forward:
        return None
    return precise, forward, precise / forward


def _precise_bn_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 25: precise_bn over B batches ≤ 1.2 × B plain forwards."""
    rows = report.get("precise_bn", [])
    if not rows:
        return []
    b = rows[0].get("batches", "B")
    measured = precise_bn_ratio(report)
    return [{"target": f"precise_bn over {b} batches of a synced ResNet-50, {rows[0]['batch']} images: "
                       f"≤ {TARGET_PRECISE_BN:g} × {b} plain forwards",
             "measured": ("not measured" if measured is None else
                          f"{measured[0]:.0f} ms vs {measured[1]:.0f} ms ({measured[2]:.3f} ×)"),
             "met": None if measured is None else measured[2] <= TARGET_PRECISE_BN}]


def _f(value: float | None, spec: str = ".2f") -> str:
    return "—" if value is None else format(value, spec)


def _cell(row: dict[str, Any] | None, key: str, spec: str = ".2f") -> str:
    """A time cell: the value, "fail" when that phase failed, "—" when not measured."""
    if row is None:
        return "—"
    if key in row:
        return format(row[key]["ms"], spec)
    errors = row.get("errors", {})
    phases = {"eager": ("build", "first step", "eager", "layer", "model"),
              "graphed": ("build", "first step", "capture", "graph check", "graphed", "layer", "model")}
    return "fail" if any(p in errors for p in phases.get(key, ())) else "—"


def _count(row: dict[str, Any] | None, key: str) -> str:
    if row is None:
        return "—"
    if key == "host_syncs":
        return _f(row.get("host_syncs"), "g")
    counts = row.get("counts")
    return "—" if counts is None else format(counts[key], "g")


def _header(report: dict[str, Any]) -> list[str]:
    """Title, versions, what was measured."""
    meta, s = report["meta"], report["settings"]
    smoke = meta.get("smoke")
    lines: list[str] = []
    title = "# GPU benchmark" + (" — smoke run on CPU (not a measurement)" if smoke else f": {meta.get('device', '?')}")
    versions = [f"torch {meta.get('torch')}"]
    if meta.get("cuda"):
        versions.append(f"CUDA {meta['cuda']}, cuDNN {meta.get('cudnn')}, NCCL {meta.get('nccl')}")
    versions += [f"triton {meta.get('triton')}", f"torchvision {meta.get('torchvision')}",
                 f"Python {meta.get('python')}"]
    lines += [title, "",
             f"{', '.join(versions)}; {meta.get('cpu_count')} CPU cores; {meta.get('date')}."]
    if meta.get("git_head"):
        dirty = " + uncommitted changes" if meta.get("distnorm_uncommitted_changes") else ""
        lines.append(f"distnorm at commit {meta['git_head'][:10]}{dirty}; compiled kernels "
                     f"{'on' if meta.get('distnorm_compiled_kernels') else 'off'}.")
    lines += [
        "",
        (f"One device, a one-rank {meta.get('backend', '?').upper()} group. torch's SyncBatchNorm "
         "(its autograd Function) and distnorm's SyncBatchNorm synchronize over it; both would "
         "otherwise run as local BatchNorm at W = 1. floor = one all-reduce of 2C + 1 float64 and "
         "one of 2C float32 numbers, alone. Times: median ms (CUDA events; the GPU idle before "
         "each step), candidates interleaved rep by rep; eager "
         f"{s['layer_reps']} reps per layer and {s['model_reps']} per step, graphed = the step "
         f"captured in a CUDA graph, {s['replay_reps']} / {s['model_replay_reps']} replays."),
    ]
    if smoke:
        lines += ["", ("**Smoke run**: CPU tensors, a gloo group, tiny shapes; torch's Function is "
                       "replaced by its CPU re-implementation (torch_sync_bn.py), \"graphed\" steps "
                       "run eagerly, and kernel and host-sync counts are not measured. It checks "
                       "that the script runs; its numbers mean nothing.")]
    return lines


def _targets(report: dict[str, Any]) -> list[str]:
    """The issue's targets, met or not."""
    lines: list[str] = []
    lines += ["", "## Targets (issues 16 and 22)", "", "| target | measured | met |", "|---|---|---|"]
    for t in report["targets"]:
        met = "—" if t["met"] is None else ("**yes**" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {t['measured']} | {met} |")
    return lines


def _models(report: dict[str, Any]) -> list[str]:
    """ResNet-50 steps: times, ratios, kernels, syncs, memory, first step."""
    lines: list[str] = []
    models = _index(report["models"])
    if models:
        lines += ["", "## ResNet-50 training step (forward + backward + SGD), ms", "",
                  ("| batch, dtype | local eager | torch eager | distnorm eager | local graphed | "
                   "torch graphed | distnorm graphed | eager (d−l)/(t−l) | graphed (d−l)/(t−l) | "
                   "distnorm / torch eager | graphed |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for key in sorted(models):
            c = models[key]
            rl, rt, rd = (c.get(n) for n in MODEL_CANDIDATES)
            cells = [f"{key[0]}, {DTYPES[key[1]][2]}"]
            cells += [_cell(r, "eager") for r in (rl, rt, rd)] + [_cell(r, "graphed") for r in (rl, rt, rd)]
            for mode in ("eager", "graphed"):
                cells.append(_f(overhead_ratio(_ms(rd, mode), _ms(rt, mode), _ms(rl, mode))))
            for mode in ("eager", "graphed"):
                d, t = _ms(rd, mode), _ms(rt, mode)
                cells.append(_f(None if None in (d, t) else d / t))  # type: ignore[operator]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", ("Per step: GPU kernels (memcpy + memset), host syncs, host time to issue "
                       "the eager step (ms), first step (s: compiles, first-call checks), and the "
                       "graphed step against an eager step from the same state (relative "
                       "difference of the loss / the parameter update)."), "",
                  "| batch, dtype | candidate | kernels | memcpy + memset | host syncs | host ms | first step s | graphed vs eager |",
                  "|---|---|---|---|---|---|---|---|"]
        for key in sorted(models):
            for name in MODEL_CANDIDATES:
                r = models[key].get(name) or {}
                counts = r.get("counts")
                check = r.get("graph_check")
                lines.append("| " + " | ".join([
                    f"{key[0]}, {DTYPES[key[1]][2]}", LABELS[name], _count(r, "kernels"),
                    "—" if counts is None else f"{counts['memcpy'] + counts['memset']:g}",
                    _count(r, "host_syncs"), _f(r.get("eager", {}).get("host_ms")),
                    _f(r.get("first_step_s"), ".1f"),
                    "—" if check is None else f"{check['loss_rel']:.1e} / {check['update_rel']:.1e}",
                ]) + " |")
    return lines


def _layers(report: dict[str, Any]) -> list[str]:
    """Per layer: times and ratios; kernels, syncs, host time, agreement."""
    lines: list[str] = []
    layers = _index(report["layers"])
    for dkey in DTYPES:
        keys = sorted(k for k in layers if k[1] == dkey)
        if not keys:
            continue
        lines += ["", f"## Per layer, {DTYPES[dkey][2]}: forward + backward, ms", "",
                  ("| N×C×H×W | local | torch | distnorm | floor | local graphed | torch graphed | "
                   "distnorm graphed | floor graphed | distnorm / torch eager | graphed | "
                   "(d−l)/(t−l) eager | graphed |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for key in keys:
            c = layers[key]
            cells = ["×".join(map(str, key[2]))]
            cells += [_cell(c.get(n), "eager") for n in LAYER_CANDIDATES]
            cells += [_cell(c.get(n), "graphed") for n in LAYER_CANDIDATES]
            for mode in ("eager", "graphed"):
                d, t = _ms(c.get("distnorm"), mode), _ms(c.get("torch"), mode)
                cells.append(_f(None if None in (d, t) else d / t))  # type: ignore[operator]
            for mode in ("eager", "graphed"):
                cells.append(_f(overhead_ratio(*(_ms(c.get(n), mode) for n in ("distnorm", "torch", "local")))))
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", (f"### Per layer, {DTYPES[dkey][2]}: GPU kernels (memcpy + memset) and host "
                       "syncs per forward + backward; host ms to issue the eager step; agreement "
                       "with local BN on the first step (max relative difference of y / dx)"), "",
                  ("| N×C×H×W | kernels local / torch / distnorm / floor | memcpy + memset "
                   "local / torch / distnorm / floor | host syncs local / torch / distnorm | "
                   "host ms local / torch / distnorm | first step s local / torch / distnorm | "
                   "torch vs local | distnorm vs local |"),
                  "|---|---|---|---|---|---|---|---|"]
        for key in keys:
            c = layers[key]
            other = []
            for n in LAYER_CANDIDATES:
                counts = (c.get(n) or {}).get("counts")
                other.append("—" if counts is None else f"{counts['memcpy'] + counts['memset']:g}")
            parity = []
            for n in ("torch", "distnorm"):
                p = (c.get(n) or {}).get("parity")
                parity.append("—" if not p else f"{_f(p.get('y'), '.1e')} / {_f(p.get('dx'), '.1e')}")
            lines.append("| " + " | ".join([
                "×".join(map(str, key[2])),
                " / ".join(_count(c.get(n), "kernels") for n in LAYER_CANDIDATES),
                " / ".join(other),
                " / ".join(_count(c.get(n), "host_syncs") for n in BN_CANDIDATES),
                " / ".join(_f((c.get(n) or {}).get("eager", {}).get("host_ms")) for n in BN_CANDIDATES),
                " / ".join(_f((c.get(n) or {}).get("first_step_s")) for n in BN_CANDIDATES),
                *parity]) + " |")
    return lines


def _bandwidth(report: dict[str, Any]) -> list[str]:
    """Achieved memory bandwidth of the per-layer steps, against the device's peak."""
    layers = _index(report["layers"])
    if not layers:
        return []
    device = report["meta"].get("bandwidth") or {}
    peak, copy = device.get("peak_gb_s"), device.get("copy_gb_s")
    lines = ["", (f"## Achieved memory bandwidth per layer, GB/s ({IDEAL_PASSES} passes over the "
                  "activation — read x, write y; read dy and x, write dx — divided by the step's "
                  "time; an implementation that reads its input twice per direction moves 8, so it "
                  "tops out at 5/8 of the memory's peak)"), "",
             (f"Device peak: {_f(peak, '.0f')} GB/s ({device.get('peak_source') or 'unknown'}); a "
              f"{_f(device.get('copy_mb'), '.0f')} MB device-to-device copy achieved "
              f"{_f(copy, '.0f')} GB/s."), "",
             ("| N×C×H×W, dtype | MB per pass | local eager / graphed | torch eager / graphed | "
              "distnorm eager / graphed | distnorm graphed, % of peak | % of copy |"),
             "|---|---|---|---|---|---|---|"]
    for key in sorted(layers, key=lambda k: (k[1], -k[0], -math.prod(k[2]))):
        c = layers[key]
        cells = [f"{'×'.join(map(str, key[2]))}, {DTYPES[key[1]][2]}"]
        ref = c.get("local") or {}
        cells.append(_f(ref["ideal_bytes"] / IDEAL_PASSES / 1e6, ".0f") if "ideal_bytes" in ref else "—")
        for n in BN_CANDIDATES:
            r = c.get(n) or {}
            cells.append(" / ".join(_f(r.get(m, {}).get("gb_per_s"), ".0f") for m in ("eager", "graphed")))
        achieved = ((c.get("distnorm") or {}).get("graphed") or {}).get("gb_per_s")
        for bound in (peak, copy):
            cells.append(_f(None if achieved is None or not bound else 100 * achieved / bound, ".0f"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _problems(report: dict[str, Any]) -> list[str]:
    """Failures, warnings, skipped items."""
    lines: list[str] = []
    errors = [(r, phase, msg) for r in _all_rows(report)
              for phase, msg in sorted(r.get("errors", {}).items())
              if phase not in _ITEM_KINDS]  # a whole item's failure is listed once, below
    if errors or report["failures"]:
        lines += ["", "## Failures", ""]
        for r, phase, msg in errors:
            where = "×".join(map(str, r.get("shape", [r["batch"]])))
            lines.append(f"- {r['kind']} {where} {DTYPES[r['dtype']][2] if r['dtype'] in DTYPES else r['dtype']}, {_label(r['candidate'])}, "
                         f"{phase}: `{msg}`")
        for f in report["failures"]:
            lines.append(f"- item {f['id']}: `{f['error']}`")
    # (torch's Function always communicates; layer.count_collectives may not see the
    # all-gather variant a torch version calls.)
    if any(r["candidate"] == "distnorm" and r.get("collectives") == []
           for r in _all_rows(report)):
        lines += ["", ("**distnorm issued no collective at its first step**: its rows measure "
                       "local BatchNorm, not synchronisation (force_distnorm_sync failed).")]
    warned = sorted({(_label(r["candidate"]), when, w) for r in _all_rows(report)
                     for when, key in (("first step", "warnings"), ("capture", "capture_warnings"))
                     for w in r.get(key, [])})
    if warned:
        lines += ["", "## Warnings", ""] + [f"- {n}, {when}: `{w}`" for n, when, w in warned]
    if report["skipped"]:
        lines += ["", f"## Skipped ({len(report['skipped'])} items: time budget)", "",
                  ", ".join(s["id"] for s in report["skipped"])]
    return lines


def _all_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for kind in ("layers", "models", "variants", "communicator", "precise_bn")
            for r in report.get(kind, [])]


def _label(candidate: str) -> str:
    return LABELS.get(candidate) or VARIANTS.get(candidate) or candidate


def _variants(report: dict[str, Any]) -> list[str]:
    """Per synced variant: kernels, collectives among them, host syncs, first step."""
    rows = report.get("variants", [])
    if not rows:
        return []
    lines = ["", ("## Per synced variant: GPU kernels and host syncs per layer forward + backward "
                  "(collective kernels among the kernels; memcpy + memset apart; first step s: "
                  "the layer's first call in this rank, compiles included)"), "",
             "| variant | N×C×H×W, dtype | kernels | of which collectives | memcpy + memset | host syncs | first step s |",
             "|---|---|---|---|---|---|---|"]
    order = {mode: i for i, mode in enumerate(VARIANTS)}
    for r in sorted(rows, key=lambda r: (r["dtype"], order.get(r["candidate"], 99))):
        counts = r.get("counts")
        lines.append("| " + " | ".join([
            _label(r["candidate"]), f"{'×'.join(map(str, r.get('shape', [])))}, {DTYPES[r['dtype']][2]}",
            _count(r, "kernels"), _f((counts or {}).get("collective_kernels"), "g"),
            "—" if counts is None else f"{counts['memcpy'] + counts['memset']:g}",
            _count(r, "host_syncs"), _f(r.get("first_step_s"), ".2f")]) + " |")
    return lines


def _memory(report: dict[str, Any]) -> list[str]:
    """Peak memory of a step, against local BN's."""
    rows = [r for r in report["models"] + report["layers"] if r.get("memory")]
    if not rows:
        return []
    lines = ["", ("## Peak memory of a step (MB above what was allocated when it began; in "
                  "brackets, against local BN's)"), "",
             "| step | local BN | torch SyncBN | distnorm |", "|---|---|---|---|"]
    for kind, index in (("ResNet-50", _index(report["models"])), ("layer", _index(report["layers"]))):
        for key in sorted(index):
            c = index[key]
            local = ((c.get("local") or {}).get("memory") or {}).get("step_mb")
            cells = [f"{kind} {'×'.join(map(str, key[2] or (key[0],)))}, {DTYPES[key[1]][2]}"]
            for n in BN_CANDIDATES:
                mb = ((c.get(n) or {}).get("memory") or {}).get("step_mb")
                ratio = f" ({mb / local:.3f} ×)" if mb is not None and local else ""
                cells.append("—" if mb is None else f"{mb:.1f}{ratio}")
            if any(cell != "—" for cell in cells[1:]):
                lines.append("| " + " | ".join(cells) + " |")
    return lines


def _communicator(report: dict[str, Any]) -> list[str]:
    """What an extra communicator of the same ranks costs (issue 23)."""
    rows = [r["communicator"] for r in report.get("communicator", []) if r.get("communicator")]
    if not rows:
        return []
    c = rows[0]
    memory = "not measured (CPU)" if c["device_memory_mb"] is None else f"{c['device_memory_mb']:.1f} MB"
    return ["", "## An extra communicator (distnorm's collectives on a group of their own)", "",
            "| backend, ranks | new_group s | first collective s | next collective ms | device memory |",
            "|---|---|---|---|---|",
            f"| {c['backend']}, {c['ranks']} | {c['create_s']:.3f} | {c['first_collective_s']:.3f} | "
            f"{c['second_collective_ms']:.3f} | {memory} |", "",
            ("A group of the same ranks as the user's (`new_group(..., use_local_synchronization=True)`), "
             "measured after the user's group has run a collective. With one GPU the group has one rank: "
             "NCCL sets up no connection to peers, so a multi-GPU job's communicator costs more "
             "(its per-peer buffers); this is a lower bound.")]


def _precise_bn(report: dict[str, Any]) -> list[str]:
    """precise_bn over B batches beside B plain forwards (issue 25)."""
    rows = {r["candidate"]: r for r in report.get("precise_bn", [])}
    if not rows:
        return []
    any_row = next(iter(rows.values()))
    b = any_row.get("batches")
    lines = ["", (f"## distnorm.precise_bn over B = {b} batches vs B plain forwards (ResNet-50 "
                  f"converted to sync, {any_row['batch']} images at {any_row.get('image_size')} px, "
                  "float32; each pass timed whole, median ms)"), "",
             "| case | ms (q1–q3) | ms per batch | host ms | first pass s |", "|---|---|---|---|---|"]
    for name in PRECISE_BN_CANDIDATES:
        r = rows.get(name) or {}
        t = r.get("eager")
        lines.append("| " + " | ".join([
            name, "fail" if t is None and r.get("errors") else
            "—" if t is None else f"{t['ms']:.1f} ({t['q1_ms']:.1f}–{t['q3_ms']:.1f})",
            "—" if t is None or not b else f"{t['ms'] / b:.2f}",
            "—" if t is None else f"{t['host_ms']:.1f}", _f(r.get("first_pass_s"))]) + " |")
    measured = precise_bn_ratio(report)
    used = (rows.get("precise_bn") or {}).get("samples_used")
    lines += ["", (f"precise_bn / forward: **{_f(None if measured is None else measured[2], '.3f')}** "
                   f"(target ≤ {TARGET_PRECISE_BN:g}); samples used: {used if used is not None else '—'}. "
                   "precise_bn forwards the same batches with the layers normalizing as in training, "
                   "adds per-layer float64 sums, one header all-reduce per batch (forced at W = 1, "
                   "as a multi-GPU job pays it) and one packed all-reduce at the end.")]
    return lines


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown. Each section is rendered on its own: one that fails
    (a malformed row, say) is replaced by a line saying so, and the rest still print."""
    lines: list[str] = []
    for section in SECTIONS:
        try:
            lines += section(report)
        except Exception as error:  # noqa: BLE001 - the other sections still matter
            traceback.print_exc()
            lines += ["", f"({section.__name__.strip('_')} section not rendered: "
                          f"{type(error).__name__}: {error})"]
    return "\n".join(lines) + "\n"


SECTIONS: tuple[Callable[[dict[str, Any]], list[str]], ...] = (
    _header, _targets, _models, _layers, _variants, _bandwidth, _memory, _communicator, _precise_bn,
    _problems)


def summary(report: dict[str, Any]) -> str:
    """The targets, for the end of the output."""
    lines = ["", "Targets (issues 16 and 22):"]
    for t in report["targets"]:
        met = "not measured" if t["met"] is None else ("MET" if t["met"] else "NOT MET")
        lines.append(f"  [{met}] {t['target']}: {t['measured']}")
    if report["failures"] or any(r.get("errors") for r in report["layers"] + report["models"]):
        lines.append("  (some candidates failed: see the Failures section)")
    return "\n".join(lines)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "device"
