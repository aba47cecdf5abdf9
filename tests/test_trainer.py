"""cign-train end to end on a tiny real avdigits store: outputs, determinism, resume after kill, errors."""
from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cign_train import checkpoint as ck
from cign_train.cli.train import main as train_main
from cign_train.config import CIGNConfig
from cign_train.guard import StepGuard
from cign_train.methods import available, get_method
from cign_train.schedule import task_scheduler
from cign_train.settings import TrainSettings
from cign_train.trainer import NonFiniteLoss, Trainer

TINY = CIGNConfig(dim=32, depth=1, heads=4)
CNN8 = CIGNConfig(encoder="cnn8", dim=32, depth=1, heads=4)  # the cpu preset's encoders: a faster tiny run


def tiny_settings(data_dir, **kw) -> TrainSettings:
    base = dict(dataset="avdigits", data_dir=str(data_dir), spec="cpu", tasks=2, epochs=1, batch_size=8, lr=1e-3,
                max_per_class=4, buffer_per_class=2, workers=0, model=TINY)
    return TrainSettings(**{**base, **kw})


@pytest.mark.parametrize("method", ["cign", "finetune", "joint", "ewc", "lwf", "icarl", "il2m", "ss_il", "podnet", "l2p",
                                    "dualprompt", "bic"])
