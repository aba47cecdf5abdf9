"""cign-experiment: run naming shared across experiments, a sweep that trains each run once and
resumes an interrupted one, the tables' numbers, the figures (real runs on a tiny avdigits store)."""
from __future__ import annotations

import json
import statistics

import matplotlib.image
import numpy as np
import pytest
from click.testing import CliRunner

from cign_train import checkpoint as ck
from cign_train.cli.experiment import main as experiment_main
from cign_train.config import CIGNConfig
from cign_train.experiments import (EXPERIMENTS, Experiment, Row, Sweep, class_silhouette, collect, first_task_features,
                                    run_experiment, write_results)
from cign_train.settings import PRESETS

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_PRESET = dict(spec="cpu", tasks=2, epochs=1, batch_size=8, lr=1e-3, max_per_class=4, buffer_per_class=2, workers=0,
                   model=CIGNConfig(encoder="cnn8", dim=32, depth=1, heads=4))
ROWS = (Row("finetune", "Fine-tuning", "finetune"), Row("cign", "CIGN"),
        Row("buffer1", "CIGN, 1 per class", settings={"buffer_per_class": 1}))


@pytest.fixture
def sweep(tiny_avdigits, tmp_path, monkeypatch) -> Sweep:
    monkeypatch.setitem(PRESETS, "tiny", TINY_PRESET)
    return Sweep("avdigits", None, str(tiny_avdigits), "tiny", (0, 1), tmp_path / "runs")


def test_rows_with_equal_settings_share_one_run_across_experiments(tiny_avdigits):
    s = Sweep(data_dir=str(tiny_avdigits))
    by_path: dict = {}
    for e in EXPERIMENTS.values():
        for r in e.rows:
            if s.applies(r):
                by_path.setdefault(s.path(r, 0), set()).add(f"{e.name}/{r.key}")
    shared = {frozenset(keys) for keys in by_path.values() if len(keys) > 1}
    assert shared == {
        frozenset({"methods/cign", "ablation/both", "readings/cign", "scales/cign", "scarce/cign-b50", "compare/cign",
                   "depth/depth1", "tasks/cign-5", "buffer/buffer50", "tsne/cign"}),
        frozenset({"ablation/replay", "readings/replay", "scarce/replay-b50", "compare/replay"}),
        frozenset({"methods/il2m", "scarce/il2m-b50", "compare/il2m"}),
        frozenset({"ablation/literal", "readings/literal"}),
        frozenset({"buffer/buffer10", "scarce/cign-b10"}), frozenset({"buffer/buffer20", "scarce/cign-b20"}),
        frozenset({"tasks/cign-10", "scarce/cign-t10"}),
        frozenset({"methods/finetune", "ablation/finetune", "tasks/finetune-5"}),
        frozenset({"methods/joint", "ablation/joint"}),
        *(frozenset({f"methods/{m}", f"tsne/{m}"}) for m in ("lwf", "bic", "l2p")),
    }
    names = {k: p.name for p, keys in by_path.items() for k in keys}
    assert names["methods/cign"] == "cign-seed0" and names["depth/depth3"] == "cign+depth=3-seed0"
    assert names["tasks/cign-10"] == "cign+tasks=10-seed0" and names["buffer/buffer10"] == "cign+buffer_per_class=10-seed0"


def test_a_csv_store_is_swept_at_the_task_count_given_and_rows_keep_their_own(tiny_avdigits, tmp_path):
    from cign_train.cli.prepare import main as prepare_main

    clips = tiny_avdigits / "avdigits" / "clips"
    rows = [line.split(",") for line in (tiny_avdigits / "avdigits" / "avdigits.csv").read_text().splitlines()]
    index = tmp_path / "mine.csv"
    index.write_text("file,label,split\n" + "".join(f"{clips / f'{r[0]}_{int(r[1]):06d}.mp4'},{r[2]},{r[3]}\n" for r in rows))
    prepared = CliRunner().invoke(prepare_main, ["--dataset", "csv", "--index", str(index), "--name", "mine", "--preset",
                                                 "cpu", "--data-dir", str(tmp_path / "data"), "--workers", "1"])
    assert prepared.exit_code == 0, prepared.output
    s = Sweep("csv", "mine", str(tmp_path / "data"), "cpu", (0,), tmp_path / "runs", {}, tasks=5)
    scarce = {r.key: r for r in EXPERIMENTS["scarce"].rows}
    assert s.path(scarce["cign-b50"], 0) == tmp_path / "runs" / "mine-cpu" / "cign-seed0"
    assert s.path(scarce["cign-t10"], 0).name == "cign+tasks=10-seed0"
    assert s.settings(scarce["cign-b50"], 0).tasks == 5 and s.settings(scarce["cign-t10"], 0).tasks == 10
    refused = CliRunner().invoke(experiment_main, ["compare", "--dataset", "csv", "--name", "mine", "--data-dir",
                                                   str(tmp_path / "data"), "--no-train"])
    assert refused.exit_code == 2 and "--dataset csv needs --name (the store cign-prepare wrote) and --tasks N" in refused.output


