"""CIGN after its encoders, in numpy: phi_a / phi_v (eqs 1-4), grouping (eqs 5-7) and the heads, with
the gradient of a loss on the heads' logits with respect to the class-token table.

This is what lets a device without torch learn a class (``cign_runtime.enroll``): the encoders'
features of a few shots are computed once by the export's ``encoders`` graph, then a new token row
is fitted by gradient steps through this part alone, which is small next to the encoders (at the
``cpu`` preset, D 256 and one layer). The weights come from the export's ``head.npz``
(``cign_export.head_weights``); ``tests/test_head.py`` checks the forward against the exported ONNX
graph and the gradient against torch autograd on a trained model.

The layers are torch's pre-norm ``nn.TransformerEncoderLayer`` (``cign_train.model.transformer``:
x + MHA(LN1 x), then + W2 GELU(W1 LN2 x), exact-erf GELU, a final LayerNorm) and
``cign_train.model.grouping.Grouping`` with soft assignment. numpy has no erf; :func:`erf` is
Abramowitz and Stegun's 7.1.26 (absolute error <= 1.5e-7, about float32's resolution at 1), which
keeps the forward within 1e-5 of the ONNX graph's.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Keys of ``head.npz`` besides the weights: the JSON of :class:`HeadConfig`.
CONFIG_KEY = "config"
_SQRT2 = np.float32(np.sqrt(2.0))
_INV_SQRT_2PI = np.float32(1.0 / np.sqrt(2.0 * np.pi))
_AS_P = np.float32(0.3275911)
_AS_A = tuple(np.float32(a) for a in (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429))


def erf(x: np.ndarray) -> np.ndarray:
    """erf(x) in float32 with absolute error <= 1.5e-7 (Abramowitz and Stegun 7.1.26), in place where it
    can be: the elementwise work on phi's MLP activations dominates a gradient step."""
    z = np.abs(x)
    t = z * _AS_P
    t += np.float32(1.0)
    np.reciprocal(t, out=t)
    poly = t * _AS_A[-1]
    for a in reversed(_AS_A[:-1]):
        poly += a
        poly *= t
    np.square(z, out=z)
    np.negative(z, out=z)
    np.exp(z, out=z)
    z *= poly  # erfc(|x|)
    np.subtract(np.float32(1.0), z, out=z)
    return np.copysign(z, x, out=z)


