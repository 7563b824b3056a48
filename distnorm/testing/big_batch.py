"""The big-batch oracle: does a converted model, trained on W ranks, train exactly like
the plain model with ``torch.nn.BatchNorm`` on the concatenated batch in one process?

That is the promise of a synced layer: over W ranks holding n_1 … n_W samples, the
outputs, gradients and running statistics equal those of BatchNorm on the batch of
n_1 + … + n_W samples. :func:`compare_to_big_batch` checks it for any model:

* the **ranks**: W gloo processes, each with a copy of the model converted by
  :func:`distnorm.convert_model` (or your own ``convert``), wrapped in
  ``DistributedDataParallel``, trained with SGD on its own shard of each step's batch;
* the **reference**: one copy of the unconverted model trained with SGD on the
  concatenated batches, in this process;
* both in float64 from the same initial state, so that they agree to ~1e-12 when the
  model is right, and differ at the first step by far more when it is not.

Loss convention: ``loss_fn(output, target)`` returns the *sum* of the per-sample
losses of the samples it is given. The reference minimizes the mean over the global
batch of B samples, L = (1/B) Σ ℓ_i; rank r minimizes L_r = (W/B) Σ_{i on r} ℓ_i, so
that DDP's gradient average (1/W) Σ_r ∂L_r/∂θ is exactly ∂L/∂θ for any split of the
batch (uneven and empty shards included). A rank's input gradient is then W times the
reference's on its slice; it is compared divided by W.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..convert import convert_model
from ..launch.local import spawn
from .pool import RankPool

__all__ = ["CATEGORIES", "BigBatchReport", "assert_matches_big_batch", "compare_to_big_batch",
           "default_loss", "split_batch", "split_batches"]

#: A batch: the model's input alone, or ``(input, target)``.
Batch = Union[torch.Tensor, Tuple[torch.Tensor, Any]]

#: What is compared, in the order reports list it.
CATEGORIES = ("outputs", "input_grads", "param_grads", "parameters", "running_stats", "eval_outputs")


def split_batch(batch: Batch, sizes: Sequence[int]) -> List[Batch]:
    """Cut a batch (a tensor, or ``(input, target)``) along dimension 0 into shards of
    ``sizes`` samples (0 allowed); the sizes must add up to the batch's."""
    x, target = _parts(batch)
    if sum(sizes) != x.shape[0] or any(n < 0 for n in sizes):
        raise ValueError(f"split_batch: sizes {list(sizes)} do not split a batch of {x.shape[0]} samples")
    shards: List[Batch] = []
    start = 0
    for n in sizes:
        xs = x[start:start + n]
        shards.append(xs if target is None else (xs, target[start:start + n]))
        start += n
    return shards


def split_batches(batches: Sequence[Batch], sizes: Sequence[int]) -> List[List[Batch]]:
    """``batches_per_rank`` for :func:`compare_to_big_batch`: each batch cut by
    :func:`split_batch`; rank r gets the r-th shard of every batch."""
    per_step = [split_batch(b, sizes) for b in batches]
    return [[shards[r] for shards in per_step] for r in range(len(sizes))]


def default_loss(output: Any, target: Any) -> torch.Tensor:
    """The summed per-sample loss used when none is given.

    * integer ``target``: ``cross_entropy(output, target, reduction="sum")``;
    * floating ``target``: half the summed squared error;
    * no target: half the summed squared distance to a fixed pseudo-random target
      (the same for every sample and every call), so that gradients are not trivial.
    """
    out = _tensors(output)[0]
    if target is None:
        gen = torch.Generator().manual_seed(0)
        fixed = torch.randn(tuple(out.shape[1:]), generator=gen, dtype=torch.float64)
        return 0.5 * (out - fixed.to(out)).pow(2).sum()
    if not torch.is_floating_point(target):
        return F.cross_entropy(out, target, reduction="sum")
    return 0.5 * (out - target).pow(2).sum()