def test_each_method_runs_two_tasks_and_writes_every_output(tiny_avdigits, tmp_path, method):
    run = tmp_path / method
    options = {"bic_holdout": 1} if method == "bic" else {}  # 2 exemplars per class here
    metrics = Trainer(tiny_settings(tiny_avdigits, method=method, method_options=options), run, progress=False).run()
    for name in ("config.json", "metrics.json", "metrics.csv", "accuracy_matrix.png", "task_0.pt", "task_1.pt"):
        assert (run / name).is_file(), name
    assert not (run / "last.pt").exists()
    saved = json.loads((run / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    for key in ("accuracy_matrix", "average_accuracy", "forgetting"):
        assert set(saved[key]) == {"audio", "visual", "audio_visual"}
    a = saved["accuracy_matrix"]["audio_visual"]
    assert [len(r) for r in a] == [1, 2] and all(0 <= x <= 100 for r in a for x in r)
    assert set(saved["forgetting"]["audio"]) == {"avcil", "facil", "l2p"}
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


def test_eval_split_scores_val_or_test_and_training_never_sees_either(tiny_avdigits, tmp_path):
    """Hyperparameters are chosen on val (``--eval-split val``), test is for reporting: each run scores
    exactly its split's clips (1 val and 3 test clips per class here), and training draws train clips only."""
    from cign_train.trainer import make_plan, train_indices


    metrics = {}
    for split, per_class in (("val", 1), ("test", 3)):
        run = tmp_path / split
        metrics[split] = Trainer(tiny_settings(tiny_avdigits, eval_split=split), run, progress=False).run()
        assert metrics[split]["eval_split"] == split and metrics[split]["eval_clips"] == [5 * per_class, 5 * per_class]
        assert torch.load(run / "task_1.pt", weights_only=True)["evaluation"]["eval_clips"] == metrics[split]["eval_clips"]
    # the run chosen on val, re-scored on test from its checkpoints, reports what a test run reports
    val_run = Trainer(tiny_settings(tiny_avdigits, eval_split="val"), tmp_path / "val", progress=False)
    assert val_run.rescore("test") == json.loads(json.dumps(metrics["test"]))  # its eval_clips say test's
    assert val_run.rescore("val") == json.loads(json.dumps(metrics["val"]))
    plan = make_plan(tiny_settings(tiny_avdigits))
    splits = np.asarray(plan.store.splits)
    for classes in plan.task_classes:
        assert set(splits[train_indices(plan, classes, None, 0)]) == {"train"}
    with pytest.raises(ValueError, match="eval_split must be one of"):
        tiny_settings(tiny_avdigits, eval_split="train")


def test_a_users_csv_store_trains_in_its_class_order(tiny_avdigits, tmp_path):
    """Own data: a CSV of clips with the user's labels, prepared with cign-prepare --dataset csv, trains with
    cign-train --dataset csv --name NAME --tasks N; the classes file's order is the task order."""
    rows = [r.split(",") for r in (tiny_avdigits / "avdigits" / "avdigits.csv").read_text().splitlines()]
    names = {"zero": "dog", "one": "bell", "two": "car", "three": "rain"}  # four of the digits, renamed
    index = tmp_path / "mine.csv"
    with open(index, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label", "split"])
        for youtube_id, start, label, split in rows:
            if label in names:
                w.writerow([f"{youtube_id}_{int(start):06d}.mp4", names[label], split])
    order = tmp_path / "order.txt"
    order.write_text("rain\ncar\nbell\ndog\n")
    data = tmp_path / "data"
    prep = subprocess.run([sys.executable, "-m", "cign_train.cli.prepare", "--dataset", "csv", "--index", str(index),
                           "--clips-dir", str(tiny_avdigits / "avdigits" / "clips"), "--classes", str(order),
                           "--name", "sounds", "--preset", "cpu", "--data-dir", str(data), "--workers", "1"],
                          capture_output=True, text=True, timeout=300)
    assert prep.returncode == 0, prep.stderr[-2000:]
    base = [sys.executable, "-m", "cign_train.cli.train", "--dataset", "csv", "--name", "sounds",
            "--data-dir", str(data), "--epochs", "1", "--batch-size", "8", "--dim", "32", "--depth", "1", "--heads", "4",
            "--workers", "0", "--no-progress"]  # no --preset: the one store there is the cpu preset's
    missing = subprocess.run(base, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "--dataset csv needs --name" in missing.stderr and "--tasks N" in missing.stderr
    run = tmp_path / "run"
    train = subprocess.run(base + ["--tasks", "2", "--out", str(run)], capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-2000:]
    assert "cign on sounds, 2 tasks, test split" in train.stdout
    assert f"sounds: training with the 'cpu' preset, the one its prepared store ({data}/sounds/prepared/cpu)" in train.stdout
    assert json.loads((run / "config.json").read_text())["spec"] == "cpu"
    ckpt = torch.load(run / "task_1.pt", weights_only=True)
    assert ckpt["classes"] == ["rain", "car", "bell", "dog"] and ckpt["classes_per_task"] == [2, 2]
    assert json.loads((run / "metrics.json").read_text())["eval_clips"] == [6, 6]  # 3 test clips per class
    shutil.copytree(data / "sounds" / "prepared" / "cpu", data / "sounds" / "prepared" / "paper")  # a second store
    both = subprocess.run(base + ["--tasks", "2", "--out", str(tmp_path / "both")], capture_output=True, text=True,
                          timeout=120)
    assert both.returncode == 2 and "holds prepared stores of the presets ['cpu', 'paper']: choose one with --preset" in both.stderr
    none = subprocess.run([*base[:6], "other", *base[7:], "--tasks", "2"], capture_output=True, text=True, timeout=120)
    assert none.returncode == 1 and "no prepared store of 'other'" in none.stderr and "cign-prepare --dataset csv" in none.stderr


def test_joint_trains_each_task_on_every_seen_class(tiny_avdigits, tmp_path, capsys):
    """The joint upper bound's second task trains on all ten classes' clips (4 each here), fine-tuning's
    on its own five; neither keeps a buffer."""
    clips = {}
    for method in ("joint", "finetune"):
        Trainer(tiny_settings(tiny_avdigits, method=method), tmp_path / method, progress=False).run()
        lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("task 2/2")]
        clips[method] = int(lines[0].split("| ")[-1].split(" train clips")[0])
        assert torch.load(tmp_path / method / "task_1.pt", weights_only=True)["buffer"]["classes"] == []
    assert clips == {"joint": 40, "finetune": 20}


def test_encoder_lrs_train_each_encoder_at_its_own_rate(tiny_avdigits, tmp_path):
    """--audio-encoder-lr / --visual-encoder-lr move one encoder at its rate while the other encoder and
    the class tokens keep --lr's."""
    start = Trainer(tiny_settings(tiny_avdigits), tmp_path / "init", progress=False).build_model(5).state_dict()
    keys = {"audio": "audio_encoder.backbone.conv1.weight", "visual": "visual_encoder.proj.weight", "tokens": "tokens"}
    moved = {}
    for slow in (None, "audio", "visual"):
        run = tmp_path / f"slow-{slow}"
        Trainer(tiny_settings(tiny_avdigits, **({f"{slow}_encoder_lr": 1e-8} if slow else {})), run, progress=False).run()
        first = torch.load(run / "task_0.pt", weights_only=True)["model"]
        moved[slow] = {name: float((first[k].float() - start[k].float()).norm()) for name, k in keys.items()}
    for slow, other in (("audio", "visual"), ("visual", "audio")):
        assert moved[slow][slow] < 1e-3 * moved[None][slow], moved
        assert moved[slow][other] > 0.1 * moved[None][other] > 0, moved
        assert moved[slow]["tokens"] > 0.1 * moved[None]["tokens"] > 0, moved


def test_method_state_and_options_are_saved_and_a_resume_continues_them(tiny_avdigits, tmp_path):
    """EWC's Fisher and anchor live in each task checkpoint; a run killed after its first task
    resumes with them (without, the second task would train unregularised) and equals the whole run."""
    settings = tiny_settings(tiny_avdigits, method="ewc", method_options={"ewc_lambda": 100.0})
    whole = Trainer(settings, tmp_path / "whole", progress=False).run()
    assert json.loads((tmp_path / "whole" / "config.json").read_text())["method_options"] == {"ewc_lambda": 100.0}
    state = torch.load(tmp_path / "whole" / "task_0.pt", weights_only=True)["method_state"]
    assert set(state) == {"fisher", "anchor"} and state["fisher"]["phi_a.norm.weight"].abs().sum() > 0
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    (tmp_path / "cut" / "task_1.pt").unlink()
    resumed = Trainer(settings, tmp_path / "cut", progress=False).run(resume=True)
    assert resumed == whole
    losses = [json.loads(x) for x in (tmp_path / "cut" / "steps.jsonl").read_text().splitlines()]
    assert all(r["ewc"] > 0 for r in losses if r["task"] == 1 and r.get("step", 0) > 0)


@pytest.mark.parametrize("method", ["l2p", "dualprompt"])
def test_resume_inside_a_task_restores_the_methods_own_parameters(tiny_avdigits, tmp_path, monkeypatch, method):
    """last.pt carries the method's state (the prompts trained with the model): a run stopped after the
    first epoch of its second task resumes to the uninterrupted run's result. Without it the resumed
    epochs would start from the prompts the first task left."""
    settings = tiny_settings(tiny_avdigits, method=method, epochs=2)
    whole = Trainer(settings, tmp_path / "whole", progress=False).run()
    train_epoch = Trainer.train_epoch

    def stop_in_task_2(self, method_, model, optimizer, scaler, scheduler, guard, idx, t, epoch, weights=None):
        if (t, epoch) == (1, 1):
            raise KeyboardInterrupt
        return train_epoch(self, method_, model, optimizer, scaler, scheduler, guard, idx, t, epoch, weights)

    monkeypatch.setattr(Trainer, "train_epoch", stop_in_task_2)
    with pytest.raises(KeyboardInterrupt):
        Trainer(settings, tmp_path / "cut", progress=False).run()
    assert ck.load(tmp_path / "cut" / "last.pt")["epochs_done"] == 1
    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)
    assert Trainer(settings, tmp_path / "cut", progress=False).run(resume=True) == whole
    a = torch.load(tmp_path / "cut" / "task_1.pt", weights_only=True)["method_state"]
    b = torch.load(tmp_path / "whole" / "task_1.pt", weights_only=True)["method_state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_method_help_lists_its_own_options():
    own = CliRunner().invoke(train_main, ["--method", "ewc", "--help"])
    assert own.exit_code == 0 and "--ewc-lambda" in own.output and "FACIL" in own.output
    assert "--ewc-lambda" not in CliRunner().invoke(train_main, ["--help"]).output


@pytest.mark.parametrize("args, message", [
    (["--method", "finetune", "--no-avcg"], "--no-avcg does not apply to --method finetune: it does not use it"),
    (["--method", "ewc", "--buffer-per-class", "10"], "--buffer-per-class does not apply to --method ewc: it keeps no rehearsal buffer"),
    (["--method", "joint", "--token-source", "table"], "--token-source does not apply to --method joint"),
    (["--method", "il2m", "--tau", "0.2"], "--tau does not apply to --method il2m"),
    (["--method", "finetune", "--kl-temperature", "2"], "--kl-temperature does not apply to --method finetune"),
    (["--kl-temperature", "0"], "0.0 is not in the range x>0"),
    (["--ewc-lambda", "1"], "No such option '--ewc-lambda'"),  # cign (the default) has no such option
    (["--preset", "paper", "--visual-stride", "2"], "visual_stride must be one of (1, 2) (cnn8 only), got 2"),
    (["--visual-stride", "3"], "visual_stride must be one of (1, 2) (cnn8 only), got 3"),
])
def test_options_that_do_not_apply_to_the_method_are_refused(args, message, tmp_path):
    refused = CliRunner().invoke(train_main, [*args, "--out", str(tmp_path / "run")])
    assert refused.exit_code == 2 and message in refused.output, refused.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method, given, setting, expected", [
    ("icarl", [], "buffer_select", "herding"),  # iCaRL's Algorithm 4
    ("icarl", ["--buffer-select", "random"], "buffer_select", "random"),
    ("ss_il", [], "rehearsal_sampling", "uniform"),  # SS-IL's ratio-preserving batches (Sec. 4.2)
    ("cign", [], "buffer_select", "random"),
])
def test_a_method_runs_with_its_papers_settings_unless_told_otherwise(tiny_avdigits, tmp_path, method, given, setting,
                                                                     expected):
    run = tmp_path / "run"
    small = ["--tasks", "2", "--epochs", "1", "--max-per-class", "5", "--buffer-per-class", "2", "--dim", "32",
             "--workers", "0", "--no-augment", "--no-progress"]  # 25 clips at batch 16: two steps for the warm-up
    done = CliRunner().invoke(train_main, ["--data-dir", str(tiny_avdigits), "--method", method, *small, *given,
                                           "--out", str(run)])
    assert done.exit_code == 0, done.output
    assert json.loads((run / "config.json").read_text())[setting] == expected


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


def test_stop_after_leaves_a_run_that_a_resume_finishes_as_one_uninterrupted(tiny_avdigits, tmp_path):
    s = tiny_settings(tiny_avdigits, model=CNN8)
    Trainer(s, tmp_path / "stopped", progress=False).run(stop_after=0)
    assert ck.task_path(tmp_path / "stopped", 0).is_file() and not ck.task_path(tmp_path / "stopped", 1).exists()
    Trainer(s, tmp_path / "stopped", progress=False).run(resume=True)
    Trainer(s, tmp_path / "whole", progress=False).run()
    resumed, whole = (ck.TaskCheckpoint.load(ck.task_path(tmp_path / r, 1)) for r in ("stopped", "whole"))
    assert all(torch.equal(resumed.model[k], whole.model[k]) for k in whole.model)


def test_a_store_of_a_former_preset_spec_is_prepared_again_and_its_runs_are_refused(tiny_avdigits, tmp_path, monkeypatch,
                                                                                     capsys):
    """The cpu preset's spec changed (8 -> 16 kHz): an avdigits store prepared with the former
    spec is prepared again before a run trains on it, and a run trained on the former inputs is neither
    resumed nor re-read by cign-experiment (its weights do not fit the new inputs)."""
    import dataclasses

    from cign_runtime import spec as spec_module
    from cign_train.data.ingest import ensure_avdigits, prepare_dataset, store_dir
    from cign_train.data.store import PreparedStore
    from cign_train.experiments import finished

    root = tmp_path / "data" / "avdigits"
    root.mkdir(parents=True)
    for entry in ("clips", "avdigits.json", "avdigits.csv"):  # the tiny clips, without generating them again
        (root / entry).symlink_to(tiny_avdigits / "avdigits" / entry)
    now = spec_module.get_preset("cpu")
    former = dataclasses.replace(now, sample_rate=8000, n_fft=256, win_length=256, hop_length=80)
    store = store_dir(tmp_path / "data", "avdigits", "cpu")
    s = tiny_settings(tmp_path / "data")
    with monkeypatch.context() as m:  # the run and its store, made while the preset was the former one
        m.setitem(spec_module.PRESETS, "cpu", former)
        prepare_dataset("avdigits", tmp_path / "data", preset="cpu", progress=False)
        Trainer(s, tmp_path / "old", progress=False).run()
        assert PreparedStore(store).spec == former and finished(tmp_path / "old", s)
    capsys.readouterr()
    ensure_avdigits(tmp_path / "data", "cpu", progress=False)  # what cign-train and cign-experiment do before training
    assert "prepared with another 'cpu' spec than the preset's now; preparing it again" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"task_1\.pt: trained on another preprocessing spec .*sample_rate 8000 -> 16000"):
        Trainer(s, tmp_path / "old", progress=False).run(resume=True)
    assert PreparedStore(store).spec == now
    with pytest.raises(ValueError, match="trained on another preprocessing spec"):
        finished(tmp_path / "old", s)
    Trainer(s, tmp_path / "new", progress=False).run()  # a new run trains on the store prepared again
    assert finished(tmp_path / "new", s)
    with monkeypatch.context() as m:  # cign-prepare rebuilds avdigits of another spec too (others ask for --overwrite)
        m.setitem(spec_module.PRESETS, "cpu", former)
        prepare_dataset("avdigits", tmp_path / "data", preset="cpu", progress=False)
        assert PreparedStore(store).spec == former


