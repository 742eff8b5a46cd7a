"""Per-cell count log-likelihoods with hand-written gradients (the training hot path).

A training step of SCVI spends about half its time in the likelihood. These functions take
``log μ`` (no lossy ``log(exp(·))``), evaluate the log-gamma terms only at nonzero counts
(they cancel at zero) and reduce over genes inside the kernel.

On the CPU the elementwise work runs over blocks of cells small enough that a block's
temporaries stay in the core's L2 cache (:data:`BLOCK_BYTES`), mostly in place. A minibatch
of 128 x 2,000 float32 values is 1 MB a tensor, so whole-size temporaries would each go out
to L3 and back. While a block is in cache the forward pass also writes the partial
derivatives of every cell's log-likelihood (a cell's value depends only on its own row). The
backward pass then only scales them by the incoming per-cell gradient. Without gradients
(inference) the derivatives are skipped. The derivatives are written with ``θ/(θ+μ) = e^{-r}``
and ``μ/(θ+μ) = e^{m}``, where ``r = log(1 + μ/θ)`` and ``m = log(μ/(θ+μ))`` are already at
hand, so ``μ`` itself is never formed.

``log(θ / (θ + μ))`` is taken as ``-softplus(log μ - log θ)``: the difference of two
logarithms loses all its digits in float32 once ``θ`` is large against ``μ`` (a Poisson-like
gene), and ``log1p(μ / θ)`` overflows once ``θ`` is tiny against ``μ``.

The log-gamma terms at the nonzero counts: for whole-number counts and a per-gene ``θ`` on
the CPU they are read from per-gene tables of ``Σ_{j<k} log(θ + j) - log k!`` and
``Σ_{j<k} 1/(θ + j)`` for counts up to ``TABLE_COUNTS``, several times faster than
``lgamma``/``digamma`` at every nonzero. The few larger counts, and every nonzero otherwise,
use ``lgamma``/``digamma`` in float64 (in float32 their differences lose all their digits
once ``θ`` is large).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from ..errors import InvalidDataError

__all__ = ["zinb_log_likelihood", "nb_log_likelihood", "poisson_log_likelihood"]

TABLE_COUNTS = 32

# bytes of one (cells, genes) temporary of a block on the CPU. A 128-cell minibatch of 2,000
# float32 genes becomes four blocks of 32 cells; the dozen temporaries of a block, split
# between two threads, then stay in each core's L2 (1.25 MB here). On 2 cores
# (benchmarks/bench_kernels.py) 128 KiB blocks fall below torch's grain for two threads and
# the whole minibatch as one block spills to L3: both about 1.3x slower.
BLOCK_BYTES = 256 * 1024

# torch's softplus is linear above 20, dropping log1p(e^-u) ≈ 2e-9: multiplied by a count in
# x · (u - softplus(u)) = -x log1p(θ/μ) that is 1e-3 nats at x = 1e6 in float64; above 40 the
# dropped part is below float64 resolution (no extra cost: same kernel, later switch)
_SOFTPLUS_LINEAR = 40.0


_NUMPY_FLOATS = (torch.float32, torch.float64)


def _whole_numbers(values: torch.Tensor) -> bool:
    """Whether every value is a whole number that int64 holds exactly (NaN and inf are not);
    numpy's ``trunc`` is faster than torch's."""
    if not values.is_floating_point() or not len(values):
        return True
    if values.dtype in _NUMPY_FLOATS:
        array = values.numpy()
        return bool(np.array_equal(np.trunc(array), array) and array.max() < 2.0**53)
    return bool((values == values.trunc()).all() and values.max() < 2.0**53)


def _nonzeros(x: torch.Tensor):
    """Flat positions, rows and columns of the nonzero entries of ``(cells, genes)`` counts, in
    row-major order (numpy's ``flatnonzero`` on the CPU: about twice torch's speed)."""
    n_genes = x.shape[-1]
    if x.device.type == "cpu":
        flat_np = np.flatnonzero(x.detach().bool().reshape(-1).numpy())
        rows_np = flat_np // n_genes  # np.divmod is 4x slower
        return (torch.from_numpy(a) for a in (flat_np, rows_np, flat_np - rows_np * n_genes))
    flat = x.reshape(-1).nonzero().squeeze(1)
    rows = torch.div(flat, n_genes, rounding_mode="floor")
    return flat, rows, flat - rows * n_genes


def _gamma_terms(x: torch.Tensor, theta: torch.Tensor, flat, cols, need_grad: bool):
    """At the nonzero counts ``x_nz``: ``lgamma(x+θ) - lgamma(θ) - lgamma(x+1)`` and (with
    ``need_grad``) its θ-derivative ``ψ(x+θ) - ψ(θ)``, else None."""
    x_nz = x.reshape(-1).index_select(0, flat)
    theta = theta.detach()
    if x_nz.dtype != theta.dtype:  # e.g. float32 counts with a float64 model
        dtype = torch.promote_types(x_nz.dtype, theta.dtype)
        x_nz, theta = x_nz.to(dtype), theta.to(dtype)
    if theta.dim() == 1 and x.device.type == "cpu":
        if _whole_numbers(x_nz):
            return _from_tables(x_nz, x_nz.to(torch.int64), theta, cols, need_grad)
    # lgamma(x + θ) - lgamma(θ) cancels two numbers of size θ log θ: in float32 a large θ
    # (1e4: 1e-2 nats per count, 1e6: tens of nats per cell) leaves only rounding noise, and
    # so does ψ(x + θ) - ψ(θ) ≈ x / θ; the nonzeros are evaluated in float64 instead
    out_dtype = x_nz.dtype
    wide = out_dtype if x.device.type == "mps" else torch.float64  # no float64 on MPS
    x_nz = x_nz.to(wide)
    if theta.dim() == 1:
        theta = theta.to(wide)
        theta_nz = theta.index_select(0, cols)
        lg = torch.lgamma(x_nz + theta_nz) - torch.lgamma(x_nz + 1) - torch.lgamma(theta)[cols]
        dg = torch.digamma(x_nz + theta_nz) - torch.digamma(theta)[cols] if need_grad else None
    else:
        theta_nz = theta.reshape(-1).index_select(0, flat).to(wide)
        lg = torch.lgamma(x_nz + theta_nz) - torch.lgamma(x_nz + 1) - torch.lgamma(theta_nz)
        dg = torch.digamma(x_nz + theta_nz) - torch.digamma(theta_nz) if need_grad else None
    return lg.to(out_dtype), None if dg is None else dg.to(out_dtype)


def _from_tables(x_nz, counts, theta, cols, need_grad: bool):
    """:func:`_gamma_terms` for whole-number counts and a per-gene ``θ``: one gather per term
    from ``(k + 1, genes)`` tables, ``k`` the largest count up to ``TABLE_COUNTS``; counts
    beyond the table are patched in."""
    n_genes = theta.shape[0]
    top, low = (int(counts.max()), int(counts.min())) if len(counts) else (0, 0)
    if low < 0:  # would index before the tables' start
        raise InvalidDataError(
            f"The counts hold negative values (as low as {low}); counts must be "
            ">= 0. Was the registered matrix changed after setup_anndata? Register raw counts "
            "(setup_anndata(adata, layer='counts') if X was transformed)."
        )
    k = min(top, TABLE_COUNTS)
    steps = theta.double() + torch.arange(k, dtype=torch.float64).unsqueeze(1)  # θ + j
    log_fact = torch.lgamma(torch.arange(1, k + 2, dtype=torch.float64)).unsqueeze(1)
    idx = counts.clamp(max=k).mul_(n_genes).add_(cols)
    lg_table = torch.zeros(k + 1, n_genes, dtype=torch.float64)
    torch.cumsum(steps.log(), 0, out=lg_table[1:])
    lg = lg_table.sub_(log_fact).to(x_nz.dtype).reshape(-1).index_select(0, idx)
    dg = None
    if need_grad:
        dg_table = torch.zeros(k + 1, n_genes, dtype=torch.float64)
        torch.cumsum(steps.reciprocal(), 0, out=dg_table[1:])
        dg = dg_table.to(x_nz.dtype).reshape(-1).index_select(0, idx)
    if top > k:  # lgamma/digamma in float64 at the few counts beyond the table
        big = (counts > k).nonzero().squeeze(1)
        x_big = x_nz.index_select(0, big).double()
        theta_big = theta.double().index_select(0, cols.index_select(0, big))
        lg_big = torch.lgamma(x_big + theta_big) - torch.lgamma(theta_big)
        lg[big] = lg_big.sub_(torch.lgamma(x_big + 1)).to(lg.dtype)
        if need_grad:
            dg_big = torch.digamma(x_big + theta_big).sub_(torch.digamma(theta_big))
            dg[big] = dg_big.to(dg.dtype)
    return lg, dg


def _add_to_rows(ll: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
    """``ll[r] += Σ values`` over the entries of row ``r``; ``rows`` sorted. On the CPU as
    numpy's segment sums (several times faster than ``index_add_``, which serialises on the
    few rows)."""
    if ll.device.type != "cpu" or not len(rows) or values.dtype not in _NUMPY_FLOATS:
        ll.index_add_(0, rows, values)
        return
    rows_np = rows.numpy()
    starts = np.searchsorted(rows_np, np.arange(len(ll)))
    filled = np.diff(starts, append=len(rows_np)) > 0  # reduceat misreads empty segments
    with np.errstate(all="ignore"):  # NaN/inf pass through, as in torch (the guardrail's)
        sums = np.add.reduceat(values.numpy(), starts[filled])
    ll[torch.from_numpy(filled)] += torch.from_numpy(sums)


def _add_gamma_terms(x, theta, ll, d_theta):
    """Adds the log-gamma terms of the nonzero counts to ``ll`` (per cell) and their
    θ-derivatives to ``d_theta`` (per entry; None: not wanted)."""
    flat, rows, cols = _nonzeros(x)
    lg, dg = _gamma_terms(x, theta, flat, cols, d_theta is not None)
    _add_to_rows(ll, rows, lg.to(ll.dtype))
    if d_theta is not None:
        d_theta.view(-1).index_add_(0, flat, dg.to(d_theta.dtype))


def _blocks(n_cells: int, n_genes: int, dtype: torch.dtype, device: torch.device):
    if device.type != "cpu":  # one launch per operation beats cache-sized blocks there
        return [slice(0, n_cells)]
    step = max(1, BLOCK_BYTES // max(1, n_genes * dtype.itemsize))
    return [slice(i, min(i + step, n_cells)) for i in range(0, n_cells, step)]


def _nb_block(x, log_mu, theta, log_theta, logits, ll, d_log_mu, d_theta, d_logits):
    """One block of cells: the log-likelihood without its log-gamma terms into ``ll`` and, where
    the output tensors are given, the per-entry partial derivatives. ``logits`` None: NB."""
    u = torch.sub(log_mu, log_theta)  # log(μ/θ)
    r = F.softplus(u, threshold=_SOFTPLUS_LINEAR)  # log(1 + μ/θ)
    m = u.sub_(r)  # log(μ/(θ+μ))
    if logits is None:
        dense = torch.mul(theta, r).neg_().addcmul_(x, m)
        s = None
    else:
        a = torch.addcmul(logits, theta, r).neg_()  # θ log(θ/(θ+μ)) - logits
        softplus_a = F.softplus(a)
        log_sig_a = a.sub_(softplus_a)  # log σ(a)
        softplus_w = F.softplus(logits)
        nonzero = torch.sign(x)  # counts are ≥ 0
        # zero: log(σ(w) + σ(-w) e^{a+w}) = softplus(a) - softplus(-w); else log σ(-w) + NB
        dense = softplus_a.sub_(softplus_w).add_(logits)
        dense.addcmul_(nonzero, log_sig_a).addcmul_(x, m)
    torch.sum(dense, -1, out=ll)
    if d_log_mu is None and d_theta is None:
        return
    if logits is not None:
        # the NB part's weight: 1 at a nonzero count, P(NB zero | zero) = σ(a) at a zero
        s = torch.maximum(log_sig_a.exp_(), nonzero)
    e_m = m.exp_()  # μ/(θ+μ)
    d_t = torch.sub(e_m, r) if d_theta is not None else None
    x_frac = r.neg_().exp_().mul_(x)  # x θ/(θ+μ)
    if d_log_mu is not None:  # θ (x - s μ)/(θ+μ)
        e_m = e_m.mul_(theta) if s is None else e_m.mul_(theta).mul_(s)
        torch.sub(x_frac, e_m, out=d_log_mu)
    if d_logits is not None:  # σ(-w) - s
        torch.sub(softplus_w.neg_().exp_(), s, out=d_logits)
    if d_t is not None:  # s (μ/(θ+μ) - log(1 + μ/θ)) - x/(θ+μ)
        if s is not None:
            d_t.mul_(s)
        torch.sub(d_t, x_frac.div_(theta), out=d_theta)


def _likelihood(x, log_mu, theta, logits, want_mu: bool, want_theta: bool):
    """Per-cell log-likelihoods and the wanted per-entry partial derivatives (else None):
    ``(ll, d log_mu, d θ, d logits)``."""
    tensors = [t for t in (x, log_mu, theta, logits) if t is not None]
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    n_cells, n_genes = x.shape
    ll = torch.empty(n_cells, dtype=dtype, device=x.device)

    def full(wanted):
        return torch.empty(x.shape, dtype=dtype, device=x.device) if wanted else None

    d_mu, d_t, d_w = full(want_mu), full(want_theta), full(want_mu and logits is not None)
    theta = theta.detach()
    log_theta = theta.log()
    per_cell = theta.dim() == 2
    for b in _blocks(n_cells, n_genes, dtype, x.device):
        _nb_block(
            x[b],
            log_mu[b],
            theta[b] if per_cell else theta,
            log_theta[b] if per_cell else log_theta,
            None if logits is None else logits[b],
            ll[b],
            *(None if t is None else t[b] for t in (d_mu, d_t, d_w)),
        )
    _add_gamma_terms(x, theta, ll, d_t)
    return ll, d_mu, d_t, d_w


class _CountLikelihood(torch.autograd.Function):
    """``log_mu``, ``theta`` and ``logits`` (None for NB) → per-cell log-likelihood."""

    @staticmethod
    def forward(ctx, x, log_mu, theta, logits):
        want_mu = ctx.needs_input_grad[1] or (logits is not None and ctx.needs_input_grad[3])
        ll, d_mu, d_t, d_w = _likelihood(
            x,
            log_mu.detach(),
            theta,
            None if logits is None else logits.detach(),
            want_mu,
            ctx.needs_input_grad[2],
        )
        ctx.save_for_backward(d_mu, d_t, d_w)
        ctx.theta_per_gene = theta.dim() == 1
        return ll

    @staticmethod
    def backward(ctx, grad):
        d_mu, d_t, d_w = ctx.saved_tensors
        g = grad.unsqueeze(-1)
        needs = ctx.needs_input_grad
        grad_mu = d_mu * g if needs[1] else None
        grad_w = d_w * g if d_w is not None and needs[3] else None
        grad_theta = None
        if needs[2]:
            grad_theta = grad @ d_t if ctx.theta_per_gene else d_t * g
        return None, grad_mu, grad_theta, grad_w


def _apply(x, log_mu, theta, logits):
    """Broadcasts to ``(..., genes)``, flattens the leading axes and runs the kernel (with
    autograd only where a gradient is wanted)."""
    shape = torch.broadcast_shapes(
        x.shape,
        log_mu.shape,
        *(() if logits is None else (logits.shape,)),
        theta.shape if theta.dim() > 1 else theta.shape[-1:],
    )
    n_genes = shape[-1]

    def rows(t):
        return t.expand(shape).reshape(-1, n_genes)

    x, log_mu = rows(x.detach()), rows(log_mu)  # no gradient flows to the counts
    theta = rows(theta) if theta.dim() > 1 else theta.expand(n_genes)
    logits = None if logits is None else rows(logits)
    inputs = [t for t in (log_mu, theta, logits) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        ll = _CountLikelihood.apply(x, log_mu, theta, logits)
    else:
        ll = _likelihood(x, log_mu, theta, logits, False, False)[0]
    return ll.reshape(shape[:-1])


def zinb_log_likelihood(
    x: torch.Tensor, log_mu: torch.Tensor, theta: torch.Tensor, zi_logits: torch.Tensor
) -> torch.Tensor:
    """``Σ_g log ZINB(x_ng; e^{log_mu}, θ, logits)`` per cell, shape ``(cells,)``.

    ``x``, ``log_mu``, ``zi_logits``: ``(cells, genes)``; ``theta``: ``(genes,)`` or
    ``(cells, genes)``.
    """
    return _apply(x, log_mu, theta, zi_logits)


def nb_log_likelihood(x: torch.Tensor, log_mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``Σ_g log NB(x_ng; e^{log_mu}, θ)`` per cell, shape ``(cells,)``."""
    return _apply(x, log_mu, theta, None)


def poisson_log_likelihood(x: torch.Tensor, log_mu: torch.Tensor) -> torch.Tensor:
    """``Σ_g log Poisson(x_ng; e^{log_mu})`` per cell; ``lgamma(x+1)`` only at nonzeros."""
    flat, rows, _ = _nonzeros(x)
    dense = (x * log_mu - log_mu.exp()).sum(-1)
    return dense.index_add(0, rows, -torch.lgamma(x.reshape(-1).index_select(0, flat) + 1))