def mm(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x (..., A) @ w (A, C) as one 2-D product (numpy runs stacked operands as one GEMM per matrix)."""
    return (x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[-1])


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@dataclass(frozen=True)
class HeadConfig:
    dim: int
    depth: int
    heads: int
    ln_eps: float  # LayerNorm epsilon of phi's layers and final norm
    group_eps: float  # eq 7's guard of the soft assignment's mass (cign_train.model.grouping.EPS)


class LayerNorm:
    def __init__(self, w: np.ndarray, b: np.ndarray, eps: float):
        self.w, self.b, self.eps = w, b, eps

    def forward(self, x):
        mu = x.mean(-1, keepdims=True)
        xc = x - mu
        inv = 1.0 / np.sqrt((xc * xc).mean(-1, keepdims=True) + self.eps)
        xhat = xc * inv
        return xhat * self.w + self.b, (xhat, inv)

    def backward(self, dy, cache):
        xhat, inv = cache
        dxhat = dy * self.w
        return inv * (dxhat - dxhat.mean(-1, keepdims=True) - xhat * (dxhat * xhat).mean(-1, keepdims=True))


class Layer:
    """One pre-norm transformer encoder layer (torch's ``norm_first=True``, GELU, no dropout)."""

    def __init__(self, w: dict[str, np.ndarray], prefix: str, cfg: HeadConfig):
        g = lambda name: w[prefix + name]  # noqa: E731
        self.ln1 = LayerNorm(g("norm1.weight"), g("norm1.bias"), cfg.ln_eps)
        self.ln2 = LayerNorm(g("norm2.weight"), g("norm2.bias"), cfg.ln_eps)
        self.w_in, self.b_in = g("self_attn.in_proj_weight"), g("self_attn.in_proj_bias")  # (3D, D), (3D,)
        self.w_out, self.b_out = g("self_attn.out_proj.weight"), g("self_attn.out_proj.bias")
        self.w1, self.b1 = g("linear1.weight"), g("linear1.bias")  # (M, D)
        self.w2, self.b2 = g("linear2.weight"), g("linear2.bias")  # (D, M)
        self.h = cfg.heads

    def _split(self, x):  # (B, S, D) -> (B, H, S, d)
        b, s, d = x.shape
        return x.reshape(b, s, self.h, d // self.h).transpose(0, 2, 1, 3)

    def forward(self, x):
        b, s, d = x.shape
        h1, c1 = self.ln1.forward(x)
        q, k, v = np.split(mm(h1, self.w_in.T) + self.b_in, 3, axis=-1)
        q, k, v = self._split(q), self._split(k), self._split(v)
        scale = np.float32(1.0 / np.sqrt(d // self.h))
        a = softmax((q @ k.transpose(0, 1, 3, 2)) * scale)  # (B, H, S, S)
        o = (a @ v).transpose(0, 2, 1, 3).reshape(b, s, d)
        x1 = x + mm(o, self.w_out.T) + self.b_out
        h2, c2 = self.ln2.forward(x1)
        u = mm(h2, self.w1.T) + self.b1
        cdf = erf(u / _SQRT2)
        cdf += np.float32(1.0)
        cdf *= np.float32(0.5)
        out = x1 + mm(u * cdf, self.w2.T) + self.b2
        return out, (c1, q, k, v, a, o, scale, c2, h2, u, cdf, h1)

    def backward(self, dy, cache):
        c1, q, k, v, a, o, scale, c2, h2, u, cdf, h1 = cache
        b, s, d = dy.shape
        dgelu = mm(dy, self.w2)
        pdf = np.square(u)
        pdf *= np.float32(-0.5)
        np.exp(pdf, out=pdf)
        pdf *= u
        pdf *= _INV_SQRT_2PI
        pdf += cdf
        du = dgelu * pdf  # GELU'(u) = Phi(u) + u phi(u)
        dx1 = dy + self.ln2.backward(mm(du, self.w1), c2)
        do = self._split(mm(dx1, self.w_out))  # (B, H, S, d)
        da = do @ v.transpose(0, 1, 3, 2)
        dv = a.transpose(0, 1, 3, 2) @ do
        ds = a * (da - (da * a).sum(-1, keepdims=True)) * scale
        dq, dk = ds @ k, ds.transpose(0, 1, 3, 2) @ q
        merge = lambda t: t.transpose(0, 2, 1, 3).reshape(b, s, d)  # noqa: E731
        dqkv = np.concatenate([merge(dq), merge(dk), merge(dv)], axis=-1)
        return dx1 + self.ln1.backward(mm(dqkv, self.w_in), c1)


class Modality:
    """phi (eqs 1-4), grouping (eqs 5-7) and the head of one modality."""

    def __init__(self, w: dict[str, np.ndarray], m: str, cfg: HeadConfig):
        self.layers = [Layer(w, f"phi_{m}.layers.{i}.", cfg) for i in range(cfg.depth)]
        self.norm = LayerNorm(w[f"phi_{m}.norm.weight"], w[f"phi_{m}.norm.bias"], cfg.ln_eps)
        self.wq, self.wk = w[f"group_{m}.w_q.weight"], w[f"group_{m}.w_k.weight"]
        self.wv, self.wo = w[f"group_{m}.w_v.weight"], w[f"group_{m}.w_o.weight"]
        self.head_w, self.head_b = w[f"head_{m}.weight"][0], w[f"head_{m}.bias"][0]
        self.eps, self.scale = np.float32(cfg.group_eps), np.float32(1.0 / np.sqrt(cfg.dim))

    def forward(self, feats, tokens):
        """feats (B, P, D), tokens (K, D) -> logits (B, K) and the cache of backward."""
        n_feats = feats.shape[1]
        x = np.concatenate([feats, np.broadcast_to(tokens, (len(feats), *tokens.shape))], axis=1)
        caches = []
        for layer in self.layers:
            x, c = layer.forward(x)
            caches.append(c)
        y, cn = self.norm.forward(x)
        f_hat, c_hat = y[:, :n_feats], y[:, n_feats:]
        q, k = mm(f_hat, self.wq.T), mm(c_hat, self.wk.T)
        a = softmax((q @ k.transpose(0, 2, 1)) * self.scale)  # eq 6: (B, P, K)
        vv = mm(f_hat, self.wv.T)
        pooled = a.transpose(0, 2, 1) @ vv  # (B, K, D)
        mass = a.sum(1)[..., None] + self.eps
        g = c_hat + mm(pooled / mass, self.wo.T)  # eq 7
        logits = mm(g, self.head_w[:, None])[..., 0] + self.head_b
        return logits, (caches, cn, f_hat, c_hat, q, k, a, vv, pooled, mass, n_feats)

    def backward_tokens(self, dlogits, cache):
        """d loss / d logits (B, K) -> d loss / d tokens (K, D), summed over the batch."""
        caches, cn, f_hat, c_hat, q, k, a, vv, pooled, mass, n_feats = cache
        dg = dlogits[..., None] * self.head_w  # (B, K, D)
        dr = mm(dg, self.wo)
        dpooled = dr / mass
        dmass = -(dr * pooled).sum(-1) / mass[..., 0] ** 2  # (B, K)
        da = vv @ dpooled.transpose(0, 2, 1) + dmass[:, None, :]  # (B, P, K)
        dl = a * (da - (da * a).sum(-1, keepdims=True)) * self.scale
        df_hat = mm(a @ dpooled, self.wv) + mm(dl @ k, self.wq)
        dc_hat = dg + mm(dl.transpose(0, 2, 1) @ q, self.wk)
        dx = self.norm.backward(np.concatenate([df_hat, dc_hat], axis=1), cn)
        for layer, c in zip(reversed(self.layers), reversed(caches)):
            dx = layer.backward(dx, c)
        return dx[:, n_feats:].sum(0)


class Head:
    """The post-encoder part of an exported CIGN (``head.npz``)."""

    def __init__(self, weights: dict[str, np.ndarray], cfg: HeadConfig):
        self.cfg = cfg
        w = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items()}
        self.audio, self.visual = Modality(w, "a", cfg), Modality(w, "v", cfg)

    @classmethod
    def load(cls, path: str | Path) -> "Head":
        with np.load(path) as z:
            cfg = HeadConfig(**json.loads(str(z[CONFIG_KEY])))
            return cls({k: z[k] for k in z.files if k != CONFIG_KEY}, cfg)

    def logits(self, f_a: np.ndarray, f_v: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """f_a (B, 1, D), f_v (B, P, D), tokens (K, D) -> FC(g_a,i), FC(g_v,i), each (B, K)."""
        return self.audio.forward(f_a, tokens)[0], self.visual.forward(f_v, tokens)[0]

    def loss_and_grad(self, f_a, f_v, tokens, targets, weights, loss: str = "bce") -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
        """A loss on the heads' logits and dL/d tokens (K, D), with the logits (B, K) of both modalities.

        ``bce``: L = sum_n w_n sum_i [BCE(FC(g_a,n,i), y_n,i) + BCE(FC(g_v,n,i), y_n,i)], eq 10's
        classification terms weighted per sample. ``ce``: L = sum_n w_n CE(softmax_i(ln p_av,n,i), y_n), the
        cross-entropy of the inference rule (Sec. 3.3: the class of the largest p_av = p_a p_v).
        ``targets`` (B, K) one-hot; ``weights`` (B,)."""
        za, ca = self.audio.forward(f_a, tokens)
        zv, cv = self.visual.forward(f_v, tokens)
        w = weights[:, None].astype(np.float32)
        sig_a, sig_v = 1.0 / (1.0 + np.exp(-za)), 1.0 / (1.0 + np.exp(-zv))
        if loss == "bce":
            value = sum(float((w * (np.logaddexp(0, z) - targets * z)).sum()) for z in (za, zv))
            d_a, d_v = w * (sig_a - targets), w * (sig_v - targets)
        elif loss == "ce":
            s = -np.logaddexp(0, -za) - np.logaddexp(0, -zv)  # ln p_av
            q = softmax(s)
            value = float(-(w * targets * np.log(np.maximum(q, 1e-30))).sum())
            ds = w * (q - targets)
            d_a, d_v = ds * (1.0 - sig_a), ds * (1.0 - sig_v)  # d ln sigmoid(z) / dz = 1 - sigmoid(z)
        else:
            raise ValueError(f"loss must be 'bce' or 'ce', got {loss!r}")
        grad = self.audio.backward_tokens(d_a.astype(np.float32), ca) + self.visual.backward_tokens(d_v.astype(np.float32), cv)
        return value, grad.astype(np.float32), za, zv
