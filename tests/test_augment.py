"""Training augmentation on real prepared avdigits samples: label-preserving, per-sample, seeded."""
import numpy as np
import pytest
import torch

from cign_train.augment import Augment
from cign_train.data.store import PreparedStore
from cign_train.preprocess import normalize_spectrogram


@pytest.fixture(scope="module")
def batch(tiny_avdigits):
    store = PreparedStore(tiny_avdigits / "avdigits" / "prepared" / "cpu")
    idx = store.indices("train")[:6]
    frames = torch.from_numpy(store.frames(idx))
    spectrograms = normalize_spectrogram(store.spec, torch.from_numpy(store.spectrograms(idx).astype(np.float32)))
    return store.spec, frames, spectrograms


def test_frames_keep_layout_and_change_per_sample(batch):
    spec, frames, _ = batch
    torch.manual_seed(0)
    out = Augment(spec).frames(frames)
    assert out.shape == frames.shape and out.dtype == torch.uint8
    changed = (out.float() - frames.float()).abs().mean(dim=(1, 2, 3))
    assert torch.all(changed > 1.0)  # every frame got its own crop / jitter
    torch.manual_seed(0)
    assert torch.equal(Augment(spec).frames(frames), out)  # reproducible from torch's seed
    torch.manual_seed(1)
    assert not torch.equal(Augment(spec).frames(frames), out)


def test_spectrograms_are_circular_time_shifts_plus_erasing(batch):
    spec, _, spectrograms = batch
    aug = Augment(spec)
    torch.manual_seed(0)
    out = aug.spectrograms(spectrograms)
    assert out.shape == spectrograms.shape and out.dtype == spectrograms.dtype
    moved = erased = 0
    for x, y in zip(spectrograms, out):
        # every kept value sits where a circular shift by one |k| <= n_time / 4 puts it; erased ones are 0
        fits = [k for k in range(-aug.max_shift, aug.max_shift + 1) if ((torch.roll(x, k, dims=-1) == y) | (y == 0)).all()]
        assert len(fits) == 1, "not a circular time shift"
        shifted = torch.roll(x, fits[0], dims=-1)
        moved += fits[0] != 0
        erased += bool(((y == 0) & (shifted != 0)).any())
    assert moved >= len(out) - 1 and 0 < erased < len(out)
