"""What every cellvi module returns from its loss, and the small protocol it follows."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["LossOutput", "kl_normal_standard", "kl_normal_normal", "log_normal"]


@dataclass
class LossOutput:
    """Loss of one minibatch and the per-cell pieces the ELBO metrics are built from.

    Attributes
    ----------
    loss
        Scalar to minimise (KL warm-up weight applied).
    reconstruction_loss
        Negative log-likelihood per cell, shape ``(cells,)``.
    kl_local
        Sum of the local KL terms per cell (unweighted), shape ``(cells,)``.
    kl_global
        Global KL term (scalar; 0 for models without global latent variables).
    extra_metrics
        Further scalar metrics to log (``{name: scalar tensor}``).
    """

    loss: torch.Tensor
    reconstruction_loss: torch.Tensor
    kl_local: torch.Tensor
    kl_global: torch.Tensor = field(default_factory=lambda: torch.tensor(0.0))
    extra_metrics: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def n_obs(self) -> int:
        """Number of cells in the minibatch."""
        return self.reconstruction_loss.shape[0]


def kl_normal_standard(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, var) ‖ N(0, 1)) summed over the last axis."""
    return 0.5 * (mean.pow(2) + var - 1.0 - var.log()).sum(dim=-1)


def kl_normal_normal(
    mean: torch.Tensor, var: torch.Tensor, prior_mean: torch.Tensor, prior_var: torch.Tensor
) -> torch.Tensor:
    """KL(N(mean, var) ‖ N(prior_mean, prior_var)) summed over the last axis."""
    ratio = var / prior_var
    return 0.5 * (ratio + (mean - prior_mean).pow(2) / prior_var - 1.0 - ratio.log()).sum(dim=-1)


def log_normal(
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor | None = None,
    *,
    log_var: torch.Tensor | None = None,
) -> torch.Tensor:
    """log N(x; mean, var) summed over the last axis; give ``var`` or its log ``log_var``
    (exact where ``var`` would underflow)."""
    if log_var is None:
        return (-0.5 * ((x - mean) ** 2 / var + var.log() + math.log(2 * math.pi))).sum(-1)
    sq = (x - mean) ** 2 * torch.exp(-log_var)
    return (-0.5 * (sq + log_var + math.log(2 * math.pi))).sum(-1)
