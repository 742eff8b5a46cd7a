"""The field list shared by SCVI-family setups and data modules."""

from __future__ import annotations

from .._constants import REGISTRY_KEYS
from ._fields import (
    BaseField,
    CategoricalObsField,
    LabelsWithUnlabeledObsField,
    LayerField,
)
from ._joint_fields import CategoricalJointObsField, NumericalJointObsField
from ._numeric_field import NumericalObsField

__all__ = ["standard_fields"]

_K = REGISTRY_KEYS


def standard_fields(setup_args: dict) -> list[BaseField]:
    """Counts, batch, labels, size factors and covariates, as ``setup_args`` names them.

    Labels are semi-supervised (an unlabeled category with the highest code) when
    ``setup_args`` holds ``unlabeled_category``.

    Examples
    --------
    >>> [f.registry_key for f in standard_fields({"batch_key": "b"})]
    ['X', 'batch', 'labels', 'size_factor', 'extra_categorical_covs', 'extra_continuous_covs']
    """
    if "unlabeled_category" in setup_args:
        labels = LabelsWithUnlabeledObsField(
            _K.LABELS_KEY, setup_args["labels_key"], setup_args["unlabeled_category"]
        )
    else:
        labels = CategoricalObsField(_K.LABELS_KEY, setup_args.get("labels_key"))
    size_factor_key = setup_args.get("size_factor_key")
    return [  # with size factors the library is log(size factor): zero-count cells are valid
        LayerField(
            _K.X_KEY,
            setup_args.get("layer"),
            is_count_data=True,
            allow_empty_rows=size_factor_key is not None,
        ),
        CategoricalObsField(_K.BATCH_KEY, setup_args.get("batch_key")),
        labels,
        NumericalObsField(_K.SIZE_FACTOR_KEY, size_factor_key, positive=True),
        CategoricalJointObsField(_K.CAT_COVS_KEY, setup_args.get("categorical_covariate_keys")),
        NumericalJointObsField(_K.CONT_COVS_KEY, setup_args.get("continuous_covariate_keys")),
    ]
