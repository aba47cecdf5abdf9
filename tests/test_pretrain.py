"""cign-pretrain on real avdigits clips: the contrastive loss falls, the checkpoint loads into cign-train."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from cign_train.config import CIGNConfig
from cign_train.data.ingest import store_dir
from cign_train.data.store import PreparedStore
from cign_train.model import CIGN, load_encoder_weights
from cign_train.augment import Augment
from cign_train.data.loader import batch_loader
from cign_train.pretrain import (Correspondence, PretrainSettings, batch_loss, infonce, nt_xent, pretrain, similarity,
                                 sinkhorn, swapped_prediction)
from cign_train.settings import TrainSettings
from cign_train.trainer import Trainer


def test_infonce_by_hand():
    a = torch.eye(3)
    loss, acc = infonce(a, a, tau=1.0)  # each row's own pair scores 1, the others 0
    expected = -torch.log(torch.tensor(torch.e / (torch.e + 2)))
    assert torch.isclose(loss, expected) and acc == 1.0
    loss, acc = infonce(a, a.roll(1, dims=0), tau=1.0)
    assert loss > expected and acc == 0.0


def test_nt_xent_by_hand():
    z = torch.eye(3)  # three clips whose two views agree; each view's other 4 embeddings score 0
    expected = -torch.log(torch.tensor(torch.e / (torch.e + 4)))
    assert torch.isclose(nt_xent(z, z.clone(), tau=1.0), expected)
    assert nt_xent(z, z.roll(1, dims=0), tau=1.0) > expected + 1  # the second views swapped between clips


def test_the_localised_similarity_is_the_best_locations():
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    v = torch.nn.functional.normalize(torch.randn(4, 5, 8), dim=2)  # 4 frames, 5 locations each
    v[2, 3] = a[1]  # audio 1 appears at location 3 of frame 2
    sim = similarity(a, v)
    assert sim.shape == (4, 4) and torch.isclose(sim[1, 2], torch.tensor(1.0))
    assert torch.allclose(sim, torch.stack([torch.stack([(v[j] @ a[i]).max() for j in range(4)]) for i in range(4)]))
    assert torch.allclose(similarity(a, v[:, 0]), a @ v[:, 0].T)  # pooled frames: the plain cosine


def test_sinkhorn_codes_are_balanced_and_follow_the_scores():
    torch.manual_seed(0)
    scores = torch.randn(12, 4).mul(0.3).softmax(1)  # 12 clips, 4 prototypes, unbalanced preferences
    scores[:, 0] += 0.5  # every clip prefers prototype 0
    q = sinkhorn(scores)
    assert torch.allclose(q.sum(1), torch.ones(12), atol=1e-5)  # a distribution per clip
    assert torch.allclose(q.sum(0), torch.full((4,), 3.0), atol=0.2)  # each prototype gets ~B / K of the mass
    assert q[:, 0].sum() < 3.5  # the argmax alone would put all 12 clips on prototype 0
    separable = torch.eye(4).repeat(3, 1)  # clips already in 4 balanced groups: the codes keep them
    assert (sinkhorn(separable).argmax(1) == torch.arange(4).repeat(3)).all()


def test_swapped_prediction_is_lowest_when_the_modalities_agree():
    torch.manual_seed(0)
    prototypes = torch.nn.Linear(8, 4, bias=False)
    groups = torch.nn.functional.normalize(prototypes.weight.detach(), dim=1)  # embeddings on the prototypes
    a = groups.repeat(4, 1)  # 16 clips, 4 per prototype
    agree = swapped_prediction(a, a.clone(), prototypes, tau=0.1)
    disagree = swapped_prediction(a, a.roll(1, dims=0), prototypes, tau=0.1)  # visual of another group
    assert agree < disagree
    assert torch.allclose(prototypes.weight.norm(dim=1), torch.ones(4))  # prototypes kept on the unit sphere


def test_pretraining_lowers_the_loss_and_its_checkpoint_loads_into_cign_train(tiny_avdigits, tmp_path):
    store = PreparedStore(store_dir(tiny_avdigits, "avdigits", "cpu"))
    out = tmp_path / "encoders.pt"
    settings = PretrainSettings(epochs=6, batch_size=8, lr=1e-3, seed=0, encoder="cnn8")  # the cpu preset's
    history = pretrain(store, settings, out, progress=False)
    assert len(history["train_loss"]) == 6
    # 60 training clips, 7 steps an epoch: the loss leaves chance (ln 8 = 2.08) and falls
    assert history["train_loss"][-1] < history["train_loss"][0] - 0.2, history["train_loss"]
    # the val diagnostics (labels read for evaluation only): one val clip per class, batches of 8 and 2, so
    # a batch holds one clip of each class and the chance of a class hit is 1 / batch size
    assert history["val_class_chance"] == [pytest.approx((1 / 8 + 1 / 2) / 2)] * 6
    assert all(0 <= x <= 1 for key in ("val_class_retrieval", "val_nmi_audio", "val_nmi_visual") for x in history[key])

    model = CIGN(CIGNConfig(encoder="cnn8", dim=32, depth=1, heads=4), 5)
    report = load_encoder_weights(model, out)
    assert report.layout == "audio/visual" and report.n_audio > 0 and report.n_visual > 0
    saved = torch.load(out, weights_only=True)
    for key, value in saved["visual"].items():
        assert torch.equal(model.visual_encoder.backbone.state_dict()[key], value), key
    assert saved["pretrain"]["settings"]["epochs"] == 6 and saved["pretrain"]["history"] == history

    run = tmp_path / "run"
    s = TrainSettings(dataset="avdigits", data_dir=str(tiny_avdigits), spec="cpu", tasks=2, epochs=1, batch_size=8,
                      max_per_class=2, buffer_per_class=1, workers=0, encoder_weights=str(out),
                      model=CIGNConfig(encoder="cnn8", dim=32, depth=1, heads=4))
    Trainer(s, run, progress=False).run()
    # the run started from the pretrained trunk: one epoch on 20 clips moves it, but it stays near it
    first = torch.load(run / "task_0.pt", weights_only=True)["model"]
    fresh = Correspondence(CIGNConfig(encoder="cnn8")).visual.state_dict()
    key = "10.0.weight"  # cnn8's last convolution
    near = (first[f"visual_encoder.backbone.{key}"] - saved["visual"][key]).norm()
    far = (fresh[key] - saved["visual"][key]).norm()
    assert near < 0.1 * far


@pytest.mark.parametrize("cross", [0.0, 1.0])
def test_simclr_lowers_its_loss_and_loads(tiny_avdigits, tmp_path, cross):
    store = PreparedStore(store_dir(tiny_avdigits, "avdigits", "cpu"))
    out = tmp_path / "encoders.pt"
    settings = PretrainSettings(epochs=5, batch_size=8, lr=1e-3, objective="simclr", cross=cross, tau=0.2, seed=0,
                                encoder="cnn8")
    history = pretrain(store, settings, out, progress=False)
    assert history["train_loss"][-1] < history["train_loss"][0] - 0.2, history["train_loss"]
    assert all(0 <= x <= 1 for key in ("val_class_retrieval", "val_nmi_audio", "val_nmi_visual") for x in history[key])
    report = load_encoder_weights(CIGN(CIGNConfig(encoder="cnn8", dim=32, depth=1, heads=4), 5), out)
    assert report.n_audio > 0 and report.n_visual > 0


def test_the_localised_objective_fits_real_clips_and_its_checkpoint_loads(tiny_avdigits, tmp_path):
    """ezvsl on one batch of 8 real clips (no augmentation): 30 steps take it from chance (ln 8) to
    matching every audio with its own frame; a pretraining epoch writes encoders cign-train loads."""
    store = PreparedStore(store_dir(tiny_avdigits, "avdigits", "cpu"))
    settings = PretrainSettings(objective="ezvsl", tau=0.07, encoder="cnn8")
    batch = next(iter(batch_loader(store, store.indices("train")[:8], 8, shuffle=False, workers=0, seed=0)))
    torch.manual_seed(0)
    model = Correspondence(CIGNConfig(encoder="cnn8"), locations=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = batch_loss(model, store, batch, settings, torch.device("cpu"), Augment(store.spec), None)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[0] > 1.5 and losses[-1] < 0.3, losses
    out = tmp_path / "encoders.pt"
    pretrain(store, dataclasses.replace(settings, epochs=1, batch_size=8), out, progress=False)
    report = load_encoder_weights(CIGN(CIGNConfig(encoder="cnn8", dim=32, depth=1, heads=4), 5), out)
    assert report.n_audio > 0 and report.n_visual > 0


def test_unknown_objective_is_refused():
    with pytest.raises(ValueError, match="unknown pretraining objective 'byol'"):
        PretrainSettings(objective="byol")


def test_cli_writes_the_default_checkpoint_beside_the_store(tiny_avdigits, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cign_train.cli.pretrain", "--data-dir", str(tiny_avdigits),
                           "--epochs", "1", "--batch-size", "8", "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tiny_avdigits / "avdigits" / "pretrained" / "cpu-seed0.pt"
    assert out.is_file() and f"cign-train --encoder-weights {out}" in proc.stdout
    out.unlink()
    missing = subprocess.run([sys.executable, "-m", "cign_train.cli.pretrain", "--dataset", "csv"],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "--dataset csv needs --name" in missing.stderr
