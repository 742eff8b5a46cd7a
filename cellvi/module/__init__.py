"""Generative models as pure torch modules (no AnnData): inference, generative, loss."""

from ._base import LossOutput, kl_normal_normal, kl_normal_standard, log_normal
from ._scanvae import SCANVAE
from ._vae import VAE
from ._vae_config import CHOICES, EXTRA_KWARGS, VAEConfig

__all__ = [
    "CHOICES",
    "EXTRA_KWARGS",
    "LossOutput",
    "SCANVAE",
    "VAE",
    "VAEConfig",
    "kl_normal_normal",
    "kl_normal_standard",
    "log_normal",
]
