"""OpenMMLab: ``norm_cfg=dict(type="DistSyncBN")`` and the converting model wrapper.

The multi-rank test runs mmengine's own ``Runner.train()`` on the 2-rank gloo pool
(``launcher="pytorch"``: the Runner finds the process group already initialized and
uses it). The model is built by the Runner from a config, out of mmcv's
``ConvModule``, which builds its norm with mmcv's ``build_norm_layer`` — from
``mmcv-lite``, the pure-Python mmcv (the full mmcv has to be compiled against torch).
Two ways are covered:

* ``norm_cfg=dict(type="DistSyncBN")`` after ``openmmlab.register()``;
* ``norm_cfg=dict(type="BN")`` with ``model_wrapper_cfg=dict(type="DistnormDistributedDataParallel")``,
  which converts the built model before wrapping it.

Each rank holds an uneven shard (3 and 5 samples) and minimises (W/B)·Σ_local ℓ_i, so
DDP's average applies the gradient of the mean over the concatenated batch (see
tests/test_ddp.py). In float64, the weights and running statistics after training
equal those of the same model with plain ``nn.BatchNorm2d`` trained on the
concatenated batch to ~1e-12.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import distnorm

for _package in ("mmengine", "mmcv"):
    if importlib.util.find_spec(_package) is None:
        if os.environ.get("CI"):
            raise ImportError(f"{_package} is part of the dev extra: pip install -e '.[dev]'")
        pytest.skip(f"{_package} is not installed (pip install -e '.[dev]')", allow_module_level=True)

from mmcv.cnn import ConvModule, build_norm_layer  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402
from mmengine.model import BaseModel  # noqa: E402

from distnorm.integrations import openmmlab  # noqa: E402
from tests._integration import LR, SHARDS, assert_states_match, batches  # noqa: E402
from tests._integration import reference_state  # noqa: E402

_RUNS = itertools.count()


class _Net(BaseModel):
    """Two ConvModules (conv → norm from ``norm_cfg`` → ReLU) and a linear head."""

    def __init__(self, norm_cfg: Dict[str, Any]) -> None:
        super().__init__()
        self.body = nn.Sequential(ConvModule(3, 4, 3, padding=1, norm_cfg=norm_cfg),
                                  ConvModule(4, 5, 3, padding=1, norm_cfg=norm_cfg, act_cfg=None))
        self.head = nn.Linear(5, 3)
        self.double()

    def forward(self, inputs: torch.Tensor, data_samples: Optional[torch.Tensor] = None,
                mode: str = "tensor") -> Any:
        out = self.head(self.body(inputs).mean((2, 3)))
        if mode == "loss":
            world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
            # (W / B) · Σ_local ℓ_i: DDP's average is then the global mean's gradient.
            return {"loss": F.cross_entropy(out, data_samples, reduction="sum") * (world / sum(SHARDS))}
        return out


class _Capture(Hook):
    """Records the weights the Runner starts training from and the norm layers' types."""

    def __init__(self) -> None:
        self.init: Dict[str, torch.Tensor] = {}
        self.norms: List[str] = []

    def before_train(self, runner: Any) -> None:
        model = runner.model.module
        self.init = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.norms = [type(m.norm).__name__ for m in model.body]


def _batches() -> List[Tuple[torch.Tensor, torch.Tensor]]:
    return batches(seed=1)


