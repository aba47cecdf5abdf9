"""Continual-learning metrics on a hand-computed 3-task matrix, the seen-accuracy helper and the heat map."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from matplotlib.image import imread

from cign_train import metrics

NAN = math.nan
# After task 1, task 0 rises from 90 to 95 (backward transfer), so its best earlier accuracy at
# step 2 is 95, not the diagonal 90.
A = [[90, NAN, NAN],
     [95, 80, NAN],
     [60, 60, 85]]
SEEN = [90, 85, 70]


def test_forgetting_avcil_by_hand():
    # step 1: task 0: 90 - 95 = -5                          -> -5
    # step 2: task 0: max(90, 95) - 60 = 35; task 1: 80 - 60 = 20 -> 27.5
    # mean over steps 1, 2: (-5 + 27.5) / 2 = 11.25
    assert metrics.forgetting_avcil(A) == pytest.approx(11.25)


def test_forgetting_facil_by_hand():
    # last step only: (35 + 20) / 2
    assert metrics.forgetting_facil(A) == pytest.approx(27.5)


# As A, but task 1 gains at the last step (80 -> 85): FACIL's drop from its best *earlier* accuracy
# is negative there, L2P's max over all steps (the last included) clips it to 0.
B = [[90, NAN, NAN],
     [95, 80, NAN],
     [60, 85, 85]]


def test_forgetting_facil_and_l2p_differ_on_backward_transfer_at_the_last_step():
    # FACIL: task 0 max(90, 95) - 60 = 35; task 1: 80 - 85 = -5   -> 15
    # L2P:   task 0 max(90, 95, 60) - 60 = 35; task 1: max(80, 85) - 85 = 0 -> 17.5
    assert metrics.forgetting_facil(B) == pytest.approx(15.0)
    assert metrics.forgetting_l2p(B) == pytest.approx(17.5)
    assert metrics.forgetting_l2p(A) == pytest.approx(27.5)


def test_accuracies_by_hand():
    assert metrics.average_accuracy(SEEN) == pytest.approx((90 + 85 + 70) / 3)
    assert metrics.final_accuracy(SEEN) == 70
    # L2P: per-task accuracies after the last task, not seen-class accuracies over steps
    assert metrics.average_accuracy_l2p(A) == pytest.approx((60 + 60 + 85) / 3)
    assert metrics.average_accuracy_l2p(B) == pytest.approx((60 + 85 + 85) / 3)


def test_units_do_not_matter_and_rows_may_end_at_the_diagonal():
    ragged = [[0.90], [0.95, 0.80], [0.60, 0.60, 0.85]]
    assert metrics.forgetting_avcil(ragged) == pytest.approx(0.1125)
    assert metrics.forgetting_facil(np.array(A) / 100) == pytest.approx(0.275)
    assert metrics.forgetting_l2p(ragged) == pytest.approx(0.275)


def test_single_task_has_no_forgetting():
    assert math.isnan(metrics.forgetting_avcil([[80.0]]))
    assert math.isnan(metrics.forgetting_facil([[80.0]]))
    assert math.isnan(metrics.forgetting_l2p([[80.0]]))


def test_missing_entry_below_the_diagonal_is_an_error():
    with pytest.raises(ValueError, match="row 1"):
        metrics.forgetting_facil([[90, NAN], [NAN, 80]])


def test_seen_accuracy_weights_tasks_by_test_size():
    # task 0: 90/100 right, task 1: 10/50 right -> 100/150, not the task mean (0.9 + 0.2) / 2
    assert metrics.seen_accuracy([90, 10], [100, 50]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        metrics.seen_accuracy([1], [0])


def test_summarize_is_json_ready():
    out = metrics.summarize({"audio": A, "visual": [[50.0]]}, {"audio": SEEN, "visual": [50.0]})
    assert out["audio"] == {"average_accuracy": pytest.approx(245 / 3), "average_accuracy_l2p": pytest.approx(205 / 3),
                            "final_accuracy": 70.0, "diagonal": [A[0][0], A[1][1], A[2][2]],
                            "forgetting": {"avcil": pytest.approx(11.25), "facil": pytest.approx(27.5),
                                           "l2p": pytest.approx(27.5)}}
    assert out["visual"]["forgetting"] == {"avcil": None, "facil": None, "l2p": None}
    json.dumps(out, allow_nan=False)
    with pytest.raises(ValueError, match="modalities differ"):
        metrics.summarize({"audio": A}, {"visual": SEEN})


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "acc.png"
    mats = {m: np.array(A) / 100 for m in ("audio", "visual", "audio_visual")}
    assert metrics.plot_accuracy_matrix(mats, path) == path
    assert path.stat().st_size > 1000 and not (tmp_path / "acc.png.tmp").exists()
    image = imread(path)
    height, width = image.shape[:2]
    assert image.ndim == 3 and 100 < height < width < 2000  # three panels side by side


def test_a_modality_that_falls_to_chance_after_a_task_is_named():
    """The NaN-weights case: audio and audio-visual at 9.7 % of 10 classes after 90 % of 8; visual, never
    learned past twice chance, is not said to collapse, nor is a drop that stays well above chance."""
    seen = {"audio": [95.0, 88.0, 9.7], "visual": [60.0, 20.0, 12.0], "audio_visual": [97.0, 90.0, 9.7]}
    warnings = metrics.collapses(seen, [2, 8, 10])
    assert warnings == [
        "audio seen-class accuracy collapsed to chance after task 3: 9.7 % (chance 10.0 % of 10 classes), from 88.0 % after task 2",
        "audio_visual seen-class accuracy collapsed to chance after task 3: 9.7 % (chance 10.0 % of 10 classes), from 90.0 % after task 2",
    ]
    assert metrics.collapses({"audio": [95.0, 60.0, 16.0]}, [2, 8, 10]) == []  # 1.6x chance: a drop, not chance
    assert metrics.collapses({"audio": [95.0]}, [2]) == []
