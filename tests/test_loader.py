"""The batch loader over a real prepared store: batches, seeded order, class-balanced draws."""
import numpy as np
import pytest

from cign_train.data.loader import batch_loader, batches_per_epoch, folded_sizes
from cign_train.data.store import PreparedStore


@pytest.fixture(scope="module")
def store(tiny_avdigits):
    return PreparedStore(tiny_avdigits / "avdigits" / "prepared" / "cpu")


def drawn(loader) -> np.ndarray:
    return np.concatenate([b.index.numpy() for b in loader])


def test_batches_carry_the_rows_of_their_samples(store):
    idx = store.indices("train")[:10]
    batches = list(batch_loader(store, idx, 4, shuffle=False, workers=0))
    assert [len(b.labels) for b in batches] == [4, 4, 2]
    b = batches[1]
    assert np.array_equal(b.frames.numpy(), store.frames(idx[4:8]))
    assert np.array_equal(b.spectrograms.numpy(), store.spectrograms(idx[4:8]))
    assert np.array_equal(b.labels.numpy(), store.labels[idx[4:8]])


def test_weighted_draws_balance_a_rare_class(store):
    train = store.indices("train")
    common = train[store.labels[train] == 0]  # 6 clips of class 0
    rare = train[store.labels[train] == 1][:1]  # 1 clip of class 1, as a buffer would hold
    idx = np.concatenate([np.repeat(common, 20), rare])  # 121 entries, 1 of class 1
    labels = store.labels[idx]
    weights = 1.0 / np.bincount(labels)[labels]
    counts = np.zeros(2)
    for epoch in range(10):
        got = drawn(batch_loader(store, idx, 16, shuffle=True, workers=0, seed=epoch, weights=weights))
        assert len(got) == len(idx)  # an epoch keeps its length
        counts += np.bincount(store.labels[got], minlength=2)[:2]
    assert 0.4 < counts[1] / counts.sum() < 0.6  # uniform draws would give 1 / 121
    again = drawn(batch_loader(store, idx, 16, shuffle=True, workers=0, seed=9, weights=weights))
    assert np.array_equal(again, got)  # seeded
    ranks = [drawn(batch_loader(store, idx, 16, shuffle=True, workers=0, seed=9, weights=weights, rank=r, world=2))
             for r in range(2)]
    assert [len(r) for r in ranks] == [61, 61] and not np.array_equal(ranks[0], ranks[1])
    with pytest.raises(ValueError, match="2 weights for 121 indices"):
        batch_loader(store, idx, 16, shuffle=True, workers=0, weights=weights[:2])


@pytest.mark.parametrize("n,batch,world", [(10, 4, 1), (121, 16, 1), (121, 16, 2), (8, 8, 3), (25, 8, 1), (369, 16, 1),
                                           (33, 16, 2), (129, 128, 1)])
def test_batches_per_epoch_is_the_loaders_length(store, n, batch, world):
    """The lr schedule's length is the number of batches the training loader (last="fold") really yields."""
    idx = store.indices("train")[np.arange(n) % len(store.indices("train"))]
    weights = np.ones(n)
    for w in (None, weights):
        for rank in range(world):
            loader = batch_loader(store, idx, batch, shuffle=True, workers=0, rank=rank, world=world, weights=w,
                                  last="fold")
            assert len(loader) == sum(1 for _ in loader) == batches_per_epoch(n, batch, world)


def test_a_training_epoch_never_steps_on_a_few_clips_and_keeps_every_clip(store):
    """369 clips at batch 16 leave one clip over: it joins the batch before (17), it is not a step of its own."""
    assert folded_sizes(369, 16) == [16] * 22 + [17]
    assert folded_sizes(25, 8) == [8, 8, 9] and folded_sizes(28, 8) == [8, 8, 8, 4]  # 4 = half a batch: kept
    assert folded_sizes(135, 128) == [135] and folded_sizes(136, 128) == [128, 8]  # 8 clips make a batch
    assert folded_sizes(5, 16) == [5] and folded_sizes(0, 16) == []
    train = store.indices("train")
    idx = train[np.arange(25) % len(train)]
    for weights in (None, np.ones(25)):
        batches = list(batch_loader(store, idx, 8, shuffle=True, workers=0, seed=3, weights=weights, last="fold"))
        assert [len(b.labels) for b in batches] == [8, 8, 9]
        if weights is None:  # without replacement: every clip once
            assert sorted(np.concatenate([b.index.numpy() for b in batches])) == sorted(idx)
    assert [len(b.labels) for b in batch_loader(store, idx, 8, shuffle=True, workers=0, last="keep")] == [8, 8, 8, 1]
    assert [len(b.labels) for b in batch_loader(store, idx, 8, shuffle=True, workers=0, last="drop")] == [8, 8, 8]
    with pytest.raises(ValueError, match="last must be one of"):
        batch_loader(store, idx, 8, shuffle=True, workers=0, last="pad")
