"""The fault matrix's scenarios: what the ranks do in each row of the matrix.

This is the scenario library of the fault matrix (docs/faults.md), shared by the test
suite (``tests/test_faults.py`` for rows 1-10, ``tests/test_reliability.py`` for rows
11-16) and the fault-matrix benchmark (``benchmarks/faults.py``): the tests assert on
what the scenarios return, the benchmark runs each once and tabulates it. It holds
the models, the data of each case (``_empty_case``, ``_fp16_case``,
``_offset_shards``, ...), the per-rank workers (``_w_*``), the ``fault_*`` functions
that run a row on a fresh fault world (:func:`fault_worlds.run_fault`),
the constants the rows are parametrized by (``SYNCED``, ``BN_EQUIVALENT``,
``EMPTY_SIZES``, ``OFFSETS``, ``DEADLINE_S``, ...) and the references of the rows
checked against nn.BatchNorm (:func:`join_matches_reference`,
:func:`checkpoint_difference`).

It lives beside the benchmark, not in the product package: scaffolding for the tests
and the benchmark, imported as the top-level module ``fault_scenarios`` with
``benchmarks/`` on ``sys.path``.

The workers are module-level functions: fault worlds and the tests' worker pools
pickle them by reference, and importing this module has the fault worlds'
forkserver preload it (:func:`fault_worlds.preload`).
"""

from __future__ import annotations

import math
import os
import signal
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

import distnorm

from distnorm.errors import NonFiniteError
from distnorm.modules._base import BatchNormBase

# A sibling in benchmarks/ (on sys.path: the benchmark puts its folder there, the
# tests too), as benchmarks/_common.py is.
import fault_worlds as faults  # noqa: E402  (isort: after distnorm)
from fault_worlds import CASE_TIMEOUT_S, FaultRun, run_fault, start_clock  # noqa: E402

# The fault worlds' forkserver imports this module (its workers) before it forks ranks.
faults.preload(__name__)

#: Every registered variant that synchronizes batch statistics over a process group.
SYNCED: List[str] = sorted(mode for mode, cls in distnorm.variants().items()
                           if issubclass(cls, BatchNormBase))
#: Options under which a variant's *first* training step is exactly BatchNorm of the
#: group batch (docs/algorithms.md §2-§4: BRN with r_max = 1, d_max = 0; CmBN with one
#: micro-batch per cycle; CBN's window holds only the current iteration at its first step).
BN_EQUIVALENT: Dict[str, Dict[str, Any]] = {
    "sync": {}, "brn": {"r_max": 1.0, "d_max": 0.0}, "cmbn": {"accumulation_steps": 1}, "cbn": {},
}
#: Variants that stay exactly BatchNorm at *every* step under BN_EQUIVALENT.
BN_EVERY_STEP = ("sync", "brn", "cmbn")


# =====================================================================================
# Rows 1-10 (tests/test_faults.py). The model of the call-pattern faults (rows 1-4, 6)
# =====================================================================================
class Net(nn.Module):
    """stem → branch → head, each ``Linear`` + ``BatchNorm1d``: after
    ``convert_model`` the synced layers are ``'stem.1'``, ``'branch.1'``, ``'head.1'``.

    The flags make one rank's forward differ the way real code does: a branch taken
    on some ranks only, an early exit, another call order.
    """

    def __init__(self, channels: int = 4, head_channels: Optional[int] = None) -> None:
        super().__init__()
        head = channels if head_channels is None else head_channels
        self.stem = nn.Sequential(nn.Linear(3, channels), nn.BatchNorm1d(channels))
        self.branch = nn.Sequential(nn.Linear(channels, channels), nn.BatchNorm1d(channels))
        self.head = nn.Sequential(nn.Linear(channels, head), nn.BatchNorm1d(head))
        self.skip_branch = False
        self.exit_early = False
        self.swap = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        if self.exit_early:
            return x
        if self.swap:  # head before branch (needs head_channels == channels)
            return self.branch(torch.relu(self.head(x)))
        if not self.skip_branch:
            x = torch.relu(self.branch(x))
        return self.head(x)


def _net(mode: str, seed: int = 0, **kwargs: Any) -> Net:
    torch.manual_seed(seed)
    return distnorm.convert_model(Net(**kwargs), mode=mode)


def _step(model: nn.Module, rank: int, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 * step + rank)
    y = model(torch.randn(6, 3, generator=gen))
    y.square().mean().backward()
    return y.detach()


