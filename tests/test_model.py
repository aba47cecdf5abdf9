"""CIGN model: shapes, growing the class tokens, hard assignment, encoder weight loading, determinism."""
from __future__ import annotations

import pytest
import torch
from torchvision.models import resnet18

from cign_runtime.spec import get_preset
from cign_train.config import CIGNConfig
from cign_train.losses import token_independence
from cign_train.model import CIGN, CIGNOutput, load_encoder_weights, predict
from cign_train.model.encoders import ResNet18Trunk
from cign_train.model.grouping import Grouping
from cign_train.model.transformer import ModalityTransformer

TINY = CIGNConfig(dim=32, depth=1, heads=4)


def tiny_batch(b: int = 2, side: int = 64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 33, 40, generator=g), torch.randn(b, 3, side, side, generator=g)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return CIGN(TINY, n_classes=3)


def test_tiny_shapes(tiny_model):
    spec, frames = tiny_batch()
    out = tiny_model(spec, frames)
    assert isinstance(out, CIGNOutput)
    assert out.logits_a.shape == out.logits_v.shape == (2, 3)
    assert out.g_a.shape == out.g_v.shape == (2, 3, 32)
    assert tiny_model.audio_encoder(spec).shape == (2, 32)
    assert tiny_model.visual_encoder(frames).shape == (2, 4, 32)  # 64 px -> 2 x 2 locations
    assert tiny_model.token_logits().shape == (3, 3)
    p = predict(out)
    torch.testing.assert_close(p.p_av, torch.sigmoid(out.logits_a) * torch.sigmoid(out.logits_v))


def test_paper_shapes():
    torch.manual_seed(0)
    model = CIGN(CIGNConfig(dim=512, depth=3, heads=8), n_classes=10).eval()
    seen = {}
    model.visual_encoder.register_forward_hook(lambda m, i, o: seen.update(f_v=o.shape))
    with torch.no_grad():
        out = model(torch.randn(1, 257, 300), torch.randn(1, 3, 224, 224))
    assert seen["f_v"] == (1, 49, 512)  # P = 7 x 7 at 224 px
    assert out.logits_a.shape == out.logits_v.shape == (1, 10)
    assert out.g_a.shape == out.g_v.shape == (1, 10, 512)


def test_grow_keeps_old_rows_and_trains_new_tokens():
    torch.manual_seed(0)
    model = CIGN(TINY, n_classes=3)
    tokens = model.tokens.detach().clone()
    w, b = model.token_cls.weight.detach().clone(), model.token_cls.bias.detach().clone()
    model.grow(2)
    assert model.n_classes == 5
    assert model.tokens.shape == (5, 32) and model.token_cls.weight.shape == (5, 32)
    assert torch.equal(model.tokens[:3], tokens)
    assert torch.equal(model.token_cls.weight[:3], w) and torch.equal(model.token_cls.bias[:3], b)
    assert model.tokens[3:].abs().sum() > 0
    assert any(p is model.tokens for p in model.parameters())
    out = model(*tiny_batch())
    assert out.logits_a.shape == (2, 5) and out.g_v.shape == (2, 5, 32)

    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    new_before = model.tokens[3:].detach().clone()
    token_independence(model.token_logits(), new_classes=[3, 4]).backward()
    opt.step()
    assert not torch.equal(model.tokens[3:], new_before)
    assert torch.equal(model.tokens[:3], tokens)


def test_grow_follows_device_and_dtype():
    model = CIGN(TINY, n_classes=2).to(device="meta", dtype=torch.float64)
    model.grow(3)
    for p in (model.tokens, model.token_cls.weight, model.token_cls.bias):
        assert p.device.type == "meta" and p.dtype == torch.float64
    assert model.token_logits().shape == (5, 5)


def test_hard_assignment_is_one_hot_in_eval_and_straight_through_in_training():
    torch.manual_seed(0)
    group = Grouping(CIGNConfig(dim=32, depth=1, heads=4, assign="hard"))
    f_hat, c_hat = torch.randn(2, 6, 32), torch.randn(2, 4, 32)

    group.eval()
    g, a = group(f_hat, c_hat)
    assert torch.all((a == 0) | (a == 1)) and torch.all(a.sum(-1) == 1)
    empty = a.sum(1) == 0  # (B, K) classes no location chose contribute nothing
    assert empty.any()
    torch.testing.assert_close(g[empty], c_hat[empty])

    group.train()
    g, a = group(f_hat, c_hat)
    torch.testing.assert_close(a.detach(), a.detach().round())
    assert torch.all(a.detach().sum(-1).sub(1).abs() < 1e-5)
    g.square().sum().backward()
    assert group.w_q.weight.grad.abs().sum() > 0 and group.w_k.weight.grad.abs().sum() > 0
    assert torch.isfinite(group.w_q.weight.grad).all()


