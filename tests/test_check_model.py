"""No silent downgrades: check_model, the missing-process-group warning, a group
without this rank, and torch.jit.script's refusal."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

import distnorm
from distnorm import distributed
from distnorm.check import RECORD

LAUNCHER_VARS = ("WORLD_SIZE", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_NTASKS",
                 "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, affine=False)))


# -- layers swapped away by another converter ------------------------------------------

def test_report_lists_layers_mode_group_and_policy():
    model = distnorm.convert_model(_net(), mode="brn")
    model[1].nonfinite = "skip"
    report = distnorm.check_model(model)
    assert report.ok and report.swapped == ()
    assert [(r.name, r.kind, r.mode, r.nonfinite) for r in report.layers] == [
        ("1", "BatchRenorm", "brn", "skip"), ("3.1", "BatchRenorm", "brn", "raise")]
    if not dist.is_initialized():
        assert {r.group for r in report.layers} == {"local (no process group)"}
        assert report.world_size is None and report.synced == ()
    text = str(report)
    assert "BatchRenorm" in text and "3.1" in text and "synced over" in text


def test_torch_converter_swap_is_reported():
    model = nn.SyncBatchNorm.convert_sync_batchnorm(distnorm.convert_model(_net()))
    report = distnorm.check_model(model)
    assert not report.ok and report.layers == ()
    assert [(s.name, s.kind, s.mode) for s in report.swapped] == [
        ("1", "SyncBatchNorm", "sync"), ("3.1", "SyncBatchNorm", "sync")]
    assert "swapped away" in str(report) and "convert_sync_batchnorm" in str(report)
    # Converting again brings distnorm back; the report is clean.
    assert distnorm.check_model(distnorm.convert_model(model, mode="cbn")).ok


def test_swap_is_found_after_moves_copies_pickling_and_loading():
    model = distnorm.convert_model(_net(), mode="cmbn")
    model.to(torch.float64)  # replaces buffer tensors (and parameters' data)
    model.load_state_dict(copy.deepcopy(model.state_dict()))
    assert not any(RECORD in k for k in model.state_dict())
    model = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    model = torch.load(buffer, weights_only=False)
    wrapped = nn.ModuleDict({"net": nn.SyncBatchNorm.convert_sync_batchnorm(model)})
    report = distnorm.check_model(wrapped)
    assert [(s.name, s.mode) for s in report.swapped] == [("net.1", "cmbn"), ("net.3.1", "cmbn")]


def test_revert_and_unrelated_replacements_are_not_swaps():
    model = distnorm.convert_model(_net())
    assert distnorm.check_model(distnorm.revert_model(model)).ok
    model = distnorm.convert_model(_net())
    model[3][1] = nn.Identity()  # e.g. folded into the conv for inference: not a norm
    assert distnorm.check_model(model).swapped == ()


def test_check_model_rejects_non_modules():
    with pytest.raises(TypeError, match="nn.Module"):
        distnorm.check_model(object())


# -- a launcher started several processes, but none has a process group ------------------

@pytest.fixture
def fresh_env(monkeypatch):
    if dist.is_available() and dist.is_initialized():
        pytest.skip("this process has a process group")
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "_warned_no_group", False)
    return monkeypatch


def _train_step(model: nn.Module) -> None:
    model.train()
    model(torch.randn(2, 3, 6, 6)).sum().backward()


def test_world_size_without_group_warns_once_naming_the_fix(fresh_env):
    fresh_env.setenv("WORLD_SIZE", "2")
    model = distnorm.convert_model(_net())
    with pytest.warns(distributed.NoProcessGroupWarning) as caught:
        _train_step(model)
        _train_step(model)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "WORLD_SIZE=2" in message and "init_process_group" in message
    assert "init_from_env" in message and "SyncBatchNorm '1'" in message
    report = distnorm.check_model(model)
    assert report.launcher == ("WORLD_SIZE", 2) and not report.ok
    assert "no process group" in str(report)


def test_compiled_forward_without_group_does_not_break_the_graph(fresh_env):
    fresh_env.setenv("WORLD_SIZE", "2")
    model = distnorm.convert_model(_net())
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    assert compiled(torch.randn(2, 3, 6, 6)).shape == (2, 4, 4, 4)


@pytest.mark.parametrize("env, size", [
    ({"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "1"}, 4),   # a task of an srun step
    ({"OMPI_COMM_WORLD_SIZE": "3"}, 3),
    ({"WORLD_SIZE": "1"}, None),
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}, None),        # the batch script itself
    ({"SLURM_STEP_NUM_TASKS": "4"}, None),
    ({}, None),
])
def test_launcher_world_size(env, size):
    found = distributed.launcher_world_size(env)
    assert (found[1] if found else None) == size


def test_single_process_runs_stay_quiet(fresh_env):
    with warnings.catch_warnings():
        warnings.simplefilter("error", distributed.NoProcessGroupWarning)
        _train_step(distnorm.convert_model(_net()))


# -- a process group that does not hold this rank (real gloo ranks) ----------------------

def _outside_group(rank, world):
    group = dist.new_group([0, 1])  # collective: every rank creates it
    torch.manual_seed(rank)
    model = distnorm.convert_model(_net(), process_group=group)
    report = distnorm.check_model(model)
    try:
        _train_step(model)
        error = None
    except ValueError as exc:
        error = str(exc)
    return error, [layer.group for layer in report.layers], report.ok


def test_group_without_this_rank_raises_naming_the_layer(world3):
    results = world3.run(_outside_group)
    for rank in (0, 1):
        assert results[rank] == (None, ["ranks [0, 1]", "ranks [0, 1]"], True)
    error, groups, ok = results[2]
    assert error is not None and "SyncBatchNorm '1'" in error and "rank 2" in error
    assert "not a member" in error and groups == ["not a member"] * 2 and not ok


def _world_report(rank, world):
    return str(distnorm.check_model(distnorm.convert_model(_net()))), world


def test_report_names_the_world(world2):
    for text, world in world2.run(_world_report):
        assert f"world ({world} ranks)" in text and "2 synced" in text


# -- TorchScript ---------------------------------------------------------------------------

def test_jit_script_says_to_revert_first():
    model = distnorm.convert_model(_net())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        with pytest.raises(RuntimeError, match=r"SyncBatchNorm '1'.*distnorm.revert_model"):
            torch.jit.script(model)
        scripted = torch.jit.script(distnorm.revert_model(model).eval())
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(scripted(x), model.eval()(x))