def test_fresh_run_into_a_run_killed_in_its_first_task_is_refused(tiny_avdigits, tmp_path, monkeypatch):
    """A killed first task leaves only config.json and last.pt; a new run there must not pick last.pt up."""
    s = tiny_settings(tiny_avdigits, epochs=3)
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(s.to_dict(), indent=1))
    killed = Trainer(s, run, progress=False)
    model = killed.build_model(len(killed.plan.task_classes[0]))
    optimizer = torch.optim.Adam(model.parameters(), lr=s.lr)
    scheduler = task_scheduler(optimizer, "constant", 3, s.warmup)
    method = get_method(s.method)(model, s.model)
    killed.save_last(0, 1, model, method, optimizer, torch.amp.GradScaler("cuda", enabled=False), scheduler,
                     StepGuard(model, redo=False))  # epoch 1 of 3
    state = (run / "last.pt").read_bytes()
    config = (run / "config.json").read_text()

    def no_restore(*args, **kwargs):
        raise AssertionError("a fresh run restored last.pt")

    monkeypatch.setattr(Trainer, "restore_last", no_restore)
    with pytest.raises(FileExistsError, match="holds a run already; pass --resume or pick another --out"):
        Trainer(tiny_settings(tiny_avdigits, epochs=3, lr=2e-3), run, progress=False).run()
    assert (run / "last.pt").read_bytes() == state and (run / "config.json").read_text() == config
    assert not any(run.glob("task_*.pt"))


