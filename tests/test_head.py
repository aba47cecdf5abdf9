"""The numpy post-encoder part (cign_runtime.head) against torch on a trained model: logits and the token gradient."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cign_export.enrolment import Encoders, encode, save_head
from cign_export.graph import Normalize
from cign_export.parity import load_samples, open_store
from cign_runtime.head import Head, erf
from cign_train import checkpoint as ck

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tiny_run, tmp_path_factory):
    """The tiny run's last task: model, its head.npz opened in numpy, and encoder features of real test clips."""
    saved = ck.TaskCheckpoint.load(ck.task_path(tiny_run, 1))
    model = saved.build_model().eval()
    path = tmp_path_factory.mktemp("head") / "head.npz"
    save_head(model, path)
    samples = load_samples(open_store(saved.settings), saved.classes, "test", limit=12, seed=0)
    f_a, f_v = encode(Encoders(model, Normalize(saved.spec), saved.spec), samples.feeds)
    return model, Head.load(path), f_a, f_v, samples.labels


def torch_loss(model, f_a, f_v, tokens, targets, weights):
    """Eq 10's BCE terms through phi, grouping and heads, as cign_runtime.head.Head.loss_and_grad defines them."""
    n = len(f_a)
    g_a, _ = model.group_a(*model.phi_a(f_a, tokens.expand(n, -1, -1)))
    g_v, _ = model.group_v(*model.phi_v(f_v, tokens.expand(n, -1, -1)))
    z_a, z_v = model.head_a(g_a).squeeze(-1), model.head_v(g_v).squeeze(-1)
    bce = lambda z: F.binary_cross_entropy_with_logits(z, targets, reduction="none")  # noqa: E731
    return (weights[:, None] * (bce(z_a) + bce(z_v))).sum(), z_a, z_v


def test_erf_matches_the_standard_library():
    x = np.linspace(-6, 6, 2001, dtype=np.float32)
    ref = np.array([math.erf(float(v)) for v in x])
    assert np.abs(erf(x.copy()) - ref).max() < 1e-6


def test_logits_and_token_gradient_match_torch_autograd(trained):
    model, head, f_a, f_v, labels = trained
    k = model.n_classes
    new = model.tokens.detach().mean(0, keepdim=True) + 0.1 * torch.randn(1, model.cfg.dim, generator=torch.Generator().manual_seed(0))
    tokens = torch.cat([model.tokens.detach(), new]).requires_grad_(True)  # a grown table (K + 1, D)
    targets = F.one_hot(torch.from_numpy(labels), k + 1).float()
    targets[:3] = F.one_hot(torch.tensor(k), k + 1).float()  # three clips stand in for a new class's shots
    weights = torch.rand(len(labels), generator=torch.Generator().manual_seed(1))
    loss, z_a, z_v = torch_loss(model, torch.from_numpy(f_a), torch.from_numpy(f_v), tokens, targets, weights)
    loss.backward()
    got_loss, grad, na, nv = head.loss_and_grad(f_a, f_v, tokens.detach().numpy(), targets.numpy(), weights.numpy())
    assert got_loss == pytest.approx(loss.item(), rel=1e-5)
    assert np.abs(na - z_a.detach().numpy()).max() < 1e-4 and np.abs(nv - z_v.detach().numpy()).max() < 1e-4
    ref = tokens.grad.numpy()
    assert np.abs(ref).max() > 1e-3  # a gradient that is there to get wrong
    assert np.abs(grad - ref).max() < 1e-5 * max(1.0, np.abs(ref).max())
    assert np.abs(grad[-1] - ref[-1]).max() < 1e-5 * max(1.0, np.abs(ref[-1]).max())  # the new row, which enrolment fits


def test_a_changed_weight_changes_the_gradient(trained, tmp_path):
    """The comparison above can fail: the head must read every weight it is given, here the visual W_k."""
    model, head, f_a, f_v, labels = trained
    tokens = model.tokens.detach().numpy()
    targets = np.eye(len(tokens), dtype=np.float32)[labels]
    weights = np.full(len(labels), 1 / len(labels), np.float32)
    _, grad, _, _ = head.loss_and_grad(f_a, f_v, tokens, targets, weights)
    head.visual.wk = head.visual.wk * 1.5
    _, changed, _, _ = head.loss_and_grad(f_a, f_v, tokens, targets, weights)
    assert np.abs(changed - grad).max() > 1e-4