def test_soft_audio_grouping_reduces_to_value_projection():
    torch.manual_seed(0)
    group = Grouping(TINY)
    f_hat, c_hat = torch.randn(2, 1, 32), torch.randn(2, 4, 32)  # P = 1
    g, a = group(f_hat, c_hat)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 1))
    expected = c_hat + group.w_o(group.w_v(f_hat))  # eq 7 for audio, broadcast over classes
    torch.testing.assert_close(g, expected, atol=1e-3, rtol=1e-3)


def test_eval_is_deterministic():
    torch.manual_seed(0)
    model = CIGN(CIGNConfig(dim=32, depth=1, heads=4, assign="hard", dropout=0.1), n_classes=3).eval()
    spec, frames = tiny_batch()
    with torch.no_grad():
        first, second = model(spec, frames), model(spec, frames)
    for x, y in zip(first, second):
        assert torch.equal(x, y)


def backbone_equal(net, sd, skip=()):
    """Every tensor of the backbone equals the checkpoint's, except the keys in `skip`."""
    own = {k: v for k, v in net.state_dict().items() if k not in skip}
    return all(torch.equal(v, sd[k]) for k, v in own.items() if k in sd) and all(
        k in sd for k in own if not k.endswith("num_batches_tracked"))


def test_load_torchvision_state_dict(tmp_path, tiny_model):
    torch.manual_seed(123)
    sd = resnet18().state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(sd, path)
    report = load_encoder_weights(tiny_model, path)
    assert report.layout == "torchvision" and report.n_visual == report.n_audio == len(sd) - 2
    assert backbone_equal(tiny_model.visual_encoder.backbone, sd)
    audio = tiny_model.audio_encoder.backbone.state_dict()
    assert torch.equal(audio["conv1.weight"], sd["conv1.weight"].mean(dim=1, keepdim=True))
    assert backbone_equal(tiny_model.audio_encoder.backbone, sd, skip=("conv1.weight",))


def test_load_audnet_imgnet_checkpoint(tmp_path, tiny_model):
    torch.manual_seed(7)
    aud, img = ResNet18Trunk(1).state_dict(), ResNet18Trunk(3).state_dict()
    state = {f"module.audnet.{k}": v for k, v in aud.items()}
    state |= {f"module.imgnet.{k}": v for k, v in img.items()}
    state["module.img_proj.weight"] = torch.zeros(4, 4)
    path = tmp_path / "ezvsl.pth"
    torch.save({"model": state, "epoch": 3}, path)
    report = load_encoder_weights(tiny_model, path)
    assert report.layout == "audnet/imgnet" and "img_proj.weight" in report.ignored
    assert backbone_equal(tiny_model.audio_encoder.backbone, aud)
    assert backbone_equal(tiny_model.visual_encoder.backbone, img)



def test_load_audio_visual_checkpoint(tmp_path, tiny_model):
    torch.manual_seed(8)
    aud, img = ResNet18Trunk(1).state_dict(), ResNet18Trunk(3).state_dict()
    path = tmp_path / "av.pth"
    torch.save({"audio": aud, "visual": {f"module.{k}": v for k, v in img.items()}}, path)
    assert load_encoder_weights(tiny_model, path).layout == "audio/visual"
    assert backbone_equal(tiny_model.audio_encoder.backbone, aud)
    assert backbone_equal(tiny_model.visual_encoder.backbone, img)


