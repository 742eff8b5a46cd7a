"""Minibatch rows of a CSR count matrix kept sparse, for the encoder's first product."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["SparseRows"]

# On a CPU the sparse product runs over blocks of 64 output columns: fbgemm's embedding_bag
# sums 64-float rows 1.3-1.4x faster per value than 128-float ones (500-20,000 genes, 3-31%
# nonzero; ``benchmarks/bench_sparse_product.py``), enough to pay for a second pass over the
# indices. On a GPU the product stays one pass: the blocking was measured on CPUs only.
CPU_BAG_COLUMNS = 64

# a weight's column blocks, kept for the minibatches of one output call (inside
# :func:`cached_blocks`): inference multiplies every minibatch by the same first-layer weight
# (copying its blocks cost 4 % of a latent pass). Not across calls: torch's fused optimisers
# update weights without bumping their version counters, so a cache kept from one call to
# the next would serve weights from before the training in between.
# (keyed by id: tensors compare elementwise, so they cannot be dictionary keys themselves)
_BLOCKS: dict[int, tuple] = {}
_CACHING = [0]  # depth of open cached_blocks() scopes


@contextlib.contextmanager
def cached_blocks():
    """Reuse a weight's column blocks across the minibatches of the enclosed call; forget
    them when the outermost such scope closes."""
    _CACHING[0] += 1
    try:
        yield
    finally:
        _CACHING[0] -= 1
        if not _CACHING[0]:
            _BLOCKS.clear()


class SparseRows:
    """Rows of a CSR matrix as torch tensors: stored ``values``, their column ``indices`` and the
    row ``offsets`` (``n_rows + 1`` entries, ``offsets[0] == 0``).

    Inference hands these to the encoder instead of a dense ``(cells, genes)`` block: the
    first layer's product ``rows @ W`` runs over the stored values only (an ``embedding_bag``
    sum, a vectorised sparse-times-dense kernel), and ``log1p`` touches the stored values only
    (``log1p(0) = 0`` keeps the zeros implicit). Nothing of shape ``(cells, genes)`` is built.

    Parameters
    ----------
    values
        Stored values, shape ``(nnz,)``: float32, or integer counts (read as float32 by every
        product and view, so integer storage is never copied whole).
    indices
        Column of each stored value, int32 or int64 (the same dtype as ``offsets``).
    offsets
        Start of each row in ``values`` plus the end of the last row, shape ``(n_rows + 1,)``.
    n_cols
        Number of columns of the matrix.

    Examples
    --------
    >>> import torch
    >>> rows = SparseRows(torch.tensor([2.0, 3.0, 1.0]), torch.tensor([0, 2, 1]),
    ...                   torch.tensor([0, 2, 3]), n_cols=3)
    >>> rows.to_dense().tolist()
    [[2.0, 0.0, 3.0], [0.0, 1.0, 0.0]]
    >>> rows.row_sums().ravel().tolist()
    [5.0, 1.0]
    """

    __slots__ = ("values", "indices", "offsets", "shape")

    def __init__(
        self, values: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor, n_cols: int
    ):
        if indices.dtype != offsets.dtype:
            indices, offsets = indices.long(), offsets.long()
        if values.shape != indices.shape or offsets.dim() != 1 or len(offsets) == 0:
            raise ValueError(
                f"SparseRows needs values and indices of one shape and 1-D offsets; got "
                f"{tuple(values.shape)}, {tuple(indices.shape)} and {tuple(offsets.shape)}."
            )
        self.values = values
        self.indices = indices
        self.offsets = offsets
        self.shape = (len(offsets) - 1, int(n_cols))

    @property
    def device(self) -> torch.device:
        return self.values.device

    def to(self, device, non_blocking: bool = False) -> SparseRows:
        """The same rows on ``device``."""
        values, indices, offsets = (
            t.to(device, non_blocking=non_blocking)
            for t in (self.values, self.indices, self.offsets)
        )
        return SparseRows(values, indices, offsets, self.shape[1])

    def map_values(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> SparseRows:
        """Apply an elementwise ``fn`` with ``fn(0) == 0`` (e.g. ``torch.log1p``) to the values
        (integer values are made float32 first: a cast then ``log1p`` is faster than
        ``log1p`` of integers)."""
        values = self.values.to(self._float_dtype)
        return SparseRows(fn(values), self.indices, self.offsets, self.shape[1])

    def row_sums(self) -> torch.Tensor:
        """Sum of each row, shape ``(n_rows, 1)``."""
        ones = torch.ones(self.shape[1], 1, dtype=self._float_dtype, device=self.device)
        return self._bag(ones)

    def linear(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        tail: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[rows, tail] @ weight.T + bias`` as in :func:`torch.nn.functional.linear`.

        ``weight`` has shape ``(n_out, n_cols + tail columns)``; its first ``n_cols`` columns
        multiply the sparse rows, the rest the dense ``tail`` (e.g. continuous covariates).
        """
        n = self.shape[1]
        expected = n + (0 if tail is None else tail.shape[-1])
        if weight.shape[1] != expected:
            raise ValueError(f"weight has {weight.shape[1]} input columns, expected {expected}.")
        out = self._bag(weight[:, :n].t(), owner=weight)
        if bias is not None:
            out = out.add_(bias)
        if tail is not None:
            out = out.addmm_(tail, weight[:, n:].t())
        return out

    def to_dense(self) -> torch.Tensor:
        """The rows as a dense ``(n_rows, n_cols)`` tensor."""
        out = torch.zeros(self.shape, dtype=self._float_dtype, device=self.device)
        lengths = (self.offsets[1:] - self.offsets[:-1]).long()
        rows = torch.repeat_interleave(torch.arange(self.shape[0], device=self.device), lengths)
        out[rows, self.indices.long()] = self.values.to(out.dtype)
        return out

    @property
    def _float_dtype(self) -> torch.dtype:
        return self.values.dtype if self.values.is_floating_point() else torch.float32

    def _bag(self, table: torch.Tensor, owner: torch.Tensor | None = None) -> torch.Tensor:
        """``Σ_j values[j] * table[indices[j]]`` per row: the sparse rows times ``table``
        (``(n_cols, k)``, any strides; on a CPU in blocks of ``CPU_BAG_COLUMNS`` columns).
        ``table`` is a view of ``owner``, under which its blocks are cached when no gradient
        flows."""
        if self.shape[0] == 0 or table.shape[1] == 0:
            return table.new_zeros(self.shape[0], table.shape[1])
        weights = self.values.to(table.dtype)
        outs = [
            F.embedding_bag(
                self.indices,
                block,
                self.offsets,
                mode="sum",
                per_sample_weights=weights,
                include_last_offset=True,
            )
            for block in _column_blocks(table, owner)
        ]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def _column_blocks(table: torch.Tensor, owner: torch.Tensor | None) -> list[torch.Tensor]:
    """``table`` as contiguous blocks of columns, cached under ``owner`` (the tensor it views)
    until ``owner`` changes in place or the table's shape changes."""
    width = CPU_BAG_COLUMNS if table.device.type == "cpu" else table.shape[1]
    # (an inference-mode tensor has no version counter to tell a change)
    cacheable = _CACHING[0] > 0 and owner is not None and not owner.is_inference()
    cacheable = cacheable and not (torch.is_grad_enabled() and owner.requires_grad)
    state = (owner._version, tuple(table.shape), table.stride()) if cacheable else None
    if cacheable:
        ref, cached_state, blocks = _BLOCKS.get(id(owner), (None, None, None))
        if ref is not None and ref() is owner and cached_state == state:
            return blocks
    blocks = [
        table[:, start : start + width].contiguous() for start in range(0, table.shape[1], width)
    ]
    if cacheable:
        key = id(owner)
        forget = weakref.ref(owner, lambda _, key=key: _BLOCKS.pop(key, None))
        _BLOCKS[key] = (forget, state, blocks)
    return blocks