def test_a_task_count_that_does_not_divide_the_classes_is_skipped_with_a_message(tiny_avdigits):
    said = []
    assert not Sweep(data_dir=str(tiny_avdigits)).applies(Row("x", "x", settings={"tasks": 4}), said.append)
    assert "10 classes do not split into 4 equal tasks" in said[0]


def test_a_sweep_trains_each_run_once_resumes_an_interrupted_one_and_tabulates_every_seed(sweep, tmp_path):
    exp = Experiment("tiny", "tiny sweep", ROWS, figure="buffer")
    run_experiment(exp, sweep, keys=["finetune"])
    assert all(ck.last_finished_task(sweep.path(ROWS[0], s)) == 1 for s in (0, 1))
    assert not sweep.path(ROWS[1], 0).exists()
    assert list(collect(exp, sweep)) == ["finetune"]  # unfinished rows are left out of the tables

    run_experiment(exp, sweep, keys=["cign"])
    done = sweep.path(ROWS[0], 0)
    finished_stamp = {p.name: p.stat().st_mtime_ns for p in done.glob("task_*.pt")}
    cut = sweep.path(ROWS[1], 1)  # a run killed after its first task: its second checkpoint is missing
    first_task = ck.task_path(cut, 0).read_bytes()
    ck.task_path(cut, 1).unlink()
    (cut / "metrics.json").unlink()

    log = []
    run_experiment(exp, sweep, log=log.append)
    assert {p.name: p.stat().st_mtime_ns for p in done.glob("task_*.pt")} == finished_stamp  # not retrained
    assert ck.task_path(cut, 0).read_bytes() == first_task  # resumed after task 0, not restarted
    assert ck.last_finished_task(cut) == 1
    trained = [line.split(" trained")[0] for line in log]
    assert trained == ["tiny: buffer1 seed 0", "tiny: cign seed 1", "tiny: buffer1 seed 1"]

    table = collect(exp, sweep)
    assert list(table) == ["finetune", "cign", "buffer1"]
    for key, row in zip(table, ROWS):
        runs = [json.loads((sweep.path(row, s) / "metrics.json").read_text()) for s in (0, 1)]
        values = [r["average_accuracy_l2p"]["audio_visual"] for r in runs]
        mean, std = table[key]["summary"]["val"]["audio_visual"]["average_accuracy_l2p"]
        assert mean == pytest.approx(statistics.fmean(values)) and std == pytest.approx(statistics.stdev(values))
        test = json.loads((sweep.path(row, 0) / "metrics_test.json").read_text())
        assert test["eval_split"] == "test" and table[key]["runs"][0]["metrics"]["test"] == test
    out = tmp_path / "results"
    written = write_results(exp, sweep, table, out, {"cpu": "test"}, "test cpu")
    md = (out / "experiment_tiny_avdigits.md").read_text()
    assert "| CIGN, 1 per class |" in md and "Audio-Visual Forgetting" in md and "### val split" in md
    fig = matplotlib.image.imread(out / "experiment_tiny_avdigits.png")
    assert fig.shape[0] > 100 and fig.std() > 0
    assert sorted(p.name for p in written) == ["experiment_tiny_avdigits.json", "experiment_tiny_avdigits.md",
                                               "experiment_tiny_avdigits.png"]


def test_tsne_reads_the_first_tasks_test_clips_from_the_last_model_and_scores_each_panel(sweep, tmp_path):
    rows = (Row("finetune", "Fine-tuning", "finetune"), Row("cign", "CIGN"))
    exp = Experiment("tsne_tiny", "t-SNE", rows, figure="tsne")
    sweep.seeds = (0,)
    run_experiment(exp, sweep)
    settings, path = sweep.settings(rows[1], 0), sweep.path(rows[1], 0)
    feats, labels = first_task_features(settings, path)
    first = ck.TaskCheckpoint.load(ck.task_path(path, 0)).classes_per_task[0]
    assert sorted(set(labels.tolist())) == list(range(first))  # only the first task's classes
    assert len(labels) == 3 * first  # tiny_avdigits: 3 test clips per class
    assert feats.shape == (len(labels), 2 * 32) and np.allclose(np.linalg.norm(feats[:, :32], axis=1), 1, atol=1e-4)
    write_results(exp, sweep, collect(exp, sweep), tmp_path, {}, "test cpu")
    doc = json.loads((tmp_path / "experiment_tsne_tiny_avdigits.json").read_text())
    assert set(doc["silhouette"]) == {"Fine-tuning", "CIGN"}
    assert doc["silhouette"]["CIGN"]["per_seed"] == {"0": pytest.approx(class_silhouette(feats, labels))}
    assert all(-1 <= v["mean"] <= 1 for v in doc["silhouette"].values())
    assert matplotlib.image.imread(tmp_path / "experiment_tsne_tiny_avdigits.png").std() > 0


def test_cli_refuses_a_row_the_experiment_does_not_have(tmp_path):
    result = CliRunner().invoke(experiment_main, ["depth", "--rows", "depth3,depth5", "--runs", str(tmp_path)])
    assert result.exit_code != 0 and "['depth5'] are not rows of depth" in result.output
