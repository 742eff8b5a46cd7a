"""Registry keys shared by data registration, loaders and modules."""

from __future__ import annotations

from typing import Final

__all__ = ["REGISTRY_KEYS", "CELLVI_PREFIX"]

CELLVI_PREFIX: Final = "_cellvi_"


class _RegistryKeys:
    """Names of the tensors in a minibatch (and of the registry's fields)."""

    X_KEY: Final = "X"
    BATCH_KEY: Final = "batch"
    LABELS_KEY: Final = "labels"
    SIZE_FACTOR_KEY: Final = "size_factor"
    CAT_COVS_KEY: Final = "extra_categorical_covs"
    CONT_COVS_KEY: Final = "extra_continuous_covs"
    INDICES_KEY: Final = "ind_x"


REGISTRY_KEYS = _RegistryKeys()
