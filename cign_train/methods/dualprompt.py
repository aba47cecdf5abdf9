"""DualPrompt (Wang et al., ECCV 2022), class-incremental: a G-prompt shared by every task in phi's first
layers and one E-prompt per task in the next ones, the E-prompt chosen at inference by matching a
frozen query against learned task keys (Sec. 4); no rehearsal buffer. Freezing, query and cosine
are L2P's (``l2p``)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from cign_train.config import CIGNConfig
from cign_train.methods.base import Inputs, Option, Task
from cign_train.methods.finetune import Finetune
from cign_train.methods.l2p import MODALITIES, PromptArgs, cosine, freeze, query, uniform
from cign_train.model import CIGN, Prediction, predict


def placement(depth: int, g_layers: int, e_layers: int) -> tuple[range, range]:
    """The phi layers (0-based) that take the G- and the E-prompts: G the first ``g_layers``, E the
    ``e_layers`` after them (DualPrompt: G at layers 1-2 and E at 3-5 of ViT-B's 12), both cut to
    phi's ``depth``; where G takes every layer, E shares the last one with it."""
    g = range(min(g_layers, depth))
    e = range(min(g_layers, depth), min(g_layers + e_layers, depth))
    return g, (e if len(e) else range(depth - 1, depth))


def nearest_task(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """t_x = argmin_t gamma(q(x), k_t) with gamma = 1 - cos (DualPrompt Sec. 4.1, inference): for
    queries q (B, D) and task keys (T, D), the task of largest cosine, (B,)."""
    return cosine(q, keys).argmax(dim=1)


class DualPrompt(Finetune):
    """L = L_finetune + lambda * sum_{m in a, v} mean_x gamma(q_m(x), k_m,t) for the current task t
    (DualPrompt Sec. 4.3: the classification loss plus lambda times the matching loss).

    The paper (Sec. 4): a frozen pretrained ViT; a G-prompt g (L_g x D per layer) attached to the
    first layers and shared by every task; an E-prompt e_t (L_e x D per layer) with a key k_t for
    each task t, attached to the layers after those. Training uses task t's own e_t and pulls k_t to
    the query with the matching loss gamma(q(x), k_t) (cosine distance); at inference the task of the
    nearest key supplies the E-prompt. The prompts train with the classifier.

    Adaptation, as L2P's here (``L2P``): the first task trains everything (the whole CIGN, g, e_1 and
    k_1) as a warm start; from the second task on the encoders and phi are frozen and g, the task's
    e_t and k_t, the class-token table, token_cls, the grouping blocks and the heads train (earlier
    E-prompts and keys stay as their tasks left them); q(x) is the encoders' features averaged over
    locations (``query``); each modality has its own g, E-prompts and keys, queried by its own features,
    so audio and visual choose their E-prompt independently. The classification term is fine-tuning's
    (``Finetune``: eq 8's BCE and the new tokens' CE).

    Prompt function: the paper's default is prefix tuning (Pre-T, Sec. 4.2: the prompt split into
    keys and values of one layer's attention). phi is built of torch's nn.TransformerEncoderLayer,
    whose attention takes no extra keys and values, so this uses prompt tuning (Pro-T, Sec. 4.2): each
    layer's prompt is prepended to the sequence entering it, passes through the later layers with
    the rest, and its outputs are dropped at the end (``ModalityTransformer.forward``). Layers:
    ``placement``. With the cpu preset's single layer, G and the chosen E-prompt are both prepended to
    that layer's input, [g; e_t; features; class tokens] (L_g + L_e vectors; phi has no positional
    embedding, so their order is immaterial); with the paper preset's 3, G enters layers 1 and 2 and E
    layer 3.

    Defaults: L_g = 5, L_e = 20, G at layers 1-2 and E at layers 3-5 (Sec. 5), lambda = 1 (the released
    configs' key-pull weight). Keys and prompts start uniform in [-1, 1], as in the released code.
    """

    NAME = "dualprompt"
    NEEDS_BUFFER = False
    OPTIONS = (
        Option("dualprompt_g_length", 5, "G-prompt vectors per layer, L_g (DualPrompt Sec. 5: 5)."),
        Option("dualprompt_e_length", 20, "E-prompt vectors per layer, L_e (DualPrompt Sec. 5: 20)."),
        Option("dualprompt_g_layers", 2, "First phi layers that take the G-prompt (DualPrompt Sec. 5: layers 1-2)."),
        Option("dualprompt_e_layers", 3, "phi layers after those that take the E-prompt (DualPrompt Sec. 5: "
                                         "layers 3-5); on a shorter phi it shares the last layer."),
        Option("dualprompt_lambda", 1.0, "Weight lambda of the matching loss (DualPrompt Sec. 4.3; 1.0 in the "
                                         "released configs)."),
    )

    def __init__(self, model: CIGN, cfg: CIGNConfig, options: dict[str, Any] | None = None):
        super().__init__(model, cfg, options)
        o = self.options
        if o["dualprompt_g_layers"] < 0 or o["dualprompt_e_layers"] < 1:
            raise ValueError(f"dualprompt_g_layers must be >= 0 and dualprompt_e_layers >= 1, got "
                             f"{o['dualprompt_g_layers']} and {o['dualprompt_e_layers']}")
        self.g_layers, self.e_layers = placement(cfg.depth, o["dualprompt_g_layers"], o["dualprompt_e_layers"])
        self.g = {m: uniform(len(self.g_layers), o["dualprompt_g_length"], cfg.dim, like=model.tokens)
                  for m in MODALITIES}
        self.e: dict[str, list[nn.Parameter]] = {m: [] for m in MODALITIES}  # per task: (E layers, L_e, D)
        self.keys: dict[str, list[nn.Parameter]] = {m: [] for m in MODALITIES}  # per task: (D,)

    def begin_task(self, task: Task) -> None:
        """A new E-prompt and key per modality for the task; from the second task on, freeze the
        encoders and phi (the first task trained them)."""
        if task.index:
            freeze(self.model)
        for m in MODALITIES:
            self.e[m].append(uniform(len(self.e_layers), self.options["dualprompt_e_length"], self.cfg.dim,
                                     like=self.model.tokens))
            self.keys[m].append(uniform(self.cfg.dim, like=self.model.tokens))

    def parameters(self) -> list[nn.Parameter]:
        """The G-prompts and the current task's E-prompts and keys."""
        t = self.task.index
        return [*self.g.values(), *(self.e[m][t] for m in MODALITIES), *(self.keys[m][t] for m in MODALITIES)]

    def prompts(self, batch: Inputs, task: int | None) -> tuple[PromptArgs, torch.Tensor]:
        """Per modality {layer: (B, L, D)}: the G-prompt on its layers and an E-prompt on its own,
        [g; e] where they share one, as CIGN.forward's keyword arguments; the E-prompt is ``task``'s
        (training) or, with ``task`` None, that of each clip's nearest key (inference). Also the matching
        loss sum_m mean_x gamma(q_m(x), k_m,task) (before lambda; 0 with ``task`` None)."""
        prompts, match = {}, 0
        for m, q in zip(MODALITIES, query(self.model, batch)):
            if task is None:
                e = torch.stack(self.e[m])[nearest_task(q, torch.stack(self.keys[m]))]  # (B, E layers, L_e, D)
            else:
                e = self.e[m][task].expand(len(q), -1, -1, -1)
                match = match + (1 - cosine(q, self.keys[m][task][None])).mean()
            layers = {i: self.g[m][j].expand(len(q), -1, -1) for j, i in enumerate(self.g_layers)}
            for j, i in enumerate(self.e_layers):
                layers[i] = torch.cat([layers[i], e[:, j]], dim=1) if i in layers else e[:, j]
            prompts[f"prompts_{m}"] = layers
        return prompts, match

    def observe(self, batch: Inputs) -> dict[str, torch.Tensor]:
        if self.task.index:
            freeze(self.model)  # back to eval mode after the trainer's model.train()
        prompts, match = self.prompts(batch, self.task.index)
        terms = self.terms(self.forward(batch.spectrograms, batch.frames, **prompts), batch)
        match = self.options["dualprompt_lambda"] * match
        return {**terms, "match": match, "total": terms["total"] + match}

    def predict(self, batch: Inputs) -> Prediction:
        """The heads' probabilities with the G-prompt and each clip's key-matched E-prompt."""
        return predict(self.model(batch.spectrograms, batch.frames, **self.prompts(batch, None)[0]))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """g (G layers, L_g, D), the E-prompts (T, E layers, L_e, D) and keys (T, D) of each modality."""
        state = {}
        for m in MODALITIES:
            state[f"g_{m}"] = self.g[m].detach().clone()
            state[f"e_{m}"] = torch.stack(self.e[m]).detach().clone()
            state[f"keys_{m}"] = torch.stack(self.keys[m]).detach().clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """In place where a task's prompt exists already (a resume inside a task: the optimizer holds
        it), appended otherwise (a resume at a task boundary)."""
        device = self.model.tokens.device
        with torch.no_grad():
            for m in MODALITIES:
                self.g[m].copy_(state[f"g_{m}"])
                for have, saved in ((self.e[m], state[f"e_{m}"]), (self.keys[m], state[f"keys_{m}"])):
                    for i, value in enumerate(saved):
                        if i < len(have):
                            have[i].copy_(value)
                        else:
                            have.append(nn.Parameter(value.to(device).clone()))