def _runner_job(rank: int, world: int, work_dir: str, norm_type: str, wrapper: str,
                name: str) -> Dict[str, Any]:
    from mmengine.registry import MODELS
    from mmengine.runner import Runner
    from torch.utils.data import DataLoader

    openmmlab.register()
    MODELS.register_module(name="DistnormTestNet", module=_Net, force=True)
    start, size = sum(SHARDS[:rank]), SHARDS[rank]
    samples = [dict(inputs=x[i], data_samples=y[i])
               for x, y in _batches() for i in range(start, start + size)]
    capture = _Capture()
    saved = dict(os.environ)
    os.environ["LOCAL_RANK"] = str(rank)   # read by the Runner when it wraps the model
    try:
        runner = Runner(
            model=dict(type="DistnormTestNet", norm_cfg=dict(type=norm_type)),
            work_dir=work_dir, experiment_name=name, launcher="pytorch",
            train_dataloader=DataLoader(samples, batch_size=size),   # one shard a step
            train_cfg=dict(by_epoch=True, max_epochs=1),
            optim_wrapper=dict(optimizer=dict(type="SGD", lr=LR)),
            # A config file's top-level key; device_ids=None for CPU modules (the
            # Runner would pass [LOCAL_RANK]).
            cfg=dict(model_wrapper_cfg=dict(type=wrapper, device_ids=None)),
            default_hooks=dict(checkpoint=None), custom_hooks=[capture],
            randomness=dict(seed=0), log_level="WARNING",
            # The pool's workers are spawned: keep them so (the default is fork).
            env_cfg=dict(mp_cfg=dict(mp_start_method="spawn"), dist_cfg=dict(backend="gloo")))
        runner.train()
    finally:   # the Runner also sets OMP_NUM_THREADS and MKL_NUM_THREADS
        os.environ.clear()
        os.environ.update(saved)
    model = runner.model.module
    return {"init": capture.init, "norms_in_training": capture.norms,
            "wrapper": type(runner.model).__name__,
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def _reference(init: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    net = _Net(dict(type="BN"))
    net.load_state_dict(init)
    return reference_state(net, _batches())


@pytest.mark.slow
@pytest.mark.parametrize("norm_type,wrapper", [
    ("DistSyncBN", "MMDistributedDataParallel"),
    ("BN", openmmlab.WRAPPER_NAME),
], ids=["norm_cfg", "model_wrapper_cfg"])
def test_runner_trains_like_batch_norm_on_concatenated_batch(world2, norm_type: str,
                                                             wrapper: str) -> None:
    with tempfile.TemporaryDirectory() as work_dir:
        results = world2.run(_runner_job, work_dir, norm_type, wrapper,
                             f"distnorm-test-{os.getpid()}-{next(_RUNS)}", timeout=180)
    for key in results[0]["init"]:   # DDP broadcast rank 0's weights
        assert torch.equal(results[0]["init"][key], results[1]["init"][key]), key
    expected = _reference(results[0]["init"])
    for result in results:
        assert result["norms_in_training"] == ["SyncBatchNorm", "SyncBatchNorm"]
        assert result["wrapper"] == wrapper
    assert_states_match(results, expected)


# -- registration, without processes ---------------------------------------------------

@pytest.mark.filterwarnings("ignore:.*does not come straight from:UserWarning")  # DistCBN, alone
def test_register_is_idempotent_and_every_type_builds() -> None:
    from mmengine.registry import MODEL_WRAPPERS, MODELS

    assert openmmlab.register() == openmmlab.register() == openmmlab.NORM_TYPES
    assert MODEL_WRAPPERS.get(openmmlab.WRAPPER_NAME).__name__ == openmmlab.WRAPPER_NAME
    for name, cls in openmmlab.NORM_TYPES.items():
        assert MODELS.get(name) is cls
        cfg: Dict[str, Any] = dict(type=name, requires_grad=False)
        layer_name, layer = build_norm_layer(cfg, 12, postfix=1)
        assert type(layer) is cls
        assert layer_name == ("gn1" if name == "DistGN" else "bn1")
        assert all(not p.requires_grad for p in layer.parameters())
        x = torch.randn(4, 12, 3, 3)
        assert layer(x).shape == x.shape


def test_options_and_child_registries() -> None:
    from mmengine.registry import MODELS, Registry

    openmmlab.register()
    _, layer = build_norm_layer(dict(type="DistBRN", r_max=2.0, momentum=0.01, eps=1e-3), 8)
    assert isinstance(layer, distnorm.BatchRenorm)
    assert (layer.momentum, layer.eps) == (0.01, 1e-3)
    assert "r_max=2.0" in repr(layer)
    _, layer = build_norm_layer(dict(type="DistGN", num_groups=32), 48)   # 48 = 3 · 16
    assert isinstance(layer, distnorm.GroupNorm) and layer.num_groups == 24
    # OpenMMLab projects build from their own child registries, which fall back to ours.
    child = Registry("model", parent=MODELS, scope="distnorm_test_scope")
    assert child.get("DistSyncBN") is distnorm.SyncBatchNorm
    # The state_dict is BatchNorm's: a plain-BN checkpoint of the same ConvModule loads.
    plain = ConvModule(3, 4, 3, norm_cfg=dict(type="BN"))
    synced = ConvModule(3, 4, 3, norm_cfg=dict(type="DistSyncBN"))
    synced.load_state_dict(plain.state_dict())


def test_register_refuses_to_replace_another_class() -> None:
    from mmengine.registry import MODELS

    openmmlab.register()
    saved = MODELS.module_dict["DistSyncBN"]
    MODELS._module_dict["DistSyncBN"] = nn.BatchNorm2d
    try:
        with pytest.raises(KeyError, match="DistSyncBN.*already registered"):
            openmmlab.register()
    finally:
        MODELS._module_dict["DistSyncBN"] = saved


def test_wrapper_converts_before_wrapping(world2) -> None:
    results = world2.run(_wrap_job)
    assert results == [["CrossMiniBatchNorm", "CrossMiniBatchNorm"]] * 2


def _wrap_job(rank: int, world: int) -> List[str]:
    from mmengine.registry import MODEL_WRAPPERS

    openmmlab.register()
    wrapped = MODEL_WRAPPERS.build(dict(type=openmmlab.WRAPPER_NAME, norm_mode="cmbn",
                                        norm_options=dict(accumulation_steps=2)),
                                   default_args=dict(module=_Net(dict(type="BN"))))
    assert wrapped.module.body[0].norm.accumulation_steps == 2
    return [type(m.norm).__name__ for m in wrapped.module.body]


def test_config_custom_imports_registers(tmp_path: Path) -> None:
    """A stock tools/train.py only loads the config: its custom_imports must be enough
    (a fresh interpreter, where nothing has registered the names yet)."""
    config = tmp_path / "config.py"
    config.write_text('custom_imports = dict(imports=["distnorm.integrations.openmmlab_register"], '
                      'allow_failed_imports=False)\nnorm_cfg = dict(type="DistSyncBN")\n')
    probe = ("import sys\n"
             "from mmengine.config import Config\n"
             "from mmengine.registry import MODELS\n"
             "assert MODELS.get('DistSyncBN') is None\n"
             f"cfg = Config.fromfile({str(config)!r})\n"
             "from mmcv.cnn import build_norm_layer\n"
             "print(type(build_norm_layer(cfg.norm_cfg, 8)[1]).__name__)\n")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == "SyncBatchNorm"


def test_cycle_norm_type_builds_a_per_level_norm() -> None:
    """``DistCycleBN`` (registered beside NORM_TYPES): a ConvModule stack shared by the
    levels of a head, as mmdet's RetinaHead runs it, with one statistics set per level."""
    from mmengine.registry import MODELS

    openmmlab.register()
    assert openmmlab.CYCLE_NORM_TYPE not in openmmlab.NORM_TYPES
    assert MODELS.get(openmmlab.CYCLE_NORM_TYPE) is distnorm.CycleBatchNorm
    name, layer = build_norm_layer(dict(type="DistCycleBN", length=3, mode="brn", r_max=2.0,
                                        requires_grad=False), 12, postfix=1)
    assert name == "bn1" and isinstance(layer, distnorm.CycleBatchNorm)
    assert (layer.length, layer.mode, layer.levels[2].r_max) == (3, "brn", 2.0)
    assert all(not p.requires_grad for p in layer.parameters())
    with pytest.raises(TypeError, match="length"):
        build_norm_layer(dict(type="DistCycleBN"), 12)
    head = ConvModule(3, 4, 3, padding=1, norm_cfg=dict(type="DistCycleBN", length=3))
    head.init_weights()  # mmcv's constant_init of the norm's weight and bias
    levels = [torch.randn(2, 3, 8 >> k, 8 >> k) * (k + 1) + k for k in range(3)]
    for x in levels:
        head(x)
    norm = head.norm
    assert norm.position == 0
    means = [level.running_mean for level in norm.levels]
    assert not torch.allclose(means[0], means[2])  # each level kept its own statistics
    assert {"bn.weight", "bn.bias", "bn.2.running_var"} <= set(head.state_dict())
