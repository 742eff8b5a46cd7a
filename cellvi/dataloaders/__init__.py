"""Splitting and loading: contiguous tensor stores, seeded batch samplers, data modules."""

from ._loader import StoreDataset, make_dataloader
from ._samplers import BatchIndexSampler
from ._semisupervised import LabeledStream, SemiSupervisedDataSplitter
from ._splitter import DataSplitter, split_sizes
from ._tensors import CSRTensor, TensorStore

__all__ = [
    "BatchIndexSampler",
    "CSRTensor",
    "DataSplitter",
    "LabeledStream",
    "SemiSupervisedDataSplitter",
    "StoreDataset",
    "TensorStore",
    "make_dataloader",
    "split_sizes",
]
