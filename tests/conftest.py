"""Shared fixtures: small simulated data sets with fixed seeds."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The real datasets beside the checkout; tests using them skip in a user's clone."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent (only present in the development checkout)")
    return SHARED_DATA
