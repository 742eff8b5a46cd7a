"""User-facing models (thin classes over data managers, modules and training plans)."""

from ._scanvi import SCANVI
from ._scvi import SCVI

__all__ = ["SCANVI", "SCVI"]
