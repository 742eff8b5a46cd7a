"""Gaussian encoders q(z | x)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ._fc import FCLayers

__all__ = ["Encoder"]


class Encoder(nn.Module):
    """Amortised Gaussian posterior: ``h = FC(x)``, ``μ = Linear(h)``, ``σ² = a(Linear(h)) + ε``.

    Parameters
    ----------
    n_input, n_output
        Input width and latent dimension.
    n_cat_list, n_cont
        Covariates injected into the FC stack.
    n_layers, n_hidden, dropout_rate, use_batch_norm, use_layer_norm, inject_covariates
        FC stack settings (see :class:`~cellvi.nn.FCLayers`); so are ``activation`` (class),
        ``use_activation`` and ``bias``.
    distribution
        ``"normal"`` or ``"ln"`` (logistic normal: softmax of the Gaussian draw).
    var_eps
        Added to the variance for numerical stability (1e-4).
    var_activation
        Maps the variance head to positive values ``a`` (``torch.exp`` by default).
    """

    def __init__(
        self,
        n_input: int,
        n_output: int,
        *,
        n_cat_list: Sequence[int] = (),
        n_cont: int = 0,
        n_layers: int = 1,
        n_hidden: int = 128,
        dropout_rate: float = 0.1,
        distribution: str = "normal",
        var_eps: float = 1e-4,
        var_activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
        use_batch_norm: bool = True,
        use_layer_norm: bool = False,
        inject_covariates: bool = True,
        activation: type[nn.Module] = nn.ReLU,
        use_activation: bool = True,
        bias: bool = True,
    ):
        super().__init__()
        self.distribution = distribution
        self.var_eps = var_eps
        self.encoder = FCLayers(
            n_input,
            n_hidden,
            n_cat_list=n_cat_list,
            n_cont=n_cont,
            n_layers=n_layers,
            n_hidden=n_hidden,
            dropout_rate=dropout_rate,
            use_batch_norm=use_batch_norm,
            use_layer_norm=use_layer_norm,
            inject_covariates=inject_covariates,
            activation=activation,
            use_activation=use_activation,
            bias=bias,
        )
        self.mean_encoder = nn.Linear(n_hidden, n_output)
        self.var_encoder = nn.Linear(n_hidden, n_output)
        self.var_activation = torch.exp if var_activation is None else var_activation

    def forward(
        self,
        x: torch.Tensor,
        *cat_list: torch.Tensor,
        cont: torch.Tensor | None = None,
        sample: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Return ``(q_mean, q_var, z)``; ``z`` is a reparameterised draw (softmaxed for ``ln``),
        or None with ``sample=False`` (only the posterior is wanted)."""
        h = self.encoder(x, *cat_list, cont=cont)
        q_m = self.mean_encoder(h)
        q_v = self.var_activation(self.var_encoder(h)) + self.var_eps
        if not sample:
            return q_m, q_v, None
        z = q_m + q_v.sqrt() * torch.randn_like(q_m)
        if self.distribution == "ln":
            z = torch.softmax(z, dim=-1)
        return q_m, q_v, z