#: A run started with many options away from their defaults (avdigits's default preset is cpu).
CLI_RUN = ("--tasks", "2", "--epochs", "1", "--batch-size", "8", "--lr", "1e-3", "--max-per-class", "4",
           "--buffer-per-class", "2", "--workers", "0", "--dim", "32", "--depth", "1", "--heads", "4", "--seed", "3",
           "--class-order", "seeded", "--rehearsal-sampling", "uniform", "--no-augment", "--no-avcg", "--no-progress",
           "--encoder-lr", "5e-4", "--visual-encoder-lr", "2e-4")


@pytest.fixture(scope="module")
def cli_run(tiny_avdigits, tmp_path_factory):
    """A finished two-task cign-train run with the options of ``CLI_RUN``."""
    run = tmp_path_factory.mktemp("cli") / "run"
    done = CliRunner().invoke(train_main, ["--data-dir", str(tiny_avdigits), *CLI_RUN, "--out", str(run)])
    assert done.exit_code == 0, done.output
    return run


def test_resume_takes_the_settings_of_config_json(cli_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(cli_run, run)
    (run / "task_1.pt").unlink()  # as if killed after the first task
    resumed = CliRunner().invoke(train_main, ["--out", str(run), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming {run} at task 2, epoch 1/1 (task 1 done)" in resumed.output
    assert "task 1/2 classes" not in resumed.output and "task 2/2 classes" in resumed.output
    assert json.loads((run / "metrics.json").read_text()) == json.loads((cli_run / "metrics.json").read_text())
    assert json.loads((run / "config.json").read_text()) == json.loads((cli_run / "config.json").read_text())
    saved = json.loads((cli_run / "config.json").read_text())  # --encoder-lr sets both, --visual-encoder-lr overrides
    assert (saved["audio_encoder_lr"], saved["visual_encoder_lr"]) == (5e-4, 2e-4)


def test_resume_refuses_an_option_that_contradicts_config_json(cli_run):
    before = {p.name: p.stat().st_mtime_ns for p in cli_run.iterdir()}
    refused = CliRunner().invoke(train_main, ["--out", str(cli_run), "--resume", "--lr", "2e-3"])
    assert refused.exit_code == 2
    assert "--lr contradicts the run" in refused.output and "lr = 0.001" in refused.output and "gives 0.002" in refused.output
    refused = CliRunner().invoke(train_main, ["--out", str(cli_run), "--resume", "--augment"])
    assert refused.exit_code == 2 and "--augment contradicts the run" in refused.output
    refused = CliRunner().invoke(train_main, ["--out", str(cli_run), "--resume", "--encoder-lr", "5e-4"])
    assert refused.exit_code == 2 and "--encoder-lr contradicts the run" in refused.output
    assert "audio_encoder_lr, visual_encoder_lr = (0.0005, 0.0002)" in refused.output
    assert {p.name: p.stat().st_mtime_ns for p in cli_run.iterdir()} == before


def test_resume_accepts_options_that_repeat_config_json(cli_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(cli_run, run)
    same = ["--lr", "0.001", "--tasks", "2", "--seed", "3", "--no-augment", "--no-avcg", "--dim", "32", "--preset", "cpu",
            "--encoder-lr", "5e-4", "--visual-encoder-lr", "2e-4"]  # the rates as the run was started
    resumed = CliRunner().invoke(train_main, ["--out", str(run), "--resume", *same, "--workers", "1", "--no-progress"])
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming {run}: all 2 tasks are done already" in resumed.output
    assert json.loads((run / "metrics.json").read_text()) == json.loads((cli_run / "metrics.json").read_text())


def test_reuse_reports_a_finished_run_of_the_same_settings_and_refuses_one_of_others(cli_run, tiny_avdigits, tmp_path):
    """make demo's second run: ``--reuse`` with the command line that made the run reports it without training;
    another setting is refused naming it; an empty --out trains; a run cut after its first task is continued."""
    run = tmp_path / "run"
    shutil.copytree(cli_run, run)
    before = {p.name: p.read_bytes() for p in run.glob("*.pt")}
    args = ["--data-dir", str(tiny_avdigits), *CLI_RUN, "--out", str(run), "--reuse"]
    again = CliRunner().invoke(train_main, args)
    assert again.exit_code == 0, again.output
    assert f"resuming {run}: all 2 tasks are done already; reporting its results, not training again" in again.output
    assert "forget(AV-CIL)" in again.output and "task 1/2 classes" not in again.output
    assert {p.name: p.read_bytes() for p in run.glob("*.pt")} == before
    other = CliRunner().invoke(train_main, [*args, "--lr", "2e-3"])
    assert other.exit_code == 1 and f"{run} holds a run with other settings (lr: 0.001 -> 0.002, saved -> given)" in other.output
    assert "--resume" in other.output and {p.name: p.read_bytes() for p in run.glob("*.pt")} == before
    (run / "task_1.pt").unlink()  # cut after the first task: continued with the same settings
    cut = CliRunner().invoke(train_main, args)
    assert cut.exit_code == 0, cut.output
    assert "task 1/2 classes" not in cut.output and "task 2/2 classes" in cut.output
    assert json.loads((run / "metrics.json").read_text()) == json.loads((cli_run / "metrics.json").read_text())
    fresh = CliRunner().invoke(train_main, [*args[:-2], str(tmp_path / "fresh"), "--reuse"])
    assert fresh.exit_code == 0 and "task 1/2 classes" in fresh.output
    both = CliRunner().invoke(train_main, [*args, "--resume"])
    assert both.exit_code == 2 and "--resume and --reuse contradict each other" in both.output


def _cli(data_dir, out, *extra):
    """A two-task run of 3 epochs x 2 steps per task, on a warm-up + cosine schedule (its position must resume too)."""
    return [sys.executable, "-m", "cign_train.cli.train", "--data-dir", str(data_dir), "--tasks", "2",
            "--epochs", "3", "--batch-size", "8", "--max-per-class", "4", "--buffer-per-class", "2",
            "--workers", "0", "--dim", "32", "--depth", "1", "--heads", "4", "--lr", "1e-3", "--lr-schedule", "cosine",
            "--warmup", "0.34", "--out", str(out), "--no-progress", *extra]


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
    on_disk = ck.load(run / "last.pt")
    assert on_disk["task"] == 1
    epochs_done = on_disk["epochs_done"]
    first = run / "task_0.pt"
    first_bytes, first_mtime = first.read_bytes(), first.stat().st_mtime_ns

    resumed = subprocess.run(_cli(tiny_avdigits, run, "--resume"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # It continued where the killed run stopped: the first task and the saved epochs are not trained again.
    assert f"resuming {run} at task 2, " in resumed.stdout
    assert f"(task 1 and {epochs_done} epoch(s) of task 2 done)" in resumed.stdout
    assert "task 1/2 classes" not in resumed.stdout and "task 2/2 classes" in resumed.stdout
    assert first.read_bytes() == first_bytes and first.stat().st_mtime_ns == first_mtime
    assert json.loads((run / "metrics.json").read_text()) == json.loads((tmp_path / "whole" / "metrics.json").read_text())
    a = torch.load(run / "task_1.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "whole" / "task_1.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The TensorBoard curves too: what the killed run logged past its last saved epoch is purged.
    whole_tb, resumed_tb = scalars(tmp_path / "whole"), scalars(run)
    assert whole_tb.keys() == resumed_tb.keys() and {"loss/total", "loss/bce", "accuracy_seen/audio_visual"} <= whole_tb.keys()
    # Each task restarts the schedule: task 1 has 3 batches x 3 epochs (5 classes x 4 clips), task 2
    # 4 x 3 (20 clips + 10 exemplars); 34 % of them warm up linearly to 1e-3, the rest anneal.
    lr = [v for _, v in whole_tb["lr"]]
    first, second = lr[:9], lr[9:]
    assert len(second) == 12
    assert first[:3] == [0.00033, 0.00067, 0.001] and second[:4] == [0.00025, 0.0005, 0.00075, 0.001]
    for task, warm in ((first, 3), (second, 4)):
        annealing = task[warm - 1:]
        assert all(a > b for a, b in zip(annealing[1:], annealing[2:])) and 0 < task[-1] < 1e-4
    for tag in whole_tb:
        assert resumed_tb[tag] == whole_tb[tag], tag
    # and steps.jsonl: each step once, the interrupted epoch's records replaced by the resumed ones
    assert steplog(run) == steplog(tmp_path / "whole")


def steplog(run) -> list[dict]:
    """steps.jsonl's records, values rounded as ``scalars`` rounds them."""
    return [{k: round(v, 5) if isinstance(v, float) else v for k, v in json.loads(line).items()}
            for line in (run / "steps.jsonl").read_text().splitlines()]


def scalars(run) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of a run's TensorBoard events as (step, value), as TensorBoard shows it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    return {tag: [(e.step, round(e.value, 5)) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_logs_every_loss_per_step_and_accuracy_per_task(tiny_run):
    tb = scalars(tiny_run)
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    steps = torch.load(tiny_run / "task_1.pt", weights_only=True)["evaluation"]["global_step"]
    for term in ("total", "bce", "kl", "ce", "ctl"):
        assert [s for s, _ in tb[f"loss/{term}"]] == list(range(steps)), term
    # eq 9's diagnostics: only on steps of the second task whose batch holds old and new classes
    first_task_steps = torch.load(tiny_run / "task_0.pt", weights_only=True)["evaluation"]["global_step"]
    for stat in ("cos_pos", "cos_neg", "p_pos", "own_slot"):
        for m in "av":
            series = tb[f"diag/ctl_{stat}_{m}"]
            assert series and all(first_task_steps <= step < steps for step, _ in series)
            assert all((0 <= v <= 1) if stat in ("p_pos", "own_slot") else (-1 <= v <= 1) for _, v in series)
    assert not [tag for tag in tb if tag.startswith("loss/diag")]
    # each term's gradient norm on the shared body over BCE's, on the first step of every epoch
    second = steps - first_task_steps  # two epochs a task (tiny_run)
    epoch_starts = [0, first_task_steps // 2, first_task_steps, first_task_steps + second // 2]
    assert [step for step, _ in tb["diag/grad_ratio_ce"]] == epoch_starts
    assert all(v > 0 for _, v in tb["diag/grad_ratio_ce"])  # on the contextualised tokens: reaches the body
    assert all(first_task_steps <= step and v > 0 for step, v in tb["diag/grad_ratio_ctl"])
    assert all(first_task_steps <= step and v > 0 for step, v in tb["diag/grad_ratio_kl"])
    # task end: teacher-student cosine of g_i on the buffer's exemplars, after the second task only
    for m in "av":
        (task, cosine), = tb[f"diag/teacher_student_cos_{m}"]
        assert task == 1 and -1 <= cosine < 0.99999  # the student has moved away from the teacher
    # the same per-step values in steps.jsonl, and a task-end record per task
    records = steplog(tiny_run)
    per_step = [r for r in records if "event" not in r]
    assert [r["global_step"] for r in per_step] == list(range(steps))
    for term in ("total", "bce", "kl", "ce", "ctl"):
        assert [(r["global_step"], r[term]) for r in per_step] == tb[f"loss/{term}"], term
    assert [(r["global_step"], r["diag/ctl_p_pos_a"]) for r in per_step if "diag/ctl_p_pos_a" in r] == tb["diag/ctl_p_pos_a"]
    ends = [r for r in records if r.get("event") == "task_end"]
    assert [(r["task"], r["global_step"]) for r in ends] == [(0, first_task_steps), (1, steps)]
    assert ends[1]["diag/teacher_student_cos_a"] == tb["diag/teacher_student_cos_a"][0][1]
    first_step = next(r for r in per_step if r["task"] == 1)
    assert (first_step["epoch"], first_step["step"]) == (0, 0) and first_step["kl"] > 0  # eq 8's KL at once
    for m in ("audio", "visual", "audio_visual"):
        assert [v for _, v in tb[f"accuracy_seen/{m}"]] == [round(x, 5) for x in metrics["seen_accuracy"][m]]
        assert [v for _, v in tb[f"accuracy_task0/{m}"]] == [round(r[0], 5) for r in metrics["accuracy_matrix"][m]]


class PoisonedTrainer(Trainer):
    """The trainer whose model's ``head_a.weight`` gets a NaN gradient on the backward calls in ``poisoned``
    (0-based), as oneDNN's bf16 weight-gradient gave one while the loss stayed finite."""

    poisoned: frozenset[int] = frozenset()

    def build_model(self, n_classes):
        model = super().build_model(n_classes)
        calls = []

        def hook(grad):
            calls.append(len(calls))
            return torch.full_like(grad, float("nan")) if calls[-1] in self.poisoned else grad

        model.head_a.weight.register_hook(hook)
        return model


@pytest.mark.parametrize("amp,action", [("bf16", "fp32"), ("off", "skipped")])
def test_a_non_finite_gradient_is_never_applied_and_the_run_says_so(tiny_avdigits, tmp_path, capsys, amp, action):
    """The third step's gradient is NaN: under bf16 it is redone in fp32 (the fourth backward is clean),
    in fp32 it is skipped; either way the weights stay finite and steps.jsonl, the task line and
    metrics.json report it."""
    trainer = PoisonedTrainer(tiny_settings(tiny_avdigits, amp=amp, model=CNN8), tmp_path / amp, progress=False)
    trainer.poisoned = frozenset({2})
    metrics = trainer.run()
    records = [json.loads(line) for line in (tmp_path / amp / "steps.jsonl").read_text().splitlines()]
    guarded = [r for r in records if "guard" in r]
    assert [(r["task"], r["global_step"], r["guard"]) for r in guarded] == [(0, 2, action)]
    assert ("diag/grad_norm" in guarded[0]) == (action == "fp32")  # the norm of what was applied
    steps = [r for r in records if "event" not in r]
    assert all(r["diag/grad_norm"] > 0 for r in steps if "guard" not in r)
    ends = [r for r in records if r.get("event") == "task_end"]
    assert [(r[f"guard_{action}"], r["guard_fp32"] + r["guard_skipped"]) for r in ends] == [(1, 1), (0, 0)]
    assert metrics["guarded_steps"] == {"fp32": [1 if action == "fp32" else 0, 0], "skipped": [1 if action == "skipped" else 0, 0]}
    assert json.loads((tmp_path / amp / "metrics.json").read_text())["guarded_steps"] == metrics["guarded_steps"]
    said = "1 step(s) redone in fp32, 0 skipped" if action == "fp32" else "0 step(s) redone in fp32, 1 skipped"
    assert f"non-finite gradient: {said}" in capsys.readouterr().out
    for t in (0, 1):  # loading checks every tensor is finite
        ck.TaskCheckpoint.load(ck.task_path(tmp_path / amp, t))


def test_bf16_training_on_tasks_that_leave_one_clip_over_repeats_with_finite_weights(tiny_avdigits, tmp_path):
    """oneDNN's bf16 weight-gradient failed at batches of one clip on some CPUs: tasks of 25 and 35 clips at
    batch 8 leave 1 and 3 over; they join the batch before, and two runs give identical, finite weights."""
    from cign_train.precision import cpu_has_native_bf16

    if not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16 (AVX512-BF16 or AMX): --amp auto trains in fp32 here, "
                    "and oneDNN's bf16 kernels do not run")
    s = tiny_settings(tiny_avdigits, amp="auto", max_per_class=5, model=CNN8)  # 5 classes x 5 clips, then + 5 x 2 exemplars
    runs = [tmp_path / "a", tmp_path / "b"]
    metrics = [Trainer(s, run, progress=False).run() for run in runs]
    assert metrics[0] == metrics[1]
    for run in runs:
        records = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
        clips = [[r["clips"] for r in records if "event" not in r and r["task"] == t] for t in (0, 1)]
        assert clips == [[8, 8, 9], [8, 8, 8, 11]]
        assert all("guard" not in r for r in records)
    a, b = (ck.TaskCheckpoint.load(ck.task_path(run, 1)).model for run in runs)  # loads only finite weights
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_non_finite_batchnorm_statistic_is_never_written(tiny_avdigits, tmp_path):
    STATISTIC = "audio_encoder.backbone.1.1.running_var"
    class BrokenStatistic(Trainer):
        def build_model(self, n_classes):
            model = super().build_model(n_classes)
            dict(model.named_buffers())[STATISTIC][3] = float("nan")  # training mode never reads it
            return model

    with pytest.raises(ck.NonFiniteCheckpoint, match=r"last.pt not written after epoch 1 of task 1: non-finite values "
                                                     rf"in model.{STATISTIC} \(1 of 32 entries\)"):
        BrokenStatistic(tiny_settings(tiny_avdigits, model=CNN8), tmp_path / "r", progress=False).run()
    assert not list((tmp_path / "r").glob("*.pt"))


def test_a_cpu_run_says_how_long_it_will_take_after_its_first_steps(tiny_avdigits, tmp_path, capsys):
    """25 clips at batch 4 make 6 steps in the first task, 9 in the second (35 with the buffer): after the
    first step and three timed ones, 11 are left."""
    Trainer(tiny_settings(tiny_avdigits, batch_size=4, max_per_class=5, model=CNN8), tmp_path / "r", progress=False).run()
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("on the CPU: ")]
    assert len(said) == 1 and "s a step over the first 3; this run's 11 steps left take " in said[0]
    assert "--preset cpu" not in said[0]  # the cpu preset's own spec
    steps = [json.loads(line) for line in (tmp_path / "r" / "steps.jsonl").read_text().splitlines()]
    assert sum("event" not in r for r in steps) == 4 + 11


def test_the_paper_preset_on_a_cpu_points_to_the_cpu_preset():
    from cign_train.settings import preset_settings
    from cign_train.trainer import cpu_estimate

    paper = cpu_estimate(preset_settings("paper"), steps_left=7_000, seconds_per_step=2.0)
    assert "7000 steps left take 3.9 h of training or more" in paper
    assert "made for GPUs (--device cuda): on a CPU, --preset cpu" in paper
    assert "--preset cpu" not in cpu_estimate(preset_settings("cpu"), steps_left=1_000, seconds_per_step=0.2)