def test_bad_checkpoints_raise_naming_the_file(tmp_path, tiny_model):
    sd = resnet18().state_dict()
    cases = {
        "unknown.pth": {"encoder.weight": torch.zeros(3)},
        "missing.pth": {k: v for k, v in sd.items() if k != "layer2.0.bn1.weight"},
        "shape.pth": sd | {"layer3.0.conv1.weight": torch.zeros(1)},
        "deeper.pth": sd | {"layer1.2.conv1.weight": sd["layer1.1.conv1.weight"]},
        "list.pth": [torch.zeros(1)],
    }
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    for name in [*cases, "garbage.pth"]:
        with pytest.raises(ValueError, match=name):
            load_encoder_weights(tiny_model, tmp_path / name)
    with pytest.raises(ValueError, match="layer2.0.bn1.weight"):
        load_encoder_weights(tiny_model, tmp_path / "missing.pth")


def test_cnn8_encoders_keep_the_cpu_preset_resolution():
    """cnn8 (the cpu preset's backbone): 64 px frames -> 8 x 8 locations, the spectrogram's first conv strides 2."""
    torch.manual_seed(0)
    model = CIGN(CIGNConfig(encoder="cnn8", dim=32, depth=1, heads=4), n_classes=3).eval()
    spec, frames = torch.randn(2, *get_preset("cpu").spectrogram_shape), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(spec, frames)
        assert model.visual_encoder(frames).shape == (2, 64, 32)
        assert model.audio_encoder.backbone(spec.unsqueeze(1)).shape == (2, 256, 2, 19)  # 32x301 /16, rounded up
    assert out.logits_a.shape == out.logits_v.shape == (2, 3)


def test_visual_stride_2_halves_the_visual_map_and_is_refused_for_resnet18():
    """visual_stride 2 strides cnn8's first visual conv: 64 px frames -> 4 x 4 locations (P = 16), the
    audio branch unchanged; ResNet18's stem strides already, so the option is refused there."""
    torch.manual_seed(0)
    model = CIGN(CIGNConfig(encoder="cnn8", dim=32, depth=1, heads=4, visual_stride=2), n_classes=3).eval()
    spec, frames = torch.randn(2, *get_preset("cpu").spectrogram_shape), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(spec, frames)
        assert model.visual_encoder(frames).shape == (2, 16, 32)
        assert model.audio_encoder.backbone(spec.unsqueeze(1)).shape == (2, 256, 2, 19)
    assert out.logits_v.shape == (2, 3) and torch.isfinite(out.logits_v).all()
    with pytest.raises(ValueError, match="visual_stride"):
        CIGNConfig(encoder="resnet18", visual_stride=2)
    with pytest.raises(ValueError, match="visual_stride"):
        CIGNConfig(encoder="cnn8", visual_stride=3)


def test_resnet18_weights_do_not_load_into_cnn8(tmp_path):
    """A torchvision checkpoint names the keys cnn8 lacks instead of loading partly."""
    path = tmp_path / "resnet18.pth"
    torch.save(resnet18().state_dict(), path)
    model = CIGN(CIGNConfig(encoder="cnn8", dim=32, depth=1, heads=4), n_classes=3)
    with pytest.raises(ValueError, match=r"resnet18.pth \(audio\): missing backbone keys"):
        load_encoder_weights(model, path)
    with pytest.raises(ValueError, match="encoder must be one of"):
        CIGNConfig(encoder="resnet50")


def test_audio_pool_time_max_mean_is_max_plus_mean_over_time_of_the_frequency_mean():
    """cfg.audio_pool: f_a = proj(max_t + mean_t of the frequency-averaged map), not proj(mean of the map)."""
    torch.manual_seed(0)
    cfg = CIGNConfig(encoder="cnn8", dim=32, depth=1, heads=4, audio_pool="time_max_mean")
    model = CIGN(cfg, n_classes=3).eval()
    spec = torch.randn(2, *get_preset("cpu").spectrogram_shape)
    with torch.no_grad():
        fmap = model.audio_encoder.backbone(spec.unsqueeze(1))  # (2, 256, 2, 19)
        by_time = fmap.mean(dim=2)
        proj = model.audio_encoder.proj
        torch.testing.assert_close(model.audio_encoder(spec), proj(by_time.amax(dim=2) + by_time.mean(dim=2)))
        model.audio_encoder.pool = "mean"
        torch.testing.assert_close(model.audio_encoder(spec), proj(fmap.mean(dim=(2, 3))))
    with pytest.raises(ValueError, match="audio_pool must be one of"):
        CIGNConfig(audio_pool="max")


CNN8 = CIGNConfig(encoder="cnn8", dim=32, depth=1, heads=4)


