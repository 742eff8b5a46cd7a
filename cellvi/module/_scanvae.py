"""SCANVI's module: SCVI plus a label classifier and a label-conditioned latent hierarchy."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .._constants import REGISTRY_KEYS
from ..nn import Encoder, FCLayers
from ._base import LossOutput, kl_normal_normal, kl_normal_standard, log_normal
from ._vae import VAE
from ._vae_config import VAEConfig

__all__ = ["SCANVAE"]


class SCANVAE(VAE):
    """Semi-supervised VAE (``models.md`` §2).

    Generative: ``y ~ Cat(uniform)``, ``z2 ~ N(0, I)``, ``z1 | z2, y ~ N(μ(z2, y), σ²(z2, y))``,
    ``x | z1, l`` as in SCVI. Inference: ``q(z1 | x)`` (the SCVI encoder), ``q(y | z1)`` (the
    classifier) and ``q(z2 | z1, y)``. Every cell of a minibatch is treated as unlabeled with
    ``y`` enumerated; labeled cells add a classification loss in the training plan.

    Parameters
    ----------
    n_input
        Number of genes.
    config
        Architecture shared with SCVI.
    n_labels
        Number of label classes K (the unlabeled category excluded).
    linear_classifier
        A single linear layer as classifier instead of an FC stack.
    **kwargs
        :class:`VAE` arguments (``n_batch``, covariates, library priors).
    """

    def __init__(
        self,
        n_input: int,
        config: VAEConfig | None = None,
        *,
        n_labels: int,
        linear_classifier: bool = False,
        **kwargs,
    ):
        super().__init__(n_input, config, n_labels=n_labels + 1, **kwargs)
        cfg = self.config
        self.n_classes = n_labels
        bn = cfg.use_batch_norm in ("encoder", "both")
        ln = cfg.use_layer_norm in ("encoder", "both")
        if linear_classifier:
            self.classifier = nn.Linear(cfg.n_latent, n_labels)
        else:
            self.classifier = nn.Sequential(
                FCLayers(
                    cfg.n_latent,
                    cfg.n_hidden,
                    n_layers=cfg.n_layers,
                    n_hidden=cfg.n_hidden,
                    dropout_rate=cfg.dropout_rate,
                    use_batch_norm=bn,
                    use_layer_norm=ln,
                ),
                nn.Linear(cfg.n_hidden, n_labels),
            )
        self.encoder_z2_z1 = Encoder(
            cfg.n_latent,
            cfg.n_latent,
            n_cat_list=[n_labels],
            n_layers=cfg.n_layers,
            n_hidden=cfg.n_hidden,
            dropout_rate=cfg.dropout_rate,
            use_batch_norm=bn,
            use_layer_norm=ln,
        )
        self.decoder_z1_z2 = FCLayers(
            cfg.n_latent,
            cfg.n_hidden,
            n_cat_list=[n_labels],
            n_layers=cfg.n_layers,
            n_hidden=cfg.n_hidden,
            dropout_rate=0.0,
        )
        self.pz1_mean = nn.Linear(cfg.n_hidden, cfg.n_latent)
        self.pz1_var = nn.Linear(cfg.n_hidden, cfg.n_latent)

    def classify(self, tensors: dict[str, torch.Tensor], use_posterior_mean: bool = True):
        """Class logits ``(cells, K)`` from the posterior mean (or a draw) of ``z1``."""
        # the classifier sees z only
        inf = self.inference(tensors, library=False, sample_z=not use_posterior_mean)
        z = inf["qz_m"] if use_posterior_mean else inf["z"]
        return self.classifier(z)

    def loss(self, tensors, inference_outputs, generative_outputs, kl_weight: float = 1.0):
        x = tensors[REGISTRY_KEYS.X_KEY]
        z1, qz_m, qz_v = (
            inference_outputs["z"],
            inference_outputs["qz_m"],
            inference_outputs["qz_v"],
        )
        n, k = z1.shape[0], self.n_classes
        log_px = self.log_likelihood(x, generative_outputs)
        log_qz1 = log_normal(z1, qz_m, qz_v)
        probs = F.softmax(self.classifier(z1), dim=-1)  # q(y | z1), (cells, K)
        ys = torch.arange(k, device=x.device).repeat_interleave(n).reshape(-1, 1)
        z1_rep = z1.repeat(k, 1)  # (K * cells, d), block y = all cells with label y
        qz2_m, qz2_v, z2 = self.encoder_z2_z1(z1_rep, ys)
        h = self.decoder_z1_z2(z2, ys)
        pz1_m, pz1_v = self.pz1_mean(h), self.pz1_var(h).exp() + 1e-4
        log_pz1 = log_normal(z1_rep, pz1_m, pz1_v).reshape(k, n).T  # (cells, K)
        kl_z2 = kl_normal_standard(qz2_m, qz2_v).reshape(k, n).T
        reconst = -log_px + log_qz1 - (probs * log_pz1).sum(-1)
        kl_y = (probs * (probs.clamp_min(1e-12).log() + math.log(k))).sum(-1)
        kl_local = (probs * kl_z2).sum(-1) + kl_y
        if self.observed_library:
            kl_l = torch.zeros_like(kl_local)
        else:
            b = tensors[REGISTRY_KEYS.BATCH_KEY].reshape(-1)
            kl_l = kl_normal_normal(
                inference_outputs["ql_m"],
                inference_outputs["ql_v"],
                self.library_log_means[0, b].unsqueeze(-1),
                self.library_log_vars[0, b].unsqueeze(-1),
            )
        loss = torch.mean(reconst + kl_weight * kl_local + kl_l)
        return LossOutput(
            loss=loss,
            reconstruction_loss=reconst,
            kl_local=kl_local + kl_l,
            kl_global=torch.zeros((), device=x.device),
        )
