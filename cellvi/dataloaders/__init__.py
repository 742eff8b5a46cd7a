"""Splitting and loading: contiguous tensor stores, seeded batch samplers, data modules."""

from ._anndataloader import AnnDataLoader
from ._blocks import BlockShuffleSampler, BufferedStoreDataset
from ._datamodule import AnnDataModule, InferenceLoader, SomaDataModule
from ._loader import StoreDataset, make_dataloader
from ._samplers import BatchIndexSampler
from ._semisupervised import LabeledStream, SemiSupervisedDataSplitter
from ._sparse import SparseRows
from ._splitter import DataSplitter, split_sizes
from ._tensors import CSRTensor, DiskRows, TensorStore

__all__ = [
    "AnnDataLoader",
    "AnnDataModule",
    "InferenceLoader",
    "SomaDataModule",
    "BatchIndexSampler",
    "BlockShuffleSampler",
    "BufferedStoreDataset",
    "DiskRows",
    "CSRTensor",
    "DataSplitter",
    "LabeledStream",
    "SemiSupervisedDataSplitter",
    "SparseRows",
    "StoreDataset",
    "TensorStore",
    "make_dataloader",
    "split_sizes",
]