def unprompted(phi: ModalityTransformer, feats: torch.Tensor, tokens: torch.Tensor):
    """phi as it was before prompts: layers over [features; class tokens], LayerNorm, split."""
    n = feats.shape[1]
    x = torch.cat([feats, tokens], dim=1)
    for layer in phi.layers:
        x = layer(x)
    x = phi.norm(x)
    return x[:, :n], x[:, n:]


@pytest.mark.parametrize("train", [True, False])
def test_without_prompts_phi_and_the_model_compute_exactly_as_before(train):
    """prompts None (every method but L2P / DualPrompt, and the export) is bit-identical to the unprompted phi."""
    torch.manual_seed(0)
    model = CIGN(CNN8, n_classes=3).train(train)
    g = torch.Generator().manual_seed(1)
    spec, frames = torch.randn(2, 32, 40, generator=g), torch.randn(2, 3, 64, 64, generator=g)
    feats, tokens = torch.randn(2, 4, 32, generator=g), torch.randn(2, 3, 32, generator=g)
    with torch.set_grad_enabled(train):
        for got, want in zip(model.phi_v(feats, tokens, None), unprompted(model.phi_v, feats, tokens)):
            assert torch.equal(got, want)
        if not train:  # eval: the BatchNorm statistics of the first call do not move
            plain = model(spec, frames)
            passed = model(spec, frames, None, prompts_a=None, prompts_v=None)
            for x, y in zip(plain, passed):
                assert torch.equal(x, y)


def test_prompts_enter_their_layer_and_their_outputs_are_dropped():
    torch.manual_seed(0)
    phi = ModalityTransformer(CIGNConfig(encoder="cnn8", dim=32, depth=2, heads=4)).eval()
    g = torch.Generator().manual_seed(1)
    feats, tokens = torch.randn(2, 4, 32, generator=g), torch.randn(2, 3, 32, generator=g)
    p0, p1 = torch.randn(2, 5, 32, generator=g), torch.randn(2, 7, 32, generator=g)
    f_hat, c_hat = phi(feats, tokens, {0: p0, 1: p1})
    assert f_hat.shape == (2, 4, 32) and c_hat.shape == (2, 3, 32)
    x = phi.layers[0](torch.cat([p0, feats, tokens], dim=1))  # p0 enters layer 0 ...
    x = phi.norm(phi.layers[1](torch.cat([p1, x], dim=1)))  # ... and p1 layer 1, after p0's outputs
    torch.testing.assert_close(f_hat, x[:, 12:16])
    torch.testing.assert_close(c_hat, x[:, 16:])
    plain_f, plain_c = phi(feats, tokens)
    assert not torch.allclose(f_hat, plain_f, atol=1e-3) and not torch.allclose(c_hat, plain_c, atol=1e-3)
    only_1 = phi(feats, tokens, {1: p1})
    torch.testing.assert_close(only_1[1], phi.norm(phi.layers[1](torch.cat([p1, phi.layers[0](
        torch.cat([feats, tokens], dim=1))], dim=1)))[:, 11:])


def test_the_export_graph_is_unchanged_by_the_prompt_arguments(monkeypatch):
    """cign_export calls model(spectrograms, frames, tokens) positionally (ExportGraph.forward): the
    torch.export program (the ONNX exporter's input, tokens as a dynamic input) records the same ops
    as with the unprompted phi, and computes the same outputs."""
    from cign_export.graph import ExportGraph
    from cign_export.onnx_format import example_inputs

    torch.manual_seed(0)
    graph = ExportGraph(CIGN(CNN8, n_classes=3), get_preset("cpu"), tokens_as_input=True)
    args = example_inputs(graph)
    batch, classes = torch.export.Dim("batch", min=1), torch.export.Dim("classes", min=1)

    def program():
        ep = torch.export.export(graph, args, dynamic_shapes=({0: batch}, {0: batch}, {0: classes}))
        return [str(n.target) for n in ep.graph.nodes if n.op == "call_function"], ep.module()(*args)

    def former(phi, feats, tokens, prompts):
        assert prompts is None
        return unprompted(phi, feats, tokens)

    ops, outputs = program()
    monkeypatch.setattr(ModalityTransformer, "forward", former)
    before_ops, before_outputs = program()
    assert ops == before_ops and ops.count("aten.cat.default") == 2
    for x, y in zip(outputs, before_outputs):
        assert torch.equal(x, y)