@dataclass(frozen=True)
class BigBatchReport:
    """What :func:`compare_to_big_batch` found.

    Attributes:
        world_size: ranks trained.
        steps: training steps compared.
        shard_sizes: samples per rank, for each step.
        mode: the ``convert_model`` mode (``"custom"`` when a ``convert`` was given).
        max_abs_diff: per category of :data:`CATEGORIES`, the largest absolute
            difference from the reference over every rank, step and tensor.
        worst: per category, where the largest violation of the tolerance is
            (``"rank 1, step 0, 1.weight"``).
        missing: tensors the reference has and a rank does not (or the reverse for
            parameter gradients), named.
        rtol: relative tolerance.
        atol: absolute tolerance: ``|a - b| <= atol + rtol * |b|`` everywhere.
        ok: every category within the tolerance and nothing missing.
        violations: per category, the largest ``|a - b| / (atol + rtol * |b|)``
            (at most 1 when within the tolerance).
    """

    world_size: int
    steps: int
    shard_sizes: Tuple[Tuple[int, ...], ...]
    mode: str
    max_abs_diff: Dict[str, float]
    worst: Dict[str, str]
    missing: Tuple[str, ...]
    rtol: float
    atol: float
    ok: bool
    violations: Dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        verdict = "matches" if self.ok else "DOES NOT match"
        sizes = ", ".join("+".join(map(str, s)) for s in self.shard_sizes)
        lines = [f"converted model ({self.mode}) on {self.world_size} ranks {verdict} BatchNorm on the "
                 f"big batch over {self.steps} step(s) (shards {sizes}; tolerance rtol={self.rtol:g}, "
                 f"atol={self.atol:g})",
                 f"  {'compared':<14} {'max |diff|':>12}  within  worst"]
        for name in CATEGORIES:
            if name not in self.max_abs_diff:
                continue
            within = "yes" if self.violations.get(name, 0.0) <= 1.0 else "NO"
            lines.append(f"  {name:<14} {self.max_abs_diff[name]:>12.3e}  {within:<6}  "
                         f"{self.worst.get(name, '')}")
        if self.missing:
            lines.append("  missing: " + ", ".join(self.missing[:10])
                         + (f" (+{len(self.missing) - 10} more)" if len(self.missing) > 10 else ""))
        return "\n".join(lines)


