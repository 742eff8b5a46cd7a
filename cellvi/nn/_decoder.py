"""Decoders p(x | z) for count data."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ._fc import FCLayers

__all__ = ["CountDecoder"]


class CountDecoder(nn.Module):
    """Decode ``z`` into the parameters of a count likelihood.

    The normalised expression ``ρ = softmax(W h)`` is returned in log space as well, so the
    likelihood can use ``log μ = l + log ρ`` without a lossy ``log(exp(·))`` round trip.

    Parameters
    ----------
    n_input, n_output
        Latent width (plus any extra inputs) and number of genes.
    n_cat_list, n_cont
        Covariates injected into the FC stack.
    n_layers, n_hidden, inject_covariates, use_batch_norm, use_layer_norm
        FC stack settings; decoder dropout is always 0.
    scale_activation
        ``"softmax"`` (ρ sums to 1) or ``"softplus"`` (size-factor models).
    gene_cell_dispersion
        Add a head that predicts a per-cell, per-gene dispersion.
    activation, use_activation, bias
        Activation class of the FC stack, whether its blocks apply it, and whether its linear
        layers have a bias (see :class:`~cellvi.nn.FCLayers`).
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
        inject_covariates: bool = True,
        use_batch_norm: bool = False,
        use_layer_norm: bool = False,
        scale_activation: str = "softmax",
        gene_cell_dispersion: bool = False,
        activation: type[nn.Module] = nn.ReLU,
        use_activation: bool = True,
        bias: bool = True,
    ):
        super().__init__()
        self.scale_activation = scale_activation
        self.px_decoder = FCLayers(
            n_input,
            n_hidden,
            n_cat_list=n_cat_list,
            n_cont=n_cont,
            n_layers=n_layers,
            n_hidden=n_hidden,
            dropout_rate=0.0,
            inject_covariates=inject_covariates,
            use_batch_norm=use_batch_norm,
            use_layer_norm=use_layer_norm,
            activation=activation,
            use_activation=use_activation,
            bias=bias,
        )
        self.px_scale_decoder = nn.Linear(n_hidden, n_output)
        self.px_r_decoder = nn.Linear(n_hidden, n_output) if gene_cell_dispersion else None
        self.px_dropout_decoder = nn.Linear(n_hidden, n_output)

    def _softmax_in_place(self, h: torch.Tensor, scale_out: torch.Tensor | None) -> bool:
        """Whether ρ can be computed inside ``scale_out``: the CPU's softmax reads each row
        before writing it, so input and output may be the same memory there."""
        return (
            scale_out is not None
            and self.scale_activation == "softmax"
            and scale_out.device.type == "cpu"
            and h.dim() == 2
            and scale_out.is_contiguous()
            and scale_out.shape == (h.shape[0], self.px_scale_decoder.out_features)
            and h.dtype == scale_out.dtype == self.px_scale_decoder.weight.dtype
            and self.px_scale_decoder.bias is not None
            and not torch.is_grad_enabled()
        )

    def forward(
        self,
        z: torch.Tensor,
        library: torch.Tensor,
        *cat_list: torch.Tensor,
        cont: torch.Tensor | None = None,
        need_dropout: bool = True,
        scale_only: bool = False,
        scale_out: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Decode.

        Returns a dict with ``scale`` (ρ), ``log_scale``, ``log_rate`` (log μ = l + log ρ;
        the rate itself is computed only where needed, see ``VAE.rate``),
        ``dispersion_logit`` (log θ for gene-cell dispersion, else None) and
        ``dropout_logits`` (zero-inflation logits, or None when not needed). With
        ``scale_only`` just ``scale`` is computed (one softmax pass; the others are None),
        written into ``scale_out`` when given (e.g. a slice of a caller's result array).
        """
        h = self.px_decoder(z, *cat_list, cont=cont)
        if scale_only and self._softmax_in_place(h, scale_out):
            # the logits are written into ``scale_out`` and normalised there, row by row: no
            # minibatch-sized temporary (at 20k x 2,000 the call's peak memory fell from 1.34x
            # to 1.07x its result)
            linear = self.px_scale_decoder
            torch.addmm(linear.bias, h, linear.weight.t(), out=scale_out)
            return {
                "scale": torch.softmax(scale_out, dim=-1, out=scale_out),
                "log_scale": None,
                "log_rate": None,
                "dispersion_logit": None,
                "dropout_logits": None,
            }
        logits = self.px_scale_decoder(h)
        if scale_only:
            if self.scale_activation == "softmax" and (
                scale_out is None or scale_out.dtype == logits.dtype
            ):
                scale = torch.softmax(logits, dim=-1, out=scale_out)
            elif self.scale_activation == "softmax":  # e.g. a float64 model, float32 result
                scale = scale_out.copy_(torch.softmax(logits, dim=-1))
            else:
                scale = F.softplus(logits)
                scale = scale if scale_out is None else scale_out.copy_(scale)
            return {
                "scale": scale,
                "log_scale": None,
                "log_rate": None,
                "dispersion_logit": None,
                "dropout_logits": None,
            }
        if self.scale_activation == "softmax":
            log_scale = torch.log_softmax(logits, dim=-1)
            scale = log_scale.exp()
        else:
            scale = F.softplus(logits)
            log_scale = torch.log(scale + 1e-30)
        log_rate = library + log_scale
        return {
            "scale": scale,
            "log_scale": log_scale,
            "log_rate": log_rate,
            "dispersion_logit": self.px_r_decoder(h) if self.px_r_decoder is not None else None,
            "dropout_logits": self.px_dropout_decoder(h) if need_dropout else None,
        }