# -- row 1: a rank calls a synced layer fewer times ------------------------------------
def _w_skip_branch(rank: int, world: int, mode: str, skip_at: int, debug: bool,
                   head_channels: Optional[int]) -> str:
    """Rank 1 skips the branch (one synced layer fewer) at step ``skip_at``."""
    if debug:
        os.environ["DISTNORM_DEBUG"] = "1"
    model = _net(mode, head_channels=head_channels)
    for step in range(skip_at + 1):
        if step == skip_at:
            start_clock()
            model.skip_branch = rank == 1
        _step(model, rank, step)
    return "finished"


def _w_early_exit(rank: int, world: int, mode: str) -> str:
    """Rank 1 returns after the stem: it goes to backward while rank 0 goes on."""
    model = _net(mode)
    model.exit_early = rank == 1
    start_clock()
    _step(model, rank, 0)
    return "finished"


def fault_skip_first(mode: str = "sync") -> FaultRun:
    return run_fault(f"row 1: branch skipped on rank 1 at the first step [{mode}]",
                     _w_skip_branch, 2, mode, 0, False, None)


def fault_early_exit(mode: str = "sync") -> FaultRun:
    return run_fault(f"row 1: early exit on rank 1 at the first step [{mode}]", _w_early_exit, 2, mode)


def fault_skip_later(mode: str = "sync", *, debug: bool = False,
                     head_channels: Optional[int] = None) -> FaultRun:
    what = "equal payloads" if head_channels is None else "payload sizes differ"
    return run_fault(f"row 1: branch skipped on rank 1 at step 2 ({what}, "
                     f"DISTNORM_DEBUG={int(debug)}) [{mode}]",
                     _w_skip_branch, 2, mode, 2, debug, head_channels)


