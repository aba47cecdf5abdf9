"""L2P (Wang et al., CVPR 2022), class-incremental: a pool of learned prompts, chosen per clip by
matching a frozen query against learned keys, instructs a frozen network (Sec. 4); no rehearsal
buffer. Also the freezing, query and key-matching helpers that DualPrompt (``dualprompt``) shares."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from cign_train.config import CIGNConfig
from cign_train.methods.base import Inputs, Option, Task
from cign_train.methods.finetune import Finetune
from cign_train.model import CIGN, Prediction, predict

#: The prompted network's frozen part from the second task on: the stand-in for the papers' frozen
#: pretrained ViT (the encoders give the query, phi takes the prompts).
FROZEN = ("audio_encoder", "visual_encoder", "phi_a", "phi_v")
#: One prompt set per modality: "a" for phi_a (queried by the audio features), "v" for phi_v.
MODALITIES = ("a", "v")

PromptArgs = dict[str, dict[int, torch.Tensor]]  # {"prompts_a": {layer: (B, L, D)}, "prompts_v": ...}


def freeze(model: CIGN) -> None:
    """No gradient, and eval mode, for the FROZEN modules: BatchNorm keeps the running statistics of
    the end of the first task. The trainer puts the model in train mode every epoch, so a method calls
    this on every step, not only when the task begins."""
    for name in FROZEN:
        getattr(model, name).requires_grad_(False).eval()


@torch.no_grad()
def query(model: CIGN, batch: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """q(x) per modality, (B, D) each: the audio encoder's f_a and the visual encoder's f_v averaged
    over its P locations, without gradient, with the encoders in eval mode (BatchNorm's running
    statistics, so q is a function of the clip alone and the same in training and evaluation; the
    encoders' mode is restored)."""
    encoders = (model.audio_encoder, model.visual_encoder)
    modes = [e.training for e in encoders]
    for e in encoders:
        e.eval()
    q_a, q_v = model.audio_encoder(batch.spectrograms), model.visual_encoder(batch.frames).mean(dim=1)
    for e, mode in zip(encoders, modes):
        e.train(mode)
    return q_a, q_v


def cosine(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """cos(q_b, k_j), (B, M), of queries q (B, D) and keys (M, D), in fp32."""
    return F.normalize(q.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).T


def select(q: torch.Tensor, keys: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L2P's K_x (eq 4): for each query the n keys of smallest gamma(q, k) = 1 - cos(q, k) (the
    paper's cosine distance, Sec. 4.2), as indices (B, n), nearest first, and those distances (B, n),
    differentiable in the keys."""
    distance = 1 - cosine(q, keys)  # (B, M)
    nearest = distance.topk(n, dim=1, largest=False).indices  # (B, n)
    return nearest, distance.gather(1, nearest)


def uniform(*shape: int, like: torch.Tensor) -> nn.Parameter:
    """A parameter of ``shape`` drawn uniformly from [-1, 1] on ``like``'s device: the prompt and key
    initializer of L2P's and DualPrompt's released code ("uniform")."""
    return nn.Parameter(torch.empty(shape, device=like.device).uniform_(-1, 1))


class L2P(Finetune):
    """L = L_finetune + lambda * sum_{m in a, v} mean_x sum_{j in K_x} gamma(q_m(x), k_m,j) (L2P eq 5).

    The paper (Sec. 4): a frozen pretrained ViT; a pool of M prompts P_j (L_p x D), each with a key
    k_j (eqs 1-2); the query q(x) is the frozen ViT's [CLS] feature without prompts; the N keys nearest
    to q(x) by cosine distance gamma pick the prompts (eqs 3-4), which are prepended to the input
    tokens; eq 5 trains the prompts, keys and classifier with the classification loss plus the
    surrogate lambda * sum_{K_x} gamma(q(x), k_j), which pulls the selected keys to the query (the
    selection itself passes no gradient).

    Adaptation (here nothing is pretrained):

    - The first task trains everything (the whole CIGN, the pools and the keys) as a warm start, in
      place of the pretraining. From the second task on the encoders and phi_a / phi_v are frozen
      (``FROZEN``: no gradient, and eval mode so that BatchNorm's statistics stay): the frozen ViT.
      What trains then: the pools and keys, the class-token table and token_cls (eq 8's CE), the
      grouping blocks and the two heads, i.e. CIGN's classifier (the class tokens are its per-class
      rows, grouping and heads turn them into logits), the phi of eq 5.
    - q(x) is the encoders' features averaged over locations (``query``): after the first task the
      encoders no longer change, so the model's own encoders are the frozen copy; on the first task
      they are the encoders as they train.
    - One pool and key set per modality: phi_a's, queried by the audio features, and phi_v's, by the
      visual ones. phi_a and phi_v share no weights, so a prompt vector means something to one of them
      only, and the two encoders' feature spaces differ; each modality's prediction is thereby an L2P
      of its own, and p_av = p_a * p_v as in Sec. 3.3.
    - The N chosen prompts (N * L_p vectors) are prepended to phi's input sequence [features; class
      tokens] (``ModalityTransformer.forward``) and run through all its layers; their outputs are
      dropped, because CIGN's heads read the class-aware features g_i, where L2P's classifier reads
      the average of the prompts' outputs (eq 5's f^avg).
    - The classification term is fine-tuning's (``Finetune``: eq 8's BCE over every seen class and
      the new tokens' CE). The surrogate is summed over the N chosen keys, averaged over the batch.

    Defaults: M = 10, L_p = 5, N = 5 (Sec. 5's settings), lambda = 0.1 (as in l2p-pytorch; the
    official configs set 1.0). Not done: the optional frequency penalty that diversifies the selection
    across tasks (Sec. 4.2), and the released code's batch-wise selection and masking of the logits of
    classes outside the current task.
    """

    NAME = "l2p"
    NEEDS_BUFFER = False
    OPTIONS = (
        Option("l2p_pool_size", 10, "Prompts in each modality's pool, M (L2P Sec. 5: 10)."),
        Option("l2p_length", 5, "Vectors per prompt, L_p (L2P Sec. 5: 5)."),
        Option("l2p_top_n", 5, "Prompts chosen per clip, N (L2P Sec. 5: 5)."),
        Option("l2p_lambda", 0.1, "Weight lambda of the key-matching surrogate loss (L2P eq 5; 0.1 as in "
                                  "l2p-pytorch, 1.0 in the official configs)."),
    )

    def __init__(self, model: CIGN, cfg: CIGNConfig, options: dict[str, Any] | None = None):
        super().__init__(model, cfg, options)
        o = self.options
        if not 1 <= o["l2p_top_n"] <= o["l2p_pool_size"]:
            raise ValueError(f"l2p_top_n must be in 1..l2p_pool_size ({o['l2p_pool_size']}), got {o['l2p_top_n']}")
        self.pool = {m: uniform(o["l2p_pool_size"], o["l2p_length"], cfg.dim, like=model.tokens) for m in MODALITIES}
        self.keys = {m: uniform(o["l2p_pool_size"], cfg.dim, like=model.tokens) for m in MODALITIES}

    def begin_task(self, task: Task) -> None:
        """From the second task on, freeze the encoders and phi (the first task trained them)."""
        if task.index:
            freeze(self.model)

    def parameters(self) -> list[nn.Parameter]:
        """The pools and keys of both modalities (every task)."""
        return [*self.pool.values(), *self.keys.values()]

    def prompts(self, batch: Inputs) -> tuple[PromptArgs, torch.Tensor]:
        """Each clip's N prompts per modality, for phi's first layer, as CIGN.forward's keyword
        arguments, and the surrogate sum_m mean_x sum_{j in K_x} gamma(q_m(x), k_m,j) (before lambda)."""
        prompts, pull = {}, 0
        for m, q in zip(MODALITIES, query(self.model, batch)):
            nearest, distance = select(q, self.keys[m], self.options["l2p_top_n"])  # (B, N) each
            prompts[f"prompts_{m}"] = {0: self.pool[m][nearest].flatten(1, 2)}  # (B, N, L_p, D) -> (B, N L_p, D)
            pull = pull + distance.sum(dim=1).mean()
        return prompts, pull

    def observe(self, batch: Inputs) -> dict[str, torch.Tensor]:
        if self.task.index:
            freeze(self.model)  # back to eval mode after the trainer's model.train()
        prompts, pull = self.prompts(batch)
        terms = self.terms(self.forward(batch.spectrograms, batch.frames, **prompts), batch)
        pull = self.options["l2p_lambda"] * pull
        return {**terms, "pull": pull, "total": terms["total"] + pull}

    def predict(self, batch: Inputs) -> Prediction:
        """The heads' probabilities with each clip's prompts chosen by its query."""
        return predict(self.model(batch.spectrograms, batch.frames, **self.prompts(batch)[0]))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{part}_{m}": p.detach().clone() for part, d in (("pool", self.pool), ("keys", self.keys))
                for m, p in d.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for part, d in (("pool", self.pool), ("keys", self.keys)):
                for m, p in d.items():
                    p.copy_(state[f"{part}_{m}"])
