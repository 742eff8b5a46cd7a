"""User-facing models (thin classes over data managers, modules and training plans)."""

from ._launch import train_in_subprocess
from ._scanvi import SCANVI
from ._scvi import SCVI

__all__ = ["SCANVI", "SCVI", "train_in_subprocess"]