class DirectNet(nn.Module):
    """Net's shape with ``distnorm.SyncBatchNorm`` built directly (no ``convert_model``):
    the layers have no qualified name, so ``layer_name`` is ``'SyncBatchNorm'`` for all."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(3, 4), distnorm.SyncBatchNorm(4))
        self.branch = nn.Sequential(nn.Linear(4, 4), distnorm.SyncBatchNorm(4))
        self.head = nn.Sequential(nn.Linear(4, 4), distnorm.SyncBatchNorm(4))
        self.skip_branch = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        if not self.skip_branch:
            x = torch.relu(self.branch(x))
        return self.head(x)


def _w_direct_skip(rank: int, world: int) -> Dict[str, Any]:
    torch.manual_seed(0)
    model = DirectNet()
    model.skip_branch = rank == 1
    start_clock()
    with torch.no_grad():  # a forward-only pass in training mode (e.g. BN recalibration)
        model(torch.randn(6, 3))
    return {"finished": True}


# -- row 2: different call order -------------------------------------------------------
def _w_call_order(rank: int, world: int, mode: str, swap_at: int) -> str:
    model = _net(mode)
    for step in range(swap_at + 1):
        if step == swap_at:
            start_clock()
            model.swap = rank == 1
        _step(model, rank, step)
    return "finished"


def fault_call_order(mode: str = "sync", swap_at: int = 0) -> FaultRun:
    return run_fault(f"row 2: call order branch/head swapped on rank 1 at step {swap_at} [{mode}]",
                     _w_call_order, 2, mode, swap_at)


# -- row 3: one rank in eval mode ------------------------------------------------------
def _w_eval_rank(rank: int, world: int, mode: str) -> str:
    model = _net(mode)
    model.train(rank != world - 1)  # the last rank evaluates
    start_clock()
    _step(model, rank, 0) if rank != world - 1 else model(torch.randn(6, 3))
    return "finished"


def fault_eval_rank(mode: str = "sync") -> FaultRun:
    return run_fault(f"row 3: rank 1 in eval mode, rank 0 trains [{mode}]", _w_eval_rank, 2, mode)


# -- row 4: channel count differs ------------------------------------------------------
def _w_channels(rank: int, world: int, mode: str) -> str:
    model = _net(mode, channels=4 + 2 * rank)
    start_clock()
    _step(model, rank, 0)
    return "finished"


def fault_channels(mode: str = "sync") -> FaultRun:
    return run_fault(f"row 4: 4 channels on rank 0, 6 on rank 1 [{mode}]", _w_channels, 2, mode)


# -- row 6: a peer killed mid-step -----------------------------------------------------
def _w_killed(rank: int, world: int, mode: str) -> str:
    model = _net(mode)
    y = model(torch.randn(6, 3, generator=torch.Generator().manual_seed(rank)))
    if rank == world - 1:  # the victim: forward done, dies while the others are in backward
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
    start_clock()
    y.square().mean().backward()
    _step(model, rank, 1)
    return "finished"


def fault_killed(mode: str = "sync") -> FaultRun:
    return run_fault(f"row 6: rank 2 of 3 SIGKILLed between forward and backward [{mode}]",
                     _w_killed, 3, mode)


# -- row 7: NaN / Inf in one rank's input ----------------------------------------------
def _shard(rank: int, n: int = 5, channels: int = 4, step: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(n, channels, generator=gen, dtype=torch.float64) * (1 + rank) + rank


def _w_nonfinite(rank: int, world: int, mode: str, bad_rank: int, value: float) -> Dict[str, Any]:
    torch.manual_seed(0)
    model = distnorm.convert_model(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).double(),
                                   mode=mode)
    x = _shard(rank)
    if rank == bad_rank:
        x[2, 1] = value
    out: Dict[str, Any] = {}
    start_clock()
    try:
        model(x).sum().backward()
        out["error"] = None
    except NonFiniteError as error:
        out["error"] = {"message": str(error), "elapsed": faults.elapsed()}
    # The error is raised on every rank after the same collective: the group is
    # intact and the run goes on with the next (finite) batch.
    model.zero_grad()
    out["next_y"] = _step_double(model, rank)
    return out


def _step_double(model: nn.Module, rank: int) -> torch.Tensor:
    y = model(_shard(rank, step=1))
    y.sum().backward()
    return y.detach()


def fault_nonfinite(mode: str = "sync", value: float = math.nan) -> FaultRun:
    return run_fault(f"row 7: {value} in rank 1's input, policy 'raise' [{mode}]",
                     _w_nonfinite, 3, mode, 1, value)


def _w_nonfinite_skip(rank: int, world: int, mode: str, options: Dict[str, Any],
                      shards: List[torch.Tensor], grads: List[torch.Tensor]) -> Dict[str, Any]:
    bn = distnorm.convert_model(nn.Sequential(nn.BatchNorm1d(4).double()), mode=mode,
                                nonfinite="skip", **options)[0]
    x = shards[rank].clone().requires_grad_()
    y = bn(x)
    (y * grads[rank]).sum().backward()
    return {"y": y.detach(), "grad": x.grad, "running_mean": bn.running_mean.clone(),
            "running_var": bn.running_var.clone()}


def _skip_case(bad_rank: int = 1):
    shards = [_shard(r) for r in range(3)]
    shards[bad_rank][2, 1] = math.nan
    grads = [torch.randn(5, 4, generator=torch.Generator().manual_seed(7 + r), dtype=torch.float64)
             for r in range(3)]
    healthy = [r for r in range(3) if r != bad_rank]
    ref = nn.BatchNorm1d(4).double()
    x = torch.cat([shards[r] for r in healthy]).requires_grad_()
    y = ref(x)
    (y * torch.cat([grads[r] for r in healthy])).sum().backward()
    ref_y = dict(zip(healthy, y.detach().split(5)))
    ref_grad = dict(zip(healthy, x.grad.split(5)))
    return shards, grads, healthy, ref, ref_y, ref_grad


# -- row 5: empty batches --------------------------------------------------------------
EMPTY_SIZES = [(0, 0), (3, 0), (0, 0), (0, 2), (4, 1)]  # all, some, all, some, none empty


def _empty_case(channels: int = 3) -> Dict[str, Any]:
    gen = torch.Generator().manual_seed(5)
    steps = []
    for sizes in EMPTY_SIZES:
        xs = [torch.randn(n, 2, 3, 3, generator=gen, dtype=torch.float64) * 2 + 1 for n in sizes]
        gs = [torch.randn(n, channels, 3, 3, generator=gen, dtype=torch.float64) for n in sizes]
        steps.append({"x": xs, "g": gs})
    return {"C": channels, "steps": steps}


def _empty_model(mode: Optional[str], channels: int, options: Dict[str, Any]) -> nn.Module:
    torch.manual_seed(11)
    model = nn.Sequential(nn.Conv2d(2, channels, 1), nn.BatchNorm2d(channels)).double()
    with torch.no_grad():  # distinct initial running statistics, to see them untouched
        model[1].running_mean.fill_(0.25)
        model[1].running_var.fill_(2.0)
    return model if mode is None else distnorm.convert_model(model, mode=mode, **options)


def _w_empty(rank: int, world: int, mode: str, options: Dict[str, Any], case: Dict[str, Any]):
    model = _empty_model(mode, case["C"], options)
    bn = model[1]
    out = []
    for step in case["steps"]:
        x = step["x"][rank].clone().requires_grad_()
        y = model(x)
        (y * step["g"][rank]).sum().backward()
        out.append({
            "y": y.detach(), "grad": x.grad.clone(),
            "param_grads": {n: (None if p.grad is None else p.grad.clone())
                            for n, p in model.named_parameters()},
            "running_mean": bn.running_mean.clone(), "running_var": bn.running_var.clone(),
            "nbt": bn.num_batches_tracked.clone()})
        model.zero_grad(set_to_none=True)
    return out


# -- row 8: fp16 inputs whose squares overflow fp16 ------------------------------------
def _fp16_case() -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(8)
    # mean 1000, std 100: x² ≈ 1e6 and the per-channel sum ≈ 4e5 both overflow fp16
    # (max 65504); mean and variance (1e4) themselves are representable.
    return [(torch.randn(n, 3, 8, 8, generator=gen, dtype=torch.float64) * 100 + 1000).half()
            for n in (6, 2)]


def _w_fp16(rank: int, world: int, mode: str, options: Dict[str, Any],
            shards: List[torch.Tensor]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    moments = distnorm.stats.group_moments(shards[rank], dist.group.WORLD)
    out["moments"] = (moments.count, moments.mean, moments.var)
    for param_dtype in (torch.float32, torch.float16):
        layer = distnorm.convert_model(nn.BatchNorm2d(3, momentum=1.0), mode=mode,
                                       **options).to(param_dtype)
        x = shards[rank].clone().requires_grad_()
        y = layer(x)
        y.float().square().mean().backward()
        out[str(param_dtype)] = {"y": y.detach(), "grad": x.grad,
                                 "running_mean": layer.running_mean.clone(),
                                 "running_var": layer.running_var.clone()}
    return out


def _w_fp16_long(rank: int, world: int, mode: str, options: Dict[str, Any],
                 steps: Sequence[Tuple[int, float]]) -> Dict[str, Any]:
    """A ``.half()`` synced layer trained for ``steps`` = [(count, std), ...]: batches
    whose variance passes the half range (65504), then normal ones. Per step: whether
    the running statistics and an eval output are finite, and the running variance."""
    torch.manual_seed(0)
    layer = distnorm.convert_model(nn.BatchNorm1d(3), mode=mode, **options).half()
    gen = torch.Generator().manual_seed(80 + rank)
    probe = torch.randn(4, 3, generator=gen).half()
    history: List[Dict[str, Any]] = []
    for count, std in steps:
        for _ in range(count):
            layer.train()
            layer((torch.randn(8, 3, generator=gen) * std).half())
            layer.eval()
            y = layer(probe * std)
            history.append({"var": layer.running_var.float().clone(),
                            "finite": bool(torch.isfinite(layer.running_var).all()
                                           and torch.isfinite(layer.running_mean).all()),
                            "eval_finite": bool(torch.isfinite(y).all())})
    return {"history": history}


FP16_LONG_STEPS = [(25, 1000.0), (120, 1.0)]  # variance 1e6 (past 65504), then 1


# -- row 9: large offsets and tiny variances -------------------------------------------
OFFSETS = [(1e4, 1.0), (-1e3, 0.1), (1e2, 1e-3), (0.0, 1e-3)]  # (mean, std): |mean|/std to 1e5


def _offset_shards(mean: float, std: float) -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(9)
    scale = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64).view(1, 3, 1, 1)
    return [(torch.randn(n, 3, 4, 4, generator=gen, dtype=torch.float64) * std * scale + mean).float()
            for n in (3, 5)]


def _w_offsets(rank: int, world: int, modes: Sequence[str],
               cases: List[List[torch.Tensor]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for mode in modes:
        for c, shards in enumerate(cases):
            layer = distnorm.convert_model(nn.BatchNorm2d(3, momentum=1.0), mode=mode,
                                           **BN_EQUIVALENT[mode])
            y = layer(shards[rank])
            out[mode, c] = {"y": y.detach(), "running_mean": layer.running_mean.clone(),
                            "running_var": layer.running_var.clone()}
    return out


# -- row 10: checkpoint / resume, and loading across variants --------------------------
RESUME_STEPS, RESUME_AT = 6, 4  # CmBN (2 micro-batches per cycle) saves at a cycle boundary
RESUME_OPTIONS: Dict[str, Dict[str, Any]] = {"cmbn": {"accumulation_steps": 2}, "cbn": {"window": 3}}


def _resume_model(mode: Optional[str], seed: int, options: Optional[Dict[str, Any]] = None) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    if mode is None or mode == "bn":
        return model
    return distnorm.convert_model(model, mode=mode, **(options or {}))


def _train(model: nn.Module, opt: torch.optim.Optimizer, rank: int, world: int, steps: range,
           synced: bool = True) -> torch.Tensor:
    y = torch.empty(0)
    for s in steps:
        gen = torch.Generator().manual_seed(1000 * s + rank)
        x = torch.randn(2, 3, 5, 5, generator=gen)
        y = model(x)
        (y * torch.randn(y.shape, generator=gen)).mean().backward()
        if synced:  # DDP's averaging, written out (deterministic order)
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad.div_(world)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return y.detach()


def _histories(model: nn.Module) -> Dict[str, Any]:
    cls = getattr(distnorm, "CrossIterationBatchNorm", None)
    return {n: m.history_state() for n, m in model.named_modules()
            if cls is not None and isinstance(m, cls)}


def _w_resume(rank: int, world: int, mode: str, directory: str) -> Dict[str, Any]:
    options = RESUME_OPTIONS.get(mode, {})
    model = _resume_model(mode, seed=0, options=options)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, opt, rank, world, range(RESUME_AT))
    path = os.path.join(directory, f"{mode}.pt")
    if rank == 0:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    # CBN's window history is per rank and lives outside the state_dict (its docs):
    # each rank saves its own next to the checkpoint.
    torch.save(_histories(model), os.path.join(directory, f"{mode}.history{rank}.pt"))
    dist.barrier()
    y_straight = _train(model, opt, rank, world, range(RESUME_AT, RESUME_STEPS))

    resumed = _resume_model(mode, seed=123, options=options)  # other weights until loaded
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
    checkpoint = torch.load(path)
    resumed.load_state_dict(checkpoint["model"])
    opt2.load_state_dict(checkpoint["opt"])
    for name, state in torch.load(os.path.join(directory, f"{mode}.history{rank}.pt")).items():
        resumed.get_submodule(name).load_history_state(state)
    y_resumed = _train(resumed, opt2, rank, world, range(RESUME_AT, RESUME_STEPS))
    return {"straight": model.state_dict(), "resumed": resumed.state_dict(),
            "y_straight": y_straight, "y_resumed": y_resumed}


def _w_cross_variant(rank: int, world: int, modes: Sequence[str], directory: str) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for source in modes:
        model = _resume_model(source, seed=1, options=RESUME_OPTIONS.get(source, {}))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        # nn.BatchNorm is not synced: its ranks train apart; rank 0's checkpoint counts.
        _train(model, opt, rank, world, range(2), synced=source != "bn")
        path = os.path.join(directory, f"cross-{source}.pt")
        if rank == 0:
            torch.save(model.state_dict(), path)
        dist.barrier()
        state = torch.load(path)
        x = torch.randn(3, 3, 5, 5, generator=torch.Generator().manual_seed(77))
        reference = _resume_model("bn", seed=5).eval()
        reference.load_state_dict(state)
        with torch.no_grad():
            expected = reference(x)
        for target in modes:
            loaded = _resume_model(target, seed=5, options=RESUME_OPTIONS.get(target, {}))
            missing = loaded.load_state_dict(state, strict=True)
            with torch.no_grad():
                same_eval = torch.equal(loaded.eval()(x), expected)
            loaded.train()
            opt = torch.optim.SGD(loaded.parameters(), lr=0.1)
            y = _train(loaded, opt, rank, world, range(2, 4), synced=target != "bn")
            out[source, target] = {"same_eval": same_eval, "finite": bool(torch.isfinite(y).all()),
                                   "missing": list(missing.missing_keys) + list(missing.unexpected_keys)}
    return out


# =====================================================================================
# Rows 11-16 (tests/test_reliability.py): the training loops people write
# =====================================================================================
# distnorm's deadline in the cases that wait for a peer: well under the group's 10 s.
DEADLINE_S = 2.0


# =====================================================================================
# Row 11: an extra training-mode forward on one rank
# =====================================================================================
def _w_extra_forward(rank: int, world: int, mode: str, at: int, autograd: bool) -> str:
    """Rank 0 runs one more forward than rank 1 at step ``at`` (a logging or
    EMA-teacher forward with the model in train mode), under no_grad or not."""
    model = _net(mode)
    for step in range(at + 1):
        if step == at:
            start_clock()
            if rank == 0:
                x = torch.randn(6, 3, generator=torch.Generator().manual_seed(999))
                with torch.set_grad_enabled(autograd):
                    model(x)
        _step(model, rank, step)
    return "finished"


def fault_extra_forward(mode: str = "sync", at: int = 2, autograd: bool = False) -> FaultRun:
    how = "with autograd" if autograd else "under torch.no_grad()"
    return run_fault(f"row 11: extra forward {how} on rank 0 at step {at} [{mode}]",
                     _w_extra_forward, 2, mode, at, autograd)


# =====================================================================================
# Row 12: a peer that never comes — bounded by distnorm's deadline
# =====================================================================================
def _w_eval_rank_deadline(rank: int, world: int, timeout: float) -> str:
    os.environ["DISTNORM_TIMEOUT"] = str(timeout)
    model = _net("sync")
    model.train(rank == 0)
    start_clock()
    _step(model, rank, 0) if rank == 0 else model(torch.randn(6, 3))
    return "finished"


def fault_eval_rank_deadline(timeout: float = DEADLINE_S) -> FaultRun:
    return run_fault(f"row 12: rank 1 in eval mode, DISTNORM_TIMEOUT={timeout:g}",
                     _w_eval_rank_deadline, 2, timeout)


def _w_uneven_without_join(rank: int, world: int, counts: Sequence[int],
                           skip: Optional[int]) -> Dict[str, Any]:
    """``counts[rank]`` steps; rank 1 skips its step ``skip`` (a bad batch)."""
    model = _net("sync")
    for layer in (model.stem[1], model.branch[1], model.head[1]):
        layer.timeout = DEADLINE_S  # the layer's own deadline (convert_model(timeout=...))
    done = 0
    for step in range(counts[rank]):
        if rank == 1 and step == skip:
            continue
        if step == counts[rank] - 1:
            start_clock()
        _step(model, rank, step)
        done += 1
    return {"steps": done}


def fault_uneven_without_join(skip: Optional[int] = None) -> FaultRun:
    what = f"rank 1 skips batch {skip}" if skip is not None else "rank 1 has 2 batches, rank 0 3"
    counts = (3, 3) if skip is not None else (3, 2)
    return run_fault(f"row 12: {what}, no Join", _w_uneven_without_join, 2, counts, skip)


# =====================================================================================
# Row 13: uneven inputs under Join
# =====================================================================================
def _join_net(mode: str, options: Dict[str, Any]) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 3, 1), nn.BatchNorm2d(3)).double()
    return net if mode == "bn" else distnorm.convert_model(net, mode=mode, **options)


def _join_batches(counts: Sequence[int]) -> List[List[Tuple[torch.Tensor, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(13)
    return [[(torch.randn(2, 3, 5, 5, generator=gen, dtype=torch.float64) * 2 + 1,
              torch.randn(2, 3, 5, 5, generator=gen, dtype=torch.float64)) for _ in range(n)]
            for n in counts]


def _w_join(rank: int, world: int, mode: str, options: Dict[str, Any], counts: Sequence[int],
            skip: Dict[int, int]) -> Dict[str, Any]:
    # Tiny buckets: DDP's gradient all-reduces interleave with the synced layers'
    # backward all-reduces, as in a large model.
    model = DDP(_join_net(mode, options), bucket_cap_mb=1e-5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with Join([distnorm.joinable(model), model]):
        for step, (x, g) in enumerate(_join_batches(counts)[rank]):
            if skip.get(rank) == step:  # e.g. a batch that failed to load
                continue
            (model(x) * g).sum().backward()
            opt.step()
            opt.zero_grad()
    return {k: v.clone() for k, v in model.module.state_dict().items()}


def _join_reference(counts: Sequence[int], skip: Dict[int, int]) -> Dict[str, torch.Tensor]:
    """nn.BatchNorm on the batches the ranks actually process together: at iteration
    i, the i-th batch each rank still has (skipped ones left out); DDP averages the
    gradient over the initial world size."""
    world = len(counts)
    seen = [[b for s, b in enumerate(batches) if skip.get(r) != s]
            for r, batches in enumerate(_join_batches(counts))]
    model = _join_net("bn", {})
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for i in range(max(len(s) for s in seen)):
        active = [s[i] for s in seen if i < len(s)]
        x, g = torch.cat([b[0] for b in active]), torch.cat([b[1] for b in active])
        (model(x) * g).sum().div(world).backward()
        opt.step()
        opt.zero_grad()
    return model.state_dict()


def fault_join(mode: str = "sync", counts: Sequence[int] = (3, 1, 2),
               skip: Optional[Dict[int, int]] = None) -> FaultRun:
    what = f"batches per rank {tuple(counts)}" + (f", skipped {skip}" if skip else "")
    return run_fault(f"row 13: DDP + Join, {what} [{mode}]", _w_join, len(counts), mode,
                     BN_EQUIVALENT.get(mode, {}), tuple(counts), dict(skip or {}))


def join_matches_reference(run: FaultRun, counts: Sequence[int],
                           skip: Optional[Dict[int, int]] = None) -> float:
    """The largest difference, over ranks, parameters and buffers, from the reference."""
    expected = _join_reference(counts, dict(skip or {}))
    worst = 0.0
    for rank in range(run.world):
        got = run.value(rank)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            worst = max(worst, (got[key].double() - value.double()).abs().max().item())
    return worst


# -- row 14: misuse ---------------------------------------------------------------------
def _w_join_not_first(rank: int, world: int) -> str:
    model = DDP(_join_net("sync", {}))
    start_clock()
    with Join([model, distnorm.joinable(model)]):
        x, g = _join_batches((1,))[0][0]
        (model(x) * g).sum().backward()
    return "finished"


def _w_join_without_a_batch(rank: int, world: int) -> str:
    os.environ["DISTNORM_TIMEOUT"] = str(DEADLINE_S)
    model = _join_net("sync", {})
    start_clock()
    with Join([distnorm.joinable(model)]):
        if rank == 0:
            x, g = _join_batches((1,))[0][0]
            (model(x) * g).sum().backward()
    return "finished"


def fault_join_not_first() -> FaultRun:
    return run_fault("row 14: Join([ddp, distnorm.joinable(ddp)])", _w_join_not_first, 2)


def fault_join_without_a_batch() -> FaultRun:
    return run_fault("row 14: Join, rank 1 has no batch at all", _w_join_without_a_batch, 2)


# =====================================================================================
# Row 15: compiled models with a NaN on one rank
# =====================================================================================
def _compile_shards() -> List[List[torch.Tensor]]:
    gen = torch.Generator().manual_seed(15)
    steps = [[torch.randn(5, 4, generator=gen, dtype=torch.float64) * (1 + r) + r
              for r in range(2)] for _ in range(3)]
    steps[1][1][2, 1] = math.nan  # rank 1's batch of step 1
    return steps


def _w_compiled_nonfinite(rank: int, world: int, policy: str, fullgraph: bool) -> Dict[str, Any]:
    torch._dynamo.reset()
    torch.manual_seed(0)
    if fullgraph:  # one converted layer, traced whole
        model = distnorm.convert_model(nn.BatchNorm1d(4).double(), nonfinite=policy)
        layer = model
    else:
        model = distnorm.convert_model(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4),
                                                     nn.ReLU()).double(), nonfinite=policy)
        layer = model[1]
    step = torch.compile(model, fullgraph=fullgraph)
    out: Dict[str, Any] = {"y": [], "running": []}
    shards = _compile_shards()
    for s in range(2):
        x = shards[s][rank].clone().requires_grad_()
        y = step(x)
        y.square().sum().backward()
        out["y"].append(y.detach())
        out["running"].append((layer.running_mean.clone(), layer.running_var.clone()))
    try:  # the next eager call: where a compiled graph's record can be raised
        model(shards[2][rank])
        out["eager"] = None
    except NonFiniteError as error:
        out["eager"] = str(error)
    return out


# =====================================================================================
# Row 16: activation checkpointing
# =====================================================================================
class _Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1))
        self.head = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(checkpoint(self.block, self.stem(x), use_reentrant=False))


def _checkpointed(synced: bool) -> nn.Module:
    torch.manual_seed(0)
    model = _Checkpointed().double()
    return distnorm.convert_model(model, mode="sync") if synced else model


def _checkpoint_data() -> List[List[torch.Tensor]]:
    gen = torch.Generator().manual_seed(16)
    return [[torch.randn(n, 3, 5, 5, generator=gen, dtype=torch.float64) * 2 + 1
             for n in (3, 2)] for _ in range(2)]


def _w_checkpointed(rank: int, world: int) -> Dict[str, Any]:
    model = _checkpointed(True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in _checkpoint_data():
        x = step[rank].clone().requires_grad_()
        y = model(x)
        (y * torch.arange(4.0, dtype=torch.float64).view(1, 4, 1, 1)).sum().backward()
        for p in model.parameters():  # DDP's sum, written out
            dist.all_reduce(p.grad)
        opt.step()
        opt.zero_grad()
    return {"y": y.detach(), "dx": x.grad, "state": model.state_dict()}


def checkpoint_difference(results: List[Dict[str, Any]]) -> float:
    """The largest difference of the ranks' outputs, input gradients, parameters and
    running statistics from nn.BatchNorm's under the same checkpointing, on the
    concatenated batch; asserts that both updated the running statistics twice."""
    ref = _checkpointed(False)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in _checkpoint_data():
        x = torch.cat(step).requires_grad_()
        y = ref(x)
        (y * torch.arange(4.0, dtype=torch.float64).view(1, 4, 1, 1)).sum().backward()
        opt.step()
        opt.zero_grad()
    # The recomputation in backward runs the block's forward again: its running
    # statistics are updated twice per step, by nn.BatchNorm as by distnorm.
    assert int(ref.block[0].num_batches_tracked) == 4 and int(ref.head.num_batches_tracked) == 2
    rows = {0: slice(0, 3), 1: slice(3, 5)}
    worst = 0.0
    for rank, out in enumerate(results):
        pairs = [(out["y"], y.detach()[rows[rank]]), (out["dx"], x.grad[rows[rank]])]
        pairs += [(out["state"][key], value) for key, value in ref.state_dict().items()]
        worst = max([worst] + [(a.double() - b.double()).abs().max().item() for a, b in pairs])
    return worst



# =====================================================================================
# Row 17: a rank skips its synced layers and makes another collective (issue 23)
# =====================================================================================
def _w_eval_then_collective(rank: int, world: int, at: int, other: str, isolate: bool) -> str:
    """Rank 1 forgets ``model.train()`` at step ``at`` (after validation, say): its
    forward makes no synced collective, and its next collective is someone else's —
    DDP's gradient all-reduce (``other="ddp"``) or a metric all-reduce (``"metric"``)
    — while rank 0 waits in a synced layer."""
    os.environ["DISTNORM_TIMEOUT"] = str(DEADLINE_S)
    if not isolate:
        os.environ["DISTNORM_ISOLATE"] = "0"
    net = _net("sync")
    model = DDP(net) if other == "ddp" else net
    for step in range(at + 1):
        if step == at:
            start_clock()
            net.train(rank == 0)
        _step(model, rank, step)
        if other == "metric":  # a metric all-reduce, larger than distnorm's packets
            dist.all_reduce(torch.ones(300))
    return "finished"


def fault_eval_then_collective(at: int = 2, other: str = "ddp", isolate: bool = True) -> FaultRun:
    what = "DDP's gradient all-reduce" if other == "ddp" else "a metric all-reduce"
    shared = "" if isolate else ", DISTNORM_ISOLATE=0"
    return run_fault(f"row 17: rank 1 in eval mode at step {at}, then {what}{shared}",
                     _w_eval_then_collective, 2, at, other, isolate, timeout=2 * CASE_TIMEOUT_S)


def _w_own_group_of_a_subgroup(rank: int, world: int) -> Dict[str, Any]:
    """Ranks 0 and 1 train synced layers on a subgroup (rank 2 has none), so only they
    make distnorm's own group of it; then every rank makes a new group of the world
    and reduces over it: torch must name it alike on every rank (no hang)."""
    sub = dist.new_group([0, 1])
    if rank < 2:
        torch.manual_seed(0)
        model = distnorm.convert_model(Net(), process_group=sub)
        _step(model, rank, 0)
    start_clock()
    everyone = dist.new_group([0, 1, 2])
    total = torch.ones(1)
    dist.all_reduce(total, group=everyone)
    return {"name": everyone.group_name, "sum": float(total)}


def fault_own_group_of_a_subgroup() -> FaultRun:
    return run_fault("row 17: synced layers on a subgroup of ranks [0, 1], then a new world "
                     "group", _w_own_group_of_a_subgroup, 3)


# =====================================================================================
# Row 18: torch's own Join([ddp]) without distnorm.joinable (issue 23)
# =====================================================================================
def _w_plain_join(rank: int, world: int, throw: bool) -> str:
    os.environ["DISTNORM_TIMEOUT"] = str(DEADLINE_S)
    model = DDP(_join_net("sync", {}))
    start_clock()
    with Join([model], throw_on_early_termination=throw):
        for x, g in _join_batches((3, 1))[rank]:
            (model(x) * g).sum().backward()
    return "finished"


def fault_plain_join(throw: bool = False) -> FaultRun:
    how = ", throw_on_early_termination=True" if throw else ""
    return run_fault(f"row 18: Join([ddp]){how} without distnorm.joinable, batches (3, 1)",
                     _w_plain_join, 2, throw, timeout=2 * CASE_TIMEOUT_S)


# =====================================================================================
# Row 19: layers built through a framework registry, then swapped (issue 23)
# =====================================================================================
def _w_registry_swap(rank: int, world: int) -> Dict[str, Any]:
    """mmcv's ConvModule with ``norm_cfg=dict(type="DistSyncBN")`` (after
    ``openmmlab.register()``), then mmengine's ``convert_sync_batchnorm`` (its
    ``sync_bn`` option): what check_model says before and after."""
    from mmcv.cnn import ConvModule
    from mmengine.model import convert_sync_batchnorm

    from distnorm.integrations import openmmlab

    openmmlab.register()
    model = nn.Sequential(ConvModule(3, 4, 3, norm_cfg=dict(type="DistSyncBN")),
                          ConvModule(4, 4, 3, norm_cfg=dict(type="DistBRN")))
    before = distnorm.check_model(model)
    start_clock()
    after = distnorm.check_model(convert_sync_batchnorm(model))
    return {"before": (before.ok, len(before.synced)),
            "after": (after.ok, [(s.name, s.kind, s.mode) for s in after.swapped]),
            "report": str(after)}


def fault_registry_swap() -> FaultRun:
    return run_fault("row 19: norm_cfg=dict(type='DistSyncBN'), then mmengine's "
                     "convert_sync_batchnorm", _w_registry_swap, 2)
