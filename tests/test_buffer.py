"""Rehearsal buffer: per-class quota, seeded random choice, iCaRL herding and the checkpoint round trip."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cign_train.buffer import RehearsalBuffer


def _task(classes, per_class, start=0):
    """Store indices start.. and labels for ``per_class`` samples of each class, interleaved."""
    labels = np.tile(np.asarray(classes), per_class)
    return np.arange(start, start + len(labels)), labels


def test_random_keeps_the_quota_per_class():
    buf = RehearsalBuffer(per_class=5)
    indices, labels = _task([0, 1, 2], 20)
    keep = (labels != 2) | (indices < 9)  # class 2 keeps only its samples 2, 5 and 8
    buf.update(indices[keep], labels[keep])
    assert buf.classes.tolist() == [0, 1, 2]
    assert np.bincount(buf.labels).tolist() == [5, 5, 3]  # class 2 had only 3 samples: all kept
    assert len(buf) == 13 and buf.indices.dtype == np.int64 and buf.labels.dtype == np.int64
    assert np.all(np.diff(buf.labels) >= 0)
    for cls in range(3):  # every kept index belongs to its class, no repeats
        kept = buf.indices[buf.labels == cls]
        assert np.all(labels[kept] == cls) and len(set(kept.tolist())) == len(kept)
    assert sorted(buf.indices[buf.labels == 2].tolist()) == [2, 5, 8]


def test_random_is_seeded_and_ignores_input_order():
    indices, labels = _task([3, 4], 30)
    a, b, c = RehearsalBuffer(4, seed=1), RehearsalBuffer(4, seed=1), RehearsalBuffer(4, seed=2)
    order = np.random.default_rng(0).permutation(len(indices))
    a.update(indices, labels)
    b.update(indices[order], labels[order])
    c.update(indices, labels)
    assert np.array_equal(a.indices, b.indices)
    assert not np.array_equal(a.indices, c.indices)


def test_later_tasks_add_classes_and_replace_only_repeated_ones():
    buf = RehearsalBuffer(2)
    buf.update(*_task([0, 1], 10))
    old = buf.indices[buf.labels == 0].copy()
    buf.update(np.array([100, 101, 102]), np.array([1, 1, 2]))
    assert buf.classes.tolist() == [0, 1, 2]
    assert np.array_equal(buf.indices[buf.labels == 0], old)
    assert set(buf.indices[buf.labels == 1].tolist()) <= {100, 101, 102}
    assert buf.indices[buf.labels == 2].tolist() == [102]


def test_herding_balances_the_class_mean():
    # Normalised, the features are unit vectors at 0, +60, -60 and 180 degrees; their mean is
    # (0.25, 0). The 0-degree point is nearest to it (0.75 against 0.90 and 1.25). The second
    # point should then bring the mean of two to (0.25, 0), i.e. lie near (-0.5, 0): the
    # 180-degree point (0.5 away) beats +-60 degrees (1.32 away), although it is the farthest
    # from the mean on its own. The lengths 2 and 5 matter only if features are not normalised
    # (then the raw mean is (-0.5, 0) and a 60-degree point would come first).
    s = np.sqrt(3) / 2
    features = np.array([[0.5, s], [-5.0, 0.0], [2.0, 0.0], [0.5, -s]])
    indices = np.array([40, 43, 41, 42])
    buf = RehearsalBuffer(2, select="herding")
    buf.update(indices, np.zeros(4, dtype=np.int64), features)
    assert buf.indices.tolist() == [41, 43]  # in selection order


def test_herding_with_fewer_samples_keeps_all_and_separates_classes():
    features = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    buf = RehearsalBuffer(5, select="herding")
    buf.update(np.array([7, 8, 9]), np.array([1, 0, 1]), features)
    assert buf.labels.tolist() == [0, 1, 1]
    assert buf.indices[0] == 8 and sorted(buf.indices[1:].tolist()) == [7, 9]


def test_herding_needs_features():
    with pytest.raises(ValueError, match="feature"):
        RehearsalBuffer(2, select="herding").update(np.arange(4), np.zeros(4))


def test_unknown_selection_lists_the_valid_ones():
    with pytest.raises(ValueError, match="random, herding"):
        RehearsalBuffer(2, select="reservoir")


def test_state_dict_round_trip(tmp_path):
    buf = RehearsalBuffer(3, select="herding", seed=7)
    indices, labels = _task([0, 5, 2], 6)
    buf.update(indices, labels, np.random.default_rng(0).normal(size=(len(indices), 4)))
    state = buf.state_dict()
    assert json.loads(json.dumps(state)) == state
    torch.save(state, tmp_path / "buf.pt")
    restored = RehearsalBuffer(1)
    restored.load_state_dict(torch.load(tmp_path / "buf.pt", weights_only=True))
    assert (restored.per_class, restored.select, restored.seed) == (3, "herding", 7)
    assert np.array_equal(restored.indices, buf.indices) and np.array_equal(restored.labels, buf.labels)
    assert restored.indices.dtype == np.int64 and restored.state_dict() == state