def compare_to_big_batch(model_fn: Callable[[], nn.Module],
                         batches_per_rank: Sequence[Sequence[Batch]], *,
                         mode: str = "sync",
                         steps: Optional[int] = None,
                         options: Optional[Mapping[str, Any]] = None,
                         convert: Optional[Callable[[nn.Module], nn.Module]] = None,
                         loss_fn: Callable[[Any, Any], torch.Tensor] = default_loss,
                         lr: float = 0.1,
                         ddp: bool = True,
                         pool: Optional[RankPool] = None,
                         timeout: float = 600.0,
                         rtol: float = 1e-7,
                         atol: float = 1e-9) -> BigBatchReport:
    """Train a converted copy of ``model_fn()`` on W gloo ranks and the plain copy on
    the concatenated batches in this process (both float64, SGD, the same initial
    state); compare outputs, input and parameter gradients at every step, parameters
    and running statistics after every step, and eval-mode outputs at the end.

    Args:
        model_fn: builds the model with plain ``torch.nn.BatchNorm*d`` layers. It must
            be picklable (a module-level function, or a ``functools.partial`` of one):
            every rank calls it. Its initial state is taken once here and loaded on
            every rank.
        batches_per_rank: ``batches_per_rank[r][s]`` is rank r's batch at step s: the
            model's input (a tensor), or ``(input, target)``. W = the number of ranks
            (one is allowed: a synced layer is then local BatchNorm). Shards may be
            uneven or empty; the big batch of step s is their concatenation in rank
            order. :func:`split_batches` cuts whole batches into this form.
        mode: :func:`distnorm.convert_model`'s mode.
        steps: how many steps to train (default: every batch given); a rank's batches
            are used in turn, cyclically.
        options: further keyword arguments of :func:`distnorm.convert_model`.
        convert: replaces ``convert_model`` (picklable): how the ranks' copy is made
            (e.g. your own conversion, or the identity to see what unsynced
            BatchNorm gives).
        loss_fn: ``loss_fn(output, target)`` → the summed per-sample loss (picklable;
            ``target`` is ``None`` for bare inputs); see :func:`default_loss`.
        lr: SGD's learning rate.
        ddp: wrap the ranks' model in ``DistributedDataParallel`` (``False``: the
            gradients are all-reduced and averaged by hand, for models DDP rejects).
        pool: run on this :class:`RankPool` (of W ranks) instead of spawning W
            fresh processes.
        timeout: seconds the ranks may take.
        rtol: relative tolerance of the comparison.
        atol: absolute tolerance: ``|a - b| <= atol + rtol * |b|`` everywhere.

    Returns:
        A :class:`BigBatchReport` (``report.ok``; ``print(report)`` for a table).

    Raises:
        ValueError: the batches do not fit together (ranks with different numbers of
            steps, a step whose big batch is empty, a pool of another size).
        distnorm.launch.local.SpawnError: a rank raised or died (its traceback in the
            message); :class:`distnorm.testing.WorkerError` on a ``pool``.
    """
    world = len(batches_per_rank)
    if world < 1:
        raise ValueError("compare_to_big_batch: batches_per_rank is empty (one list of batches per rank)")
    counts = {len(b) for b in batches_per_rank}
    if len(counts) != 1 or 0 in counts:
        raise ValueError("compare_to_big_batch: every rank needs the same, non-zero number of batches "
                         f"(got {[len(b) for b in batches_per_rank]})")
    steps = steps if steps is not None else counts.pop()
    if steps < 1:
        raise ValueError(f"compare_to_big_batch: steps must be >= 1 (got {steps})")
    if pool is not None and pool.world != world:
        raise ValueError(f"compare_to_big_batch: a pool of {pool.world} ranks for {world} ranks' batches")
    data = [[_as_float64(rank[s % len(rank)]) for s in range(steps)] for rank in batches_per_rank]
    sizes = tuple(tuple(int(_parts(data[r][s])[0].shape[0]) for r in range(world)) for s in range(steps))
    for s, row in enumerate(sizes):
        if sum(row) == 0:
            raise ValueError(f"compare_to_big_batch: step {s} has no samples on any rank")

    reference_model = model_fn()
    init_state = {k: v.detach().clone() for k, v in reference_model.state_dict().items()}
    job = _Job(model_fn, init_state, mode, dict(options or {}), convert, loss_fn, lr, ddp, data)
    if pool is not None:
        answers = pool.run(_train_rank, job, timeout=timeout)
    else:
        answers = spawn(_train_rank, world, job, timeout=timeout, pg_timeout=max(timeout / 2, 30.0))
    ranks = [torch.load(io.BytesIO(answer), weights_only=False) for answer in answers]
    reference = _train_reference(reference_model, init_state, data, loss_fn, lr)
    return _compare(ranks, reference, sizes, "custom" if convert is not None else mode, rtol, atol)


def assert_matches_big_batch(model_fn: Callable[[], nn.Module],
                             batches_per_rank: Sequence[Sequence[Batch]], **kwargs: Any) -> BigBatchReport:
    """:func:`compare_to_big_batch`, raising when the model does not match.

    Returns:
        The report, when it is ``ok``.

    Raises:
        AssertionError: with the report's table, when it is not.
    """
    report = compare_to_big_batch(model_fn, batches_per_rank, **kwargs)
    if not report.ok:
        raise AssertionError(str(report))
    return report


# ------------------------------------------------------------------------- internals

@dataclass
class _Job:
    """What every rank needs (pickled to the ranks)."""

    model_fn: Callable[[], nn.Module]
    init_state: Dict[str, torch.Tensor]
    mode: str
    options: Dict[str, Any]
    convert: Optional[Callable[[nn.Module], nn.Module]]
    loss_fn: Callable[[Any, Any], torch.Tensor]
    lr: float
    ddp: bool
    data: List[List[Batch]]


