"""Hyperparameters of the SCVI variational autoencoder, declared and validated once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

__all__ = ["VAEConfig", "CHOICES"]

CHOICES = {
    "dispersion": ("gene", "gene-batch", "gene-label", "gene-cell"),
    "gene_likelihood": ("zinb", "nb", "poisson"),
    "latent_distribution": ("normal", "ln"),
    "batch_representation": ("one-hot", "embedding"),
    "use_batch_norm": ("none", "encoder", "decoder", "both"),
    "use_layer_norm": ("none", "encoder", "decoder", "both"),
}


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of :class:`~cellvi.module.VAE` (the SCVI model).

    Parameters
    ----------
    n_hidden
        Width of hidden layers (128).
    n_latent
        Latent dimension (10).
    n_layers
        Hidden layers in encoder and decoder (1).
    dropout_rate
        Encoder dropout (0.1); the decoder never uses dropout.
    dispersion
        ``"gene"``, ``"gene-batch"``, ``"gene-label"`` or ``"gene-cell"``.
    gene_likelihood
        ``"zinb"``, ``"nb"`` or ``"poisson"``.
    latent_distribution
        ``"normal"`` or ``"ln"`` (logistic normal).
    use_observed_lib_size
        Use the observed log library size (True) or learn it with a per-batch prior.
    log_variational
        The encoder sees ``log1p(x)``.
    encode_covariates
        Feed batch and covariates to the encoder too.
    deeply_inject_covariates
        Covariates enter every hidden block, not only the first.
    batch_representation
        ``"one-hot"`` or ``"embedding"`` (a learned vector of ``batch_embedding_dim``).
    batch_embedding_dim
        Size of the batch embedding (5).
    use_batch_norm, use_layer_norm
        Where to normalise: ``"none"``, ``"encoder"``, ``"decoder"`` or ``"both"``.
    var_eps
        Added to encoder variances (1e-4).
    """

    n_hidden: int = 128
    n_latent: int = 10
    n_layers: int = 1
    dropout_rate: float = 0.1
    dispersion: Literal["gene", "gene-batch", "gene-label", "gene-cell"] = "gene"
    gene_likelihood: Literal["zinb", "nb", "poisson"] = "zinb"
    latent_distribution: Literal["normal", "ln"] = "normal"
    use_observed_lib_size: bool = True
    log_variational: bool = True
    encode_covariates: bool = False
    deeply_inject_covariates: bool = True
    batch_representation: Literal["one-hot", "embedding"] = "one-hot"
    batch_embedding_dim: int = 5
    use_batch_norm: Literal["none", "encoder", "decoder", "both"] = "both"
    use_layer_norm: Literal["none", "encoder", "decoder", "both"] = "none"
    var_eps: float = 1e-4

    def __post_init__(self):
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(
                    f"{name}={value!r} is not supported; choose one of {list(allowed)}."
                )
        for name in ("n_hidden", "n_latent", "n_layers", "batch_embedding_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer.")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate={self.dropout_rate!r} must be in [0, 1).")
        if not self.var_eps >= 0:
            raise ValueError(f"var_eps={self.var_eps!r} must be >= 0.")

    def to_dict(self) -> dict:
        """Plain dict of the fields (saved with the model)."""
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of all hyperparameters."""
        return [f.name for f in dataclasses.fields(cls)]
