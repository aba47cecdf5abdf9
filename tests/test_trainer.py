"""cign-train end to end on a tiny real avdigits store: outputs, determinism, resume after kill, errors."""
from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from cign_train import checkpoint as ck
from cign_train.config import CIGNConfig
from cign_train.methods import available, get_method
from cign_train.settings import TrainSettings
from cign_train.trainer import NonFiniteLoss, Trainer

TINY = CIGNConfig(dim=32, depth=1, heads=4)


def tiny_settings(data_dir, **kw) -> TrainSettings:
    base = dict(dataset="avdigits", data_dir=str(data_dir), spec="cpu", tasks=2, epochs=1, batch_size=8, lr=1e-3,
                max_per_class=4, buffer_per_class=2, workers=0, model=TINY)
    return TrainSettings(**{**base, **kw})


@pytest.mark.parametrize("method", ["cign", "finetune"])
def test_each_method_runs_two_tasks_and_writes_every_output(tiny_avdigits, tmp_path, method):
    run = tmp_path / method
    metrics = Trainer(tiny_settings(tiny_avdigits, method=method), run, progress=False).run()
    for name in ("config.json", "metrics.json", "metrics.csv", "accuracy_matrix.png", "task_0.pt", "task_1.pt"):
        assert (run / name).is_file(), name
    assert not (run / "last.pt").exists()
    saved = json.loads((run / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    for key in ("accuracy_matrix", "average_accuracy", "forgetting"):
        assert set(saved[key]) == {"audio", "visual", "audio_visual"}
    a = saved["accuracy_matrix"]["audio_visual"]
    assert [len(r) for r in a] == [1, 2] and all(0 <= x <= 100 for r in a for x in r)
    assert set(saved["forgetting"]["audio"]) == {"avcil", "final"}
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert len(rows) == 3 * 3 and rows[0].keys() == {"modality", "after_task", "task", "accuracy"}

    ckpt = torch.load(run / "task_1.pt", weights_only=True)
    assert ckpt["classes"] == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    assert ckpt["classes_per_task"] == [5, 5] and ckpt["tokens"].shape == (10, 32)
    assert ckpt["config"] == TINY.to_dict() and ckpt["spec"]["name"] == "cpu"
    first = torch.load(run / "task_0.pt", weights_only=True)
    assert first["tokens"].shape == (5, 32) and first["classes"] == ckpt["classes"][:5]
    buffer = ckpt["buffer"]
    if get_method(method).NEEDS_BUFFER:
        assert len(buffer["classes"]) == 10 and all(len(ix) == 2 for ix in buffer["indices"])
    else:
        assert buffer["classes"] == []


def test_methods_are_discovered_by_file_name():
    assert {"cign", "finetune"} <= set(available())
    with pytest.raises(ValueError, match="unknown method 'ewc2'; choose from"):
        get_method("ewc2")


def test_same_seed_same_metrics_and_class_order_seeded(tiny_avdigits, tmp_path):
    s = tiny_settings(tiny_avdigits, class_order="seeded")
    a = Trainer(s, tmp_path / "a", progress=False).run()
    b = Trainer(s, tmp_path / "b", progress=False).run()
    assert a == b
    classes = torch.load(tmp_path / "a" / "task_1.pt", weights_only=True)["classes"]
    assert sorted(classes) == sorted(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
    assert classes[:2] != ["zero", "one"] or classes[2:4] != ["two", "three"]


def test_non_finite_loss_names_task_epoch_and_step(tiny_avdigits, tmp_path):
    s = tiny_settings(tiny_avdigits, lr=1e12, epochs=3)
    with pytest.raises(NonFiniteLoss, match=r"at task \d, epoch \d, step \d+"):
        Trainer(s, tmp_path / "nan", progress=False).run()


def test_existing_run_needs_resume(tiny_avdigits, tmp_path):
    s = tiny_settings(tiny_avdigits)
    Trainer(s, tmp_path / "r", progress=False).run()
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(s, tmp_path / "r", progress=False).run()
    other = tiny_settings(tiny_avdigits, lr=2e-3)
    with pytest.raises(ValueError, match="other settings"):
        Trainer(other, tmp_path / "r", progress=False).run(resume=True)


def _cli(data_dir, out, *extra):
    return [sys.executable, "-m", "cign_train.cli.train", "--data-dir", str(data_dir), "--tasks", "2",
            "--epochs", "3", "--batch-size", "8", "--max-per-class", "4", "--buffer-per-class", "2",
            "--workers", "0", "--dim", "32", "--depth", "1", "--heads", "4", "--lr", "1e-3", "--out", str(out),
            "--no-progress", *extra]


def test_resume_after_kill_gives_the_uninterrupted_result(tiny_avdigits, tmp_path):
    whole = subprocess.run(_cli(tiny_avdigits, tmp_path / "whole"), capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert "audio_visual" in whole.stdout and "forget(AV-CIL)" in whole.stdout

    run = tmp_path / "killed"
    proc = subprocess.Popen(_cli(tiny_avdigits, run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        state = run / "last.pt"
        if state.is_file() and (run / "task_0.pt").is_file():
            try:
                if ck.load(state)["task"] == 1:  # mid-way through the second task
                    break
            except (RuntimeError, EOFError, ValueError):
                pass
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "task_1.pt").exists()

    resumed = subprocess.run(_cli(tiny_avdigits, run, "--resume"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((run / "metrics.json").read_text()) == json.loads((tmp_path / "whole" / "metrics.json").read_text())
    a = torch.load(run / "task_1.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "whole" / "task_1.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
