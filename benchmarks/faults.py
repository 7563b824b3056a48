"""The fault matrix (issues 10 and 17), measured: each fault once, the time to the error.

Runs the very scenarios that ``tests/test_faults.py`` and ``tests/test_reliability.py``
assert on (the ``fault_*`` functions and workers of
:mod:`fault_scenarios`, beside this script), each on fresh gloo ranks forked for the
case by :func:`fault_worlds.run_fault` (group timeout ``PG_TIMEOUT_S`` =
10 s), and records per fault what distnorm did, the time from the start of the faulty step to the error on the last rank that
raised, and the message (rank 0's, or the first rank that raised). The rows that are
no error (empty batches, fp16, large offsets, checkpoints, uneven inputs under
``Join``, compiled models, activation checkpointing) are run too and report what was
checked.

Usage::

    python benchmarks/faults.py                 # SyncBatchNorm ("sync"), ~2 min
    python benchmarks/faults.py --mode brn      # another synced variant

Results: ``<out>/faults.md`` and ``<out>/faults.json`` (``--out``, default
``./distnorm-bench-results``; ``--out benchmarks/results``
refreshes the committed results).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT]

import torch  # noqa: E402
from torch import nn  # noqa: E402

from _common import DEFAULT_OUT, OUT_HELP, distnorm_provenance, machine_info  # noqa: E402

# The scenarios (fault_* functions, their workers and data) sit beside this script,
# shared with the tests: rows 1-10 (tests/test_faults.py) and 11-16 (tests/test_reliability.py).
import fault_scenarios as fs  # noqa: E402
from fault_worlds import PG_TIMEOUT_S, FaultRun, run_fault  # noqa: E402

MESSAGE_CHARS = 160


def _ranks_that(run: FaultRun, status: str) -> List[int]:
    return [r for r, res in enumerate(run.results) if res["status"] == status]


def _error_row(row: str, fault: str, run: FaultRun, how: str) -> Dict[str, Any]:
    """A row whose fault should end in an error: what each rank did, timed."""
    raised = run.raised()
    kinds = sorted({run.results[r]["type"] for r in raised})
    parts = []
    if raised:
        parts.append(f"{'/'.join(kinds)} on rank{'s' if len(raised) > 1 else ''} "
                     f"{', '.join(map(str, raised))}")
    died = _ranks_that(run, "died")
    for r in died:
        code = run.results[r]["exitcode"]
        name = {-9: "SIGKILL", -6: "SIGABRT"}.get(code, f"exit {code}")
        parts.append(f"rank {r} died ({name})")
    ok = _ranks_that(run, "ok")
    if ok:
        parts.append(f"rank{'s' if len(ok) > 1 else ''} {', '.join(map(str, ok))} "
                     "finished without error")
    hung = _ranks_that(run, "missing")
    if hung:
        parts.append(f"ranks {hung} HUNG")
    first = raised[0] if raised else None
    message = run.results[first]["message"] if first is not None else ""
    return {"row": row, "fault": fault, "does": "; ".join(parts) + f" — {how}",
            "time_to_error_s": run.time_to_error(), "wall_s": run.wall_s,
            "message_rank": first, "message": message,
            "processes_left": run.alive_after, "hung": bool(hung)}


def _plain_row(row: str, fault: str, does: str, run: FaultRun, ok: bool,
               detail: Dict[str, Any]) -> Dict[str, Any]:
    """A row that is no error: what was checked, and whether it held."""
    failed = [r for r, res in enumerate(run.results) if res["status"] != "ok"]
    if failed:
        ok = False
        does += f" — FAILED on ranks {failed}"
    return {"row": row, "fault": fault, "does": does if ok else does + " — CHECK FAILED",
            "time_to_error_s": None, "wall_s": run.wall_s, "message_rank": None,
            "message": "", "processes_left": run.alive_after, "hung": False, "ok": ok,
            "detail": detail}


# -- the rows that are no error ---------------------------------------------------------
def _row5(mode: str) -> Dict[str, Any]:
    case = fs._empty_case()
    run = run_fault("row 5", fs._w_empty, 2, mode, fs.BN_EQUIVALENT.get(mode, {}), case)
    ok = True
    if all(res["status"] == "ok" for res in run.results):
        for s, sizes in enumerate(fs.EMPTY_SIZES):
            for r in range(2):
                out = run.value(r)[s]
                ok &= out["y"].shape[0] == sizes[r] and bool(torch.isfinite(out["y"]).all())
                if sum(sizes) == 0:
                    ok &= all(torch.equal(g, torch.zeros_like(g)) for g in out["param_grads"].values())
                    if s > 0:
                        prev = run.value(r)[s - 1]
                        ok &= all(torch.equal(out[k], prev[k])
                                  for k in ("running_mean", "running_var", "nbt"))
    return _plain_row("5", "empty batch on every rank / on some ranks (batch sizes per step "
                      f"{fs.EMPTY_SIZES})",
                      "no error, no hang: empty output, zero parameter gradients and running "
                      "statistics untouched (bit for bit) when every rank is empty; BatchNorm of "
                      "the concatenated batch when some are", run, ok, {})


def _row8(mode: str) -> Dict[str, Any]:
    shards = fs._fp16_case()
    run = run_fault("row 8", fs._w_fp16, 2, mode, fs.BN_EQUIVALENT.get(mode, {}), shards)
    x64 = torch.cat(shards).double()
    var64 = x64.var((0, 2, 3), unbiased=False)
    detail: Dict[str, Any] = {}
    ok = True
    if all(res["status"] == "ok" for res in run.results):
        _, mean, var = run.value(0)["moments"]
        detail["var_rel_err"] = ((var.double() - var64).abs() / var64).max().item()
        ok = bool(torch.isfinite(mean).all() and torch.isfinite(var).all())
        for dtype in ("torch.float32", "torch.float16"):
            ok &= all(bool(torch.isfinite(t).all()) for t in run.value(0)[dtype].values())
    return _plain_row("8", "fp16 input, mean 1000 / std 100 (x² and Σx overflow fp16)",
                      "statistics finite: float32 accumulation, float64 reduction; variance "
                      f"relative error {detail.get('var_rel_err', math.nan):.1e} vs float64; fp16 "
                      "and fp32 layers alike", run, ok, detail)


def _row9(mode: str) -> Dict[str, Any]:
    modes = [mode] if mode in fs.BN_EQUIVALENT else []
    cases = [fs._offset_shards(m, s) for m, s in fs.OFFSETS]
    run = run_fault("row 9", fs._w_offsets, 2, modes, cases)
    detail: Dict[str, Any] = {}
    ok = bool(modes)
    if modes and all(res["status"] == "ok" for res in run.results):
        for c, ((mean, std), shards) in enumerate(zip(fs.OFFSETS, cases)):
            x32 = torch.cat(shards)
            x64 = x32.double()
            var64 = x64.var((0, 2, 3), unbiased=True)
            bn = nn.BatchNorm2d(3, momentum=1.0)
            bn(x32)
            err_bn = ((bn.running_var.double() - var64).abs() / var64).max().item()
            err = max(((run.value(r)[mode, c]["running_var"].double() - var64).abs() / var64).max().item()
                      for r in range(2))
            detail[f"mean {mean:g} std {std:g}"] = {"var_rel_err_distnorm": err, "var_rel_err_nn_bn": err_bn}
            ok &= err <= 2 * err_bn + 2.5e-7
    worst = max(detail.values(), key=lambda d: d["var_rel_err_distnorm"], default=None)
    text = ("synced statistics as accurate as nn.BatchNorm (fp32) on the concatenated batch, both "
            "against float64 (float64 reduction of exact local moments)")
    if worst:
        text += (f"; worst variance error {worst['var_rel_err_distnorm']:.1e} vs nn.BatchNorm's "
                 f"{worst['var_rel_err_nn_bn']:.1e}")
    return _plain_row("9", "|mean|/std up to 1e5: (1e4, 1), (-1e3, 0.1), (1e2, 1e-3), (0, 1e-3)",
                      text, run, ok, detail)


def _row10(mode: str) -> Dict[str, Any]:
    with tempfile.TemporaryDirectory() as directory:
        run = run_fault("row 10", fs._w_resume, 2, mode, directory)
        ok = True
        if all(res["status"] == "ok" for res in run.results):
            for r in range(2):
                out = run.value(r)
                ok &= torch.equal(out["y_straight"], out["y_resumed"])
                ok &= all(torch.equal(v, out["resumed"][k]) for k, v in out["straight"].items())
        modes = ["bn"] + [m for m in fs.SYNCED if m in ("sync", "brn", "cmbn", "cbn")]
        cross = run_fault("row 10 cross", fs._w_cross_variant, 2, modes, directory)
        if all(res["status"] == "ok" for res in cross.results):
            for r in range(2):
                ok &= all(v == {"same_eval": True, "finite": True, "missing": []}
                          for v in cross.value(r).values())
        else:
            ok = False
    run.wall_s += cross.wall_s
    return _plain_row("10", "checkpoint saved on rank 0 mid-training, loaded on all ranks; "
                      f"loaded into {', '.join(modes)}",
                      "training resumes bit-identically (parameters, buffers, outputs); state_dicts "
                      "load strictly across variants and give identical eval outputs", run, ok, {})


# -- the table ---------------------------------------------------------------------------
def collect(mode: str) -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = []
    header = "header check, first call of each layer and direction"
    rows.append(_error_row("1", "a branch with a synced layer skipped on rank 1 (first step)",
                           fs.fault_skip_first(mode), header))
    rows.append(_error_row("1", "early exit on rank 1 (fewer synced calls, first step)",
                           fs.fault_early_exit(mode), header))
    rows.append(_error_row("1", "branch skipped on rank 1 at step 3, equal payload sizes",
                           fs.fault_skip_later(mode), "tag/counter guard in the payload"))
    rows.append(_error_row("1", "branch skipped on rank 1 at step 3, payload sizes differ",
                           fs.fault_skip_later(mode, head_channels=6),
                           "one packet size per group (no gloo abort), then the guard"))
    rows.append(_error_row("1", "same, with DISTNORM_DEBUG=1",
                           fs.fault_skip_later(mode, debug=True, head_channels=6),
                           "header check at every call"))
    if mode == "sync":
        rows.append(_error_row("1", "branch skipped on rank 1 (first step), layers built as "
                               "distnorm.SyncBatchNorm(...) without convert_model, forward only",
                               run_fault("row 1 direct", fs._w_direct_skip, 2),
                               "header check; unnamed layers are told apart by their creation "
                               "order"))
    rows.append(_error_row("2", "synced layers called in another order on rank 1",
                           fs.fault_call_order(mode), header))
    rows.append(_error_row("3", "rank 1 in eval mode, rank 0 trains", fs.fault_eval_rank(mode),
                           f"the group's timeout ({PG_TIMEOUT_S:g} s); eval makes no collective"))
    rows.append(_error_row("4", "4 channels on rank 0, 6 on rank 1 (same layer)",
                           fs.fault_channels(mode), header + " (payload sizes listed)"))
    rows.append(_row5(mode))
    rows.append(_error_row("6", "rank 2 of 3 SIGKILLed between forward and backward",
                           fs.fault_killed(mode), "collective failure re-raised, before the timeout"))
    nonfinite = _nonfinite_as_fault(mode)
    goes_on = all(res.get("next_finite") for res in nonfinite.results)
    rows.append(_error_row("7", "NaN in rank 1's input (3 ranks), nonfinite='raise'", nonfinite,
                           "rank bitmask in the forward all-reduce; "
                           + ("the next (finite) step works on every rank" if goes_on
                              else "the next step FAILED")))
    rows.append(_skip_row(mode))
    rows.append(_row8(mode))
    rows.append(_row9(mode))
    rows.append(_row10(mode))
    rows += reliability_rows(mode)
    return rows


# -- issue 17: the loops people write (tests/test_reliability.py) ----------------------
def reliability_rows(mode: str) -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = []
    bits = "no-autograd rank bits in the header / guard"
    rows.append(_error_row("11", "extra training-mode forward under torch.no_grad() on rank 0 "
                           "(logging, EMA teacher), first step", fs.fault_extra_forward(mode, 0),
                           bits + ", at the extra forward's first layer"))
    rows.append(_error_row("11", "same, at step 3", fs.fault_extra_forward(mode, 2),
                           bits + ", at the extra forward's first layer"))
    rows.append(_error_row("11", "extra training-mode forward with autograd on rank 0, step 3",
                           fs.fault_extra_forward(mode, 2, autograd=True),
                           "its collectives pair with rank 1's forward; rank 0's next forward "
                           "meets rank 1's backward: equal packet sizes, the guard raises"))
    rows.append(_error_row("12", f"rank 1 in eval mode, DISTNORM_TIMEOUT={fs.DEADLINE_S:g}",
                           fs.fault_eval_rank_deadline(),
                           f"distnorm's deadline ({fs.DEADLINE_S:g} s), not the group's timeout "
                           f"({PG_TIMEOUT_S:g} s)"))
    rows.append(_error_row("12", "rank 1 has one batch fewer than rank 0, no Join (deadline "
                           f"{fs.DEADLINE_S:g} s)", fs.fault_uneven_without_join(),
                           "the last step has no partner: distnorm's deadline; the message "
                           "points at Join"))
    rows.append(_error_row("12", "rank 1 skips batch 1 (a bad batch), no Join", fs.
                           fault_uneven_without_join(skip=1),
                           "its later steps pair with rank 0's earlier ones (consistent "
                           "collectives of real data: nothing to detect); the step left over "
                           "ends at the deadline"))
    if mode in fs.BN_EVERY_STEP:
        rows.append(_join_row(mode, (3, 1, 2), None))
        rows.append(_join_row(mode, (3, 3), {1: 1}))
    rows.append(_error_row("14", "Join([ddp_model, distnorm.joinable(ddp_model)]) (joinable "
                           "not first)", fs.fault_join_not_first(),
                           "refused before any collective"))
    rows.append(_error_row("14", "Join, rank 1 has no batch at all", fs.fault_join_without_a_batch(),
                           "the joined rank has no recorded iteration to shadow; the other "
                           "ends at the deadline"))
    rows.append(_compiled_row("raise", False))
    rows.append(_compiled_row("skip", True))
    rows.append(_checkpoint_row())
    rows += issue23_rows(mode)
    return rows


def issue23_rows(mode: str) -> List[Dict[str, Any]]:
    """Rows 8 (a long fp16 run) and 17-19 (tests/test_faults.py, tests/test_reliability.py)."""
    rows = [_fp16_long_row(mode)]
    deadline = f"distnorm's deadline ({fs.DEADLINE_S:g} s)"
    for at, other, what in ((2, "ddp", "DDP's gradient all-reduce"),
                            (2, "metric", "a metric all-reduce (300 floats)"),
                            (0, "ddp", "DDP's gradient all-reduce, at the first step")):
        rows.append(_error_row(
            "17", f"rank 1 in eval mode (forgot model.train()) at step {at + 1}, then {what}",
            fs.fault_eval_then_collective(at, other),
            f"distnorm's collectives run on a group of their own and never meet the other "
            f"collective: {deadline} on rank 0, naming the layer; rank 1's collective has no "
            "partner and ends at the group's timeout (torch's error)"))
    rows.append(_error_row(
        "17", "same (step 3, DDP), DISTNORM_ISOLATE=0 (the user's group shared)",
        fs.fault_eval_then_collective(2, "ddp", isolate=False),
        "as torch's SyncBatchNorm: distnorm's packet meets DDP's bucket, gloo aborts"))
    subgroup = fs.fault_own_group_of_a_subgroup()
    names = {subgroup.results[r].get("value", {}).get("name") for r in range(3)
             if subgroup.results[r]["status"] == "ok"}
    rows.append(_plain_row(
        "17", "synced layers on a subgroup of ranks [0, 1] (3 ranks), then a new world group",
        "the subgroup's own group is made by ranks 0 and 1 only; the new world group is named "
        "alike on every rank and reduces (no hang)", subgroup, len(names) == 1, {}))
    rows.append(_error_row("18", "torch's Join([ddp]) without distnorm.joinable, batches (3, 1)",
                           fs.fault_plain_join(False),
                           "refused at the first synced forward inside the Join, before any "
                           "rank runs out; the message names Join([distnorm.joinable(ddp_model), "
                           "ddp_model]) and throw_on_early_termination=True"))
    rows.append(_error_row("18", "Join([ddp], throw_on_early_termination=True), batches (3, 1)",
                           fs.fault_plain_join(True),
                           "torch's documented pattern, unchanged: every rank raises torch's "
                           "'exhausted inputs' error"))
    swap = fs.fault_registry_swap()
    ok = all(res["status"] == "ok" and not res["value"]["after"][0] for res in swap.results)
    rows.append(_plain_row("19", "norm_cfg=dict(type='DistSyncBN'/'DistBRN') (mmcv "
                           "ConvModule), then mmengine's convert_sync_batchnorm (sync_bn)",
                           "check_model reports both layers swapped away (ok=False): "
                           "openmmlab.register() records registry-built layers in their parents",
                           swap, ok, {}))
    return rows


def _fp16_long_row(mode: str) -> Dict[str, Any]:
    options = fs.BN_EQUIVALENT.get(mode, {})
    run = run_fault("row 8 long", fs._w_fp16_long, 2, mode, options, fs.FP16_LONG_STEPS)
    ok, detail = False, {}
    if all(res["status"] == "ok" for res in run.results):
        history = run.value(0)["history"]
        high = fs.FP16_LONG_STEPS[0][0]
        detail = {"saturated": float(history[high - 1]["var"].max()),
                  "final": float(history[-1]["var"].max()),
                  "all_finite": all(h["finite"] and h["eval_finite"] for h in history)}
        ok = detail["all_finite"] and detail["saturated"] == 65504.0
    steps = " then ".join(f"{n} steps of variance {s * s:g}" for n, s in fs.FP16_LONG_STEPS)
    return _plain_row("8", f"fp16 layer (.half()), {steps}",
                      "running variance saturates at 65504 (never inf, never NaN; "
                      "nn.BatchNorm.half() stores inf and its eval outputs become 0), eval "
                      f"outputs finite at every step, back to {detail.get('final', math.nan):.2g} "
                      "afterwards", run, ok, detail)


def _join_row(mode: str, counts: Sequence[int], skip: Optional[Dict[int, int]]) -> Dict[str, Any]:
    run = fs.fault_join(mode, counts, skip)
    ok, detail = True, {}
    if all(res["status"] == "ok" for res in run.results):
        detail["max_abs_diff"] = fs.join_matches_reference(run, counts, skip)
        ok = detail["max_abs_diff"] < 1e-10
    fault = (f"uneven batches per rank {tuple(counts)} under DDP + Join([distnorm.joinable(m), "
             "m]) (gradient buckets interleaved with the synced layers' all-reduces)")
    if skip:
        fault = "rank 1 skips batch 1, under DDP + Join"
    return _plain_row("13", fault,
                      "every rank finishes; a joined rank shadows the synced layers' "
                      "collectives with zero contributions: parameters and running statistics "
                      "equal BatchNorm on the data actually seen (max difference "
                      f"{detail.get('max_abs_diff', math.nan):.0e}, float64)", run, ok, detail)


def _compiled_row(policy: str, fullgraph: bool) -> Dict[str, Any]:
    how = "torch.compile(model, fullgraph=True) of a converted layer" if fullgraph \
        else "torch.compile(model)"
    run = run_fault(f"row 15 {policy}", fs._w_compiled_nonfinite, 2, policy, fullgraph,
                       timeout=600)
    ok, detail = True, {}
    if all(res["status"] == "ok" for res in run.results):
        finite = all(bool(torch.isfinite(t).all()) for r in range(2)
                     for pair in run.value(r)["running"] for t in pair)
        raised = [run.value(r)["eager"] is not None for r in range(2)]
        detail = {"running_finite": finite, "raised_at_next_eager_call": raised}
        ok = finite and all(raised) == (policy == "raise") and any(raised) == (policy == "raise")
    then = ("NonFiniteError on every rank at the next step, compiled or eager (here: the "
            "next eager call)" if policy == "raise" else "no error ('skip')")
    return _plain_row("15", f"{how}, NaN in rank 1's input, nonfinite='{policy}'",
                      "the NaN rank's contribution zeroed inside the graph: running statistics "
                      f"finite, those of the finite ranks, on every rank; {then}", run, ok, detail)


def _checkpoint_row() -> Dict[str, Any]:
    run = run_fault("row 16", fs._w_checkpointed, 2)
    ok, detail = True, {}
    if all(res["status"] == "ok" for res in run.results):
        detail["max_abs_diff"] = fs.checkpoint_difference([run.value(r) for r in range(2)])
        ok = detail["max_abs_diff"] < 1e-9
    return _plain_row("16", "activation checkpointing (torch.utils.checkpoint around a block "
                      "with a synced layer)",
                      "the recomputation in backward repeats the block's forward collective on "
                      "every rank: outputs, gradients, parameters and running statistics (updated "
                      "twice per step, as nn.BatchNorm's are) equal nn.BatchNorm's under the same "
                      f"checkpointing (max difference {detail.get('max_abs_diff', math.nan):.0e})",
                      run, ok, detail)


def _nonfinite_as_fault(mode: str) -> FaultRun:
    """Row 7 catches its NonFiniteError to show the run goes on; present it as raised."""
    run = fs.fault_nonfinite(mode)
    for res in run.results:
        if res["status"] == "ok" and res["value"]["error"] is not None:
            res["next_finite"] = bool(torch.isfinite(res["value"]["next_y"]).all())
            err = res["value"]["error"]
            res.update(status="raised", type="NonFiniteError", sync=True, nonfinite=True,
                       message=err["message"], elapsed=err["elapsed"], traceback="")
    return run


def _skip_row(mode: str) -> Dict[str, Any]:
    shards, grads, healthy, ref, ref_y, ref_grad = fs._skip_case()
    options = fs.BN_EQUIVALENT.get(mode, {})
    run = run_fault("row 7 skip", fs._w_nonfinite_skip, 3, mode, options, shards, grads)
    detail: Dict[str, Any] = {}
    ok = True
    if all(res["status"] == "ok" for res in run.results):
        detail["y_err"] = max((run.value(r)["y"] - ref_y[r]).abs().max().item() for r in healthy)
        detail["grad_nan_on_healthy_ranks"] = any(bool(run.value(r)["grad"].isnan().any())
                                                  for r in healthy)
        ok = detail["y_err"] < 1e-9
    does = (f"healthy ranks' outputs = BatchNorm over the healthy ranks (max error "
            f"{detail.get('y_err', math.nan):.0e}); the NaN rank is left out of the statistics "
            "and of their gradient")
    if detail.get("grad_nan_on_healthy_ranks"):
        does += "; BUT backward still sums the NaN rank in: healthy input gradients are NaN (bug)"
    return _plain_row("7", "same, nonfinite='skip'", does, run, ok, detail)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def markdown(rows: Sequence[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    lines = [f"# The fault matrix (issues 10 and 17), measured — `{meta['mode']}`", "",
             f"W = 2 gloo ranks on CPU (3 for rows 6, 7 and the first of 13), group timeout {PG_TIMEOUT_S:g} s; "
             f"torch {meta['torch']}, {meta['cpu_count']} CPUs, load {meta['loadavg_at_start'][0]:.1f} "
             f"at start, {meta['date']}. Time to error: from the start of the faulty step to the "
             "error on the last rank that raised. Message: the first rank that raised, first "
             f"{MESSAGE_CHARS} characters. Generated by `python benchmarks/faults.py`; every row is "
             "a test in `tests/test_faults.py` (rows 1-10) or `tests/test_reliability.py` "
             "(rows 11-19).", "",
             "| # | fault | what distnorm does | time to error | message (first 160 chars) |",
             "|---|---|---|---|---|"]
    for row in rows:
        t = row["time_to_error_s"]
        when = "— (no error)" if t is None else f"{t * 1e3:.0f} ms" if t < 1 else f"{t:.1f} s"
        message = row["message"][:MESSAGE_CHARS] + ("…" if len(row["message"]) > MESSAGE_CHARS else "")
        lines.append(f"| {row['row']} | {_cell(row['fault'])} | {_cell(row['does'])} | {when} | "
                     f"{'`' + _cell(message) + '`' if message else ''} |")
    left = [r for r in rows if r["processes_left"]]
    lines += ["", "No process was left behind." if not left else f"Processes left behind: {left}"]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", default="sync", choices=fs.SYNCED, help="synced variant (default sync)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=OUT_HELP)
    args = parser.parse_args(argv)
    meta = dict(machine_info(), **distnorm_provenance(), mode=args.mode, pg_timeout_s=PG_TIMEOUT_S)
    rows = collect(args.mode)
    os.makedirs(args.out, exist_ok=True)
    md = markdown(rows, meta)
    with open(os.path.join(args.out, "faults.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "faults.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2, default=str)
    print(md)
    bad = [r for r in rows if r["hung"] or r["processes_left"] or r.get("ok") is False]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
