"""Fully connected stacks with covariate injection."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..dataloaders import SparseRows

__all__ = ["FCLayers"]


class CovariateLinear(nn.Module):
    """``Linear(input ⊕ one-hot covariates)`` computed without building the one-hot.

    The weight columns of each categorical covariate live in their own table
    (``cov_weight``, shape ``(sum of categories, n_out)``), so a minibatch costs one gather
    instead of a wide matrix product, and reference mapping can train the covariate columns
    while the expression weights stay frozen.

    Parameters
    ----------
    n_in
        Width of the (expression or hidden) input, continuous covariates included.
    n_out
        Output width.
    n_cat_list
        Number of categories of each categorical covariate; entries <= 1 are skipped.
    bias
        Whether the layer has a bias.
    """

    def __init__(self, n_in: int, n_out: int, n_cat_list: Sequence[int], *, bias: bool = True):
        super().__init__()
        self.n_cat_list = [int(n) if n > 1 else 0 for n in n_cat_list]
        self.linear = nn.Linear(n_in, n_out, bias=bias)
        n_cov = sum(self.n_cat_list)
        fan_in = n_in + n_cov
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.uniform_(self.linear.weight, -bound, bound)
        if bias:
            nn.init.uniform_(self.linear.bias, -bound, bound)
        if n_cov:
            self.cov_weight = nn.Parameter(torch.empty(n_cov, n_out).uniform_(-bound, bound))
            offsets = torch.tensor([0, *self.n_cat_list[:-1]]).cumsum(0)
            self.register_buffer("cov_offsets", offsets, persistent=False)
        else:
            self.cov_weight = None

    def covariate_term(self, cat_list: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """Sum of the covariate columns selected by the codes, shape ``(cells, n_out)``."""
        if self.cov_weight is None:
            return None
        used = [c for c, n in zip(cat_list, self.n_cat_list, strict=True) if n]
        codes = torch.cat([c.reshape(-1, 1) for c in used], dim=1)  # (cells, n_used_covs)
        offsets = self.cov_offsets[[i for i, n in enumerate(self.n_cat_list) if n]]
        rows = self.cov_weight[codes + offsets]  # (cells, n_used_covs, n_out)
        return rows.sum(dim=1)

    def forward(
        self,
        x: torch.Tensor | SparseRows,
        cat_list: Sequence[torch.Tensor],
        tail: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``Linear([x, tail])`` plus the covariate columns; ``x`` may be :class:`SparseRows`."""
        if isinstance(x, SparseRows):
            out = x.linear(self.linear.weight, self.linear.bias, tail)
        else:
            out = self.linear(x if tail is None else torch.cat([x, tail], dim=-1))
        cov = self.covariate_term(cat_list)
        return out if cov is None else out + cov  # broadcasts over a leading sample axis


class FCLayers(nn.Module):
    """A stack of ``Linear → BatchNorm → LayerNorm → activation → Dropout`` blocks.

    Parameters
    ----------
    n_in, n_out
        Input and output widths.
    n_cat_list
        Category counts of categorical covariates (one-hot semantics; <= 1 skipped).
    n_cont
        Number of continuous covariates, concatenated raw to the block inputs.
    n_layers, n_hidden
        Number of blocks and width of the hidden ones.
    dropout_rate
        Dropout after each block (0 disables it).
    use_batch_norm, use_layer_norm
        Normalisation per block (BatchNorm momentum 0.01, eps 1e-3; LayerNorm without affine).
    use_activation
        Apply ``activation`` in each block.
    inject_covariates
        Covariates enter every block (True) or only the first (False).
    activation
        Activation class (``nn.ReLU`` by default).
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        *,
        n_cat_list: Sequence[int] = (),
        n_cont: int = 0,
        n_layers: int = 1,
        n_hidden: int = 128,
        dropout_rate: float = 0.1,
        use_batch_norm: bool = True,
        use_layer_norm: bool = False,
        use_activation: bool = True,
        inject_covariates: bool = True,
        activation: type[nn.Module] = nn.ReLU,
        bias: bool = True,
    ):
        super().__init__()
        self.n_cont = n_cont
        self.inject_covariates = inject_covariates
        widths = [n_in] + [n_hidden] * (n_layers - 1) + [n_out]
        self.blocks = nn.ModuleList()
        for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            injected = i == 0 or inject_covariates
            block = nn.ModuleDict(
                {
                    "linear": CovariateLinear(
                        w_in + (n_cont if injected else 0),
                        w_out,
                        list(n_cat_list) if injected else [],
                        bias=bias,
                    )
                }
            )
            if use_batch_norm:
                block["batch_norm"] = nn.BatchNorm1d(w_out, momentum=0.01, eps=1e-3)
            if use_layer_norm:
                block["layer_norm"] = nn.LayerNorm(w_out, elementwise_affine=False)
            if use_activation:
                block["activation"] = activation()
            if dropout_rate > 0:
                block["dropout"] = nn.Dropout(p=dropout_rate)
            self.blocks.append(block)

    def forward(
        self,
        x: torch.Tensor | SparseRows,
        *cat_list: torch.Tensor,
        cont: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the stack on ``x`` of shape ``(cells, n_in)`` or ``(samples, cells, n_in)``.

        ``x`` may also be :class:`~cellvi.dataloaders.SparseRows` (inference on sparse counts):
        the first block's product then runs over the stored values only.
        """
        h = x
        for i, block in enumerate(self.blocks):
            injected = i == 0 or self.inject_covariates
            tail = None
            if injected and self.n_cont and cont is not None:
                tail = cont.expand(*h.shape[:-1], cont.shape[-1]) if len(h.shape) == 3 else cont
            h = block["linear"](h, cat_list if injected else [], tail)
            if "batch_norm" in block:
                if h.dim() == 3:  # (samples, cells, c) -> (samples*cells, c)
                    s, n, c = h.shape
                    h = block["batch_norm"](h.reshape(s * n, c)).reshape(s, n, c)
                else:
                    h = block["batch_norm"](h)
            for name in ("layer_norm", "activation", "dropout"):
                if name in block:
                    h = block[name](h)
        return h
