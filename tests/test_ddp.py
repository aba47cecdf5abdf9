"""torchrun with 2 processes on CPU (gloo): DistributedDataParallel training end to end."""
from __future__ import annotations

import json
import subprocess
import sys

import torch


def torchrun(data_dir, out, *extra: str) -> subprocess.CompletedProcess:
    """A tiny 2-task cign-train under torchrun with 2 processes on CPU; fails the test if it fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cign_train.cli.train", "--data-dir", str(data_dir), "--tasks", "2", "--epochs", "1",
           "--batch-size", "4", "--max-per-class", "4", "--workers", "0", "--dim", "32", "--depth", "1",
           "--heads", "4", "--out", str(out), "--no-progress", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_torchrun_two_processes_gloo(tiny_avdigits, tmp_path):
    out = tmp_path / "ddp"
    done = torchrun(tiny_avdigits, out, "--buffer-per-class", "2")
    assert done.stdout.count("forget(AV-CIL)") == 1, "only rank 0 prints the table"
    ckpt = torch.load(out / "task_1.pt", weights_only=True)
    assert ckpt["world_size"] == 2
    metrics = json.loads((out / "metrics.json").read_text())
    # Each rank scored half of the test split; the summed counts cover every test clip of both tasks.
    assert len(metrics["accuracy_matrix"]["audio_visual"]) == 2
    assert metrics["eval_clips"] == [15, 15] and metrics["eval_split"] == "test"


def test_torchrun_l2p_prompts_are_averaged_across_processes(tiny_avdigits, tmp_path):
    """L2P's prompts and keys live outside the DDP-wrapped model: the trainer averages their gradients,
    so both ranks end each task with the same prompts (the run's sync check covers them and raises
    otherwise), and rank 0's checkpoint holds them."""
    out = tmp_path / "l2p"
    torchrun(tiny_avdigits, out, "--method", "l2p")
    ckpt = torch.load(out / "task_1.pt", weights_only=True)
    assert ckpt["world_size"] == 2
    assert ckpt["method_state"] and all(v.numel() > 0 for v in ckpt["method_state"].values())  # pools and keys
