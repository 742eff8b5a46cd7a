"""Hyperparameters of the SCVI variational autoencoder, declared and validated once."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from ..nn import HIDDEN_ACTIVATIONS, VARIANCE_ACTIVATIONS, activation_name

__all__ = ["VAEConfig", "CHOICES", "EXTRA_KWARGS"]

CHOICES = {
    "dispersion": ("gene", "gene-batch", "gene-label", "gene-cell"),
    "gene_likelihood": ("zinb", "nb", "poisson", "normal"),
    "latent_distribution": ("normal", "ln"),
    "batch_representation": ("one-hot", "embedding"),
    "use_batch_norm": ("none", "encoder", "decoder", "both"),
    "use_layer_norm": ("none", "encoder", "decoder", "both"),
}


def _activation(value, arg):
    return activation_name(value, HIDDEN_ACTIVATIONS, arg)


def _flag(value, arg):
    if not isinstance(value, bool):
        raise ValueError(f"{arg}={value!r} must be True or False.")
    return value


def _positive_int(value, arg):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{arg}={value!r} must be a positive integer.")
    return value


def _non_negative(value, arg):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
        raise ValueError(f"{arg}={value!r} must be a number >= 0.")
    return float(value)


def _positive(value, arg):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{arg}={value!r} must be a positive number.")
    return float(value)


def _positive_or_none(value, arg):
    return None if value is None else _positive(value, arg)


#: Keys each pass-through dict accepts, with the check (and normalisation) of their values.
EXTRA_KWARGS = {
    "extra_encoder_kwargs": {
        "activation_fn": _activation,
        "bias": _flag,
        "use_activation": _flag,
        "var_eps": _non_negative,
    },
    "extra_decoder_kwargs": {"activation_fn": _activation, "bias": _flag, "use_activation": _flag},
    "batch_embedding_kwargs": {
        "embedding_dim": _positive_int,
        "max_norm": _positive_or_none,
        "norm_type": _positive,
        "scale_grad_by_freq": _flag,
    },
}
# pass-through keys that are also config fields: the dict's value becomes the field's
_FOLDED = {("extra_encoder_kwargs", "var_eps"): "var_eps"}
_FOLDED[("batch_embedding_kwargs", "embedding_dim")] = "batch_embedding_dim"


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
        ``"zinb"``, ``"nb"``, ``"poisson"`` or ``"normal"`` (experimental, as in scvi-tools:
        ``x_ng ~ N(μ_ng, σ_g²)`` on the raw counts, not on ``log1p``, with the mean
        ``μ = e^l ρ`` of the count models and the standard deviation ``σ = exp(px_r)``, the
        parameter the count models use for θ (its shape follows ``dispersion``). Its draws
        are real numbers and may be negative.
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
    var_activation
        Maps the encoder variance head to positive values: None or ``"exp"`` (default,
        ``σ² = exp(h) + var_eps``) or ``"softplus"`` (``σ² = softplus(h) + var_eps``).
        ``torch.exp`` and ``torch.nn.functional.softplus`` are accepted and stored by name
        (model files hold no code); other callables raise ``ValueError``. Applies to the
        library encoder too.
    extra_encoder_kwargs
        Further settings of the z (and library) encoder: ``activation_fn`` (a name such as
        ``"leaky_relu"``, or the ``torch.nn`` class, stored by name), ``bias`` and
        ``use_activation`` (booleans) of its FC stack, and ``var_eps`` (which then sets the
        ``var_eps`` field).
    extra_decoder_kwargs
        Further settings of the decoder's FC stack: ``activation_fn``, ``bias``,
        ``use_activation``.
    batch_embedding_kwargs
        With ``batch_representation="embedding"``: ``embedding_dim`` (which then sets
        ``batch_embedding_dim``), ``max_norm``, ``norm_type``, ``scale_grad_by_freq`` (see
        :class:`torch.nn.Embedding`).

    Raises
    ------
    ValueError
        A choice, number or pass-through value out of range.
    TypeError
        A pass-through dict is not a dict, or has a key not listed above (the message lists
        the valid ones).

    Examples
    --------
    >>> import torch
    >>> cfg = VAEConfig(var_activation=torch.nn.functional.softplus,
    ...                 extra_decoder_kwargs={"activation_fn": torch.nn.LeakyReLU})
    >>> cfg.var_activation, cfg.extra_decoder_kwargs
    ('softplus', {'activation_fn': 'leaky_relu'})
    """

    n_hidden: int = 128
    n_latent: int = 10
    n_layers: int = 1
    dropout_rate: float = 0.1
    dispersion: Literal["gene", "gene-batch", "gene-label", "gene-cell"] = "gene"
    gene_likelihood: Literal["zinb", "nb", "poisson", "normal"] = "zinb"
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
    var_activation: Literal["exp", "softplus"] | None = None
    extra_encoder_kwargs: dict | None = None
    extra_decoder_kwargs: dict | None = None
    batch_embedding_kwargs: dict | None = None

    def __post_init__(self):
        self._check_choices()
        if self.var_activation is not None:
            name = activation_name(self.var_activation, VARIANCE_ACTIVATIONS, "var_activation")
            object.__setattr__(self, "var_activation", name)
        for arg, checks in EXTRA_KWARGS.items():
            given = getattr(self, arg)
            if given is not None:
                object.__setattr__(self, arg, self._check_extra(arg, given, checks))

    def _check_choices(self):
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

    def _check_extra(self, arg: str, given, checks: dict) -> dict:
        """A checked copy of one pass-through dict; folded keys also set their field."""
        if not isinstance(given, Mapping):
            raise TypeError(f"{arg}={given!r} must be a dict (or None).")
        fields = {f.name: f.default for f in dataclasses.fields(self)}
        out = {}
        for key, value in given.items():
            if key not in checks:
                hint = f" Give {key}=... to the model instead." if key in fields else ""
                raise TypeError(
                    f"{arg} has an unsupported key {key!r}; valid keys are {sorted(checks)}.{hint}"
                )
            out[key] = checks[key](value, f"{arg}[{key!r}]")
            field = _FOLDED.get((arg, key))
            if field is not None:
                current = getattr(self, field)
                if current != fields[field] and current != out[key]:
                    raise ValueError(
                        f"{field}={current!r} and {arg}[{key!r}]={out[key]!r} disagree; "
                        "give only one of them."
                    )
                object.__setattr__(self, field, out[key])
        return out

    def to_dict(self) -> dict:
        """Plain dict of the fields (saved with the model)."""
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of all hyperparameters."""
        return [f.name for f in dataclasses.fields(cls)]