def _parts(batch: Batch) -> Tuple[torch.Tensor, Any]:
    if isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise ValueError("a batch is an input tensor or an (input, target) pair "
                             f"(got a sequence of {len(batch)})")
        return batch[0], batch[1]
    if not isinstance(batch, torch.Tensor):
        raise ValueError(f"a batch is an input tensor or an (input, target) pair (got {type(batch).__name__})")
    return batch, None


def _as_float64(batch: Batch) -> Batch:
    x, target = _parts(batch)
    x = x.detach().to(torch.float64) if torch.is_floating_point(x) else x.detach()
    if isinstance(target, torch.Tensor):
        target = target.detach().to(torch.float64) if torch.is_floating_point(target) else target.detach()
    return x if target is None else (x, target)


def _tensors(output: Any) -> List[torch.Tensor]:
    """The tensors of a model's output (a tensor, or nested tuples, lists and dicts)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for k in sorted(output, key=str) for t in _tensors(output[k])]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors(item)]
    return []


def _detached(ts: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    return [t.detach().clone() for t in ts]


def _step_record(model: nn.Module, out: Any, x: torch.Tensor, input_scale: float) -> Dict[str, Any]:
    grad = x.grad / input_scale if x.grad is not None else None
    return {"outputs": _detached(_tensors(out)),
            "input_grad": grad.detach().clone() if grad is not None else None,
            "param_grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()
                            if p.grad is not None}}


def _input(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    return x.requires_grad_() if torch.is_floating_point(x) else x


def _train_rank(rank: int, world: int, job: _Job) -> bytes:
    """One rank: the converted copy, trained on this rank's shards (see the module
    docstring for the loss scaling). Its records come back serialized: tensors sent
    through a queue live in shared memory whose file descriptors the parent fetches
    from the rank, which may have exited by then."""
    model = job.model_fn()
    model.load_state_dict(job.init_state)
    model = model.to(torch.float64)
    if job.convert is not None:
        model = job.convert(model)
    else:
        model = convert_model(model, mode=job.mode, **job.options)
    model.train()
    net: nn.Module = nn.parallel.DistributedDataParallel(model) if job.ddp else model
    opt = torch.optim.SGD(model.parameters(), lr=job.lr)
    records: List[Dict[str, Any]] = []
    for step, batch in enumerate(job.data[rank]):
        x, target = _parts(batch)
        total = sum(int(_parts(job.data[r][step])[0].shape[0]) for r in range(world))
        x = _input(x)
        opt.zero_grad(set_to_none=True)
        out = net(x)
        loss = job.loss_fn(out, target) * (world / total)
        loss.backward()
        if not job.ddp:
            for p in model.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad.div_(world)
        record = _step_record(model, out, x, float(world))
        opt.step()
        record["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        records.append(record)
    model.eval()
    with torch.no_grad():
        records[-1]["eval_outputs"] = _detached(_tensors(model(_parts(job.data[rank][-1])[0])))
    buffer = io.BytesIO()
    torch.save(records, buffer)
    return buffer.getvalue()


def _train_reference(model: nn.Module, init_state: Dict[str, torch.Tensor], data: List[List[Batch]],
                     loss_fn: Callable[[Any, Any], torch.Tensor], lr: float) -> List[Dict[str, Any]]:
    """The plain model on the concatenated batches: the mean loss over each big batch."""
    model.load_state_dict(init_state)
    model = model.to(torch.float64).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    records: List[Dict[str, Any]] = []
    names = [name for name, _ in model.named_parameters()]
    for step in range(len(data[0])):
        parts = [_parts(rank[step]) for rank in data]
        x = _input(torch.cat([p[0] for p in parts]))
        targets = [p[1] for p in parts]
        target = None if targets[0] is None else torch.cat(targets)
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = loss_fn(out, target) / x.shape[0]
        loss.backward()
        record = _step_record(model, out, x, 1.0)
        record["param_names"] = names
        opt.step()
        record["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        records.append(record)
    model.eval()
    with torch.no_grad():
        last = torch.cat([_parts(rank[-1])[0] for rank in data])
        records[-1]["eval_outputs"] = _detached(_tensors(model(last)))
    return records


class _Tally:
    """The largest difference and tolerance violation per category, and where."""

    def __init__(self, rtol: float, atol: float) -> None:
        self.rtol, self.atol = rtol, atol
        self.diff: Dict[str, float] = {}
        self.violation: Dict[str, float] = {}
        self.worst: Dict[str, str] = {}
        self.missing: List[str] = []

    def add(self, category: str, where: str, got: Optional[torch.Tensor], want: Optional[torch.Tensor]) -> None:
        self.diff.setdefault(category, 0.0)
        self.violation.setdefault(category, 0.0)
        if got is None or want is None:
            if got is not None or want is not None:
                self.missing.append(f"{where} ({category})")
            return
        if got.shape != want.shape:
            self.missing.append(f"{where} ({category}: shape {tuple(got.shape)} vs {tuple(want.shape)})")
            self.violation[category] = math.inf
            self.worst[category] = where
            return
        if got.numel() == 0:
            return
        a, b = got.detach().double(), want.detach().double()
        diff = (a - b).abs()
        largest = float(diff.max())
        violation = float((diff / (self.atol + self.rtol * b.abs())).max())
        if math.isnan(largest):
            largest = violation = math.inf
        self.diff[category] = max(self.diff[category], largest)
        if violation > self.violation[category] or category not in self.worst:
            self.violation[category] = max(violation, self.violation[category])
            self.worst[category] = where


def _compare(ranks: List[List[Dict[str, Any]]], reference: List[Dict[str, Any]],
             sizes: Tuple[Tuple[int, ...], ...], mode: str, rtol: float, atol: float) -> BigBatchReport:
    tally = _Tally(rtol, atol)
    params = set(reference[0]["param_names"])
    for r, records in enumerate(ranks):
        for s, (got, want) in enumerate(zip(records, reference)):
            start = sum(sizes[s][:r])
            rows = slice(start, start + sizes[s][r])
            where = f"rank {r}, step {s}"
            if len(got["outputs"]) != len(want["outputs"]):
                tally.missing.append(f"{where}: {len(got['outputs'])} output tensors, reference "
                                     f"{len(want['outputs'])}")
            for i, (g, w) in enumerate(zip(got["outputs"], want["outputs"])):
                tally.add("outputs", f"{where}, output {i}", g, w[rows])
            ref_dx = want["input_grad"]
            tally.add("input_grads", f"{where}, input", got["input_grad"],
                      None if ref_dx is None else ref_dx[rows])
            for name in sorted(set(got["param_grads"]) | set(want["param_grads"])):
                tally.add("param_grads", f"{where}, {name}", got["param_grads"].get(name),
                          want["param_grads"].get(name))
            for name, value in want["state"].items():
                category = "parameters" if name in params else "running_stats"
                mine = got["state"].get(name)
                if mine is None:
                    tally.missing.append(f"{where}, {name} (state_dict)")
                    continue
                tally.add(category, f"{where}, {name}", mine, value)
        last = len(records) - 1
        rows = slice(sum(sizes[last][:r]), sum(sizes[last][:r + 1]))
        for i, (g, w) in enumerate(zip(records[-1]["eval_outputs"], reference[-1]["eval_outputs"])):
            tally.add("eval_outputs", f"rank {r}, eval, output {i}", g, w[rows])
    ok = not tally.missing and all(v <= 1.0 for v in tally.violation.values())
    return BigBatchReport(world_size=len(ranks), steps=len(reference), shard_sizes=sizes, mode=mode,
                          max_abs_diff=dict(tally.diff), worst=dict(tally.worst),
                          missing=tuple(tally.missing), rtol=rtol, atol=atol, ok=ok,
                          violations=dict(tally.violation))

