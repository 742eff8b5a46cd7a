"""Global settings of cellvi: one typed object with a scoped override.

Values are read at the public boundary (``train``, loaders, inference) and passed down
explicitly, so no module deep inside the package consults global state on its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Settings", "settings"]

_VERBOSITY = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_PROGRESS_STYLES = ("rich", "tqdm", "plain", "none")


@dataclass
class Settings:
    """Process-wide defaults.

    Parameters
    ----------
    seed
        Seed for splits, samplers and parameter initialisation (default 0). ``None`` draws
        fresh randomness every call, which makes runs irreproducible. Assigning a seed also
        seeds torch's, NumPy's and Python's global generators (as scvi-tools does).
    verbosity
        Logging level name (``"debug"``, ``"info"``, ``"warning"``, ``"error"``), default
        ``"info"``. At ``"warning"`` and above, progress bars are off.
    batch_size
        Default minibatch size for training and inference (128).
    num_threads
        Torch intra-op threads; ``None`` keeps torch's choice.
    dl_num_workers
        Worker processes per data loader (0 = load in the main process, the fastest choice
        for in-memory data).
    dl_persistent_workers
        Keep loader workers alive between epochs.
    dl_chunk_size
        Disk-backed data: cells read in one contiguous block (512). Training shuffles whole
        blocks, then cells within the buffer.
    dl_buffer_size
        Disk-backed data: cells held in memory for shuffling (16,384; rounded to a whole
        number of minibatches). Memory grows with this, not with the data set.
    logging_dir
        Where training runs write history, checkpoints and logs (``./cellvi_log``).
    progress_bar_style
        ``"rich"`` (default) or ``"tqdm"``: one bar per run on a terminal, plain periodic
        lines when output is not a terminal; ``"plain"``: always the lines; ``"none"``.

    Examples
    --------
    >>> import cellvi
    >>> with cellvi.settings.override(batch_size=256):
    ...     cellvi.settings.batch_size
    256
    >>> cellvi.settings.batch_size
    128
    """

    seed: int | None = 0
    verbosity: str = "info"
    batch_size: int = 128
    num_threads: int | None = None
    dl_num_workers: int = 0
    dl_persistent_workers: bool = False
    dl_chunk_size: int = 512
    dl_buffer_size: int = 16_384
    logging_dir: Path = field(default_factory=lambda: Path("./cellvi_log"))
    progress_bar_style: str = "rich"

    def __setattr__(self, name: str, value) -> None:
        if name not in {f.name for f in dataclasses.fields(Settings)}:
            valid = ", ".join(f.name for f in dataclasses.fields(Settings))
            raise AttributeError(f"cellvi.settings has no setting {name!r}; valid: {valid}.")
        value = _validate(name, value)
        object.__setattr__(self, name, value)
        if name == "verbosity":
            logging.getLogger("cellvi").setLevel(_VERBOSITY[value])
        if name == "num_threads" and value is not None:
            import torch

            torch.set_num_threads(value)
        if name == "seed" and value is not None and self.__dict__.get("_ready"):
            _seed_everything(value)

    def __post_init__(self) -> None:
        # from now on an assigned seed also seeds the global generators (not at import)
        object.__setattr__(self, "_ready", True)

    @property
    def show_progress(self) -> bool:
        """Whether progress bars are drawn under the current verbosity and style."""
        return self.progress_bar_style != "none" and _VERBOSITY[self.verbosity] <= 20

    @contextlib.contextmanager
    def override(self, **values) -> Iterator[Settings]:
        """Temporarily change settings inside a ``with`` block."""
        old = {name: getattr(self, name) for name in values}
        try:
            for name, value in values.items():
                setattr(self, name, value)
            yield self
        finally:
            for name, value in old.items():
                setattr(self, name, value)


def _seed_everything(seed: int) -> None:
    """Seed torch (CPU and GPUs), NumPy's and Python's global generators, as scvi-tools'
    ``settings.seed`` does: unseeded draws (e.g. ``posterior_predictive_sample``) repeat."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _validate(name: str, value):
    if name == "verbosity":
        if isinstance(value, int):
            inverse = {v: k for k, v in _VERBOSITY.items()}
            if value not in inverse:
                raise ValueError(f"verbosity={value!r}: use one of {list(_VERBOSITY)}.")
            return inverse[value]
        if value not in _VERBOSITY:
            raise ValueError(f"verbosity={value!r}: use one of {list(_VERBOSITY)}.")
    elif name == "progress_bar_style" and value not in _PROGRESS_STYLES:
        raise ValueError(f"progress_bar_style={value!r}: use one of {list(_PROGRESS_STYLES)}.")
    elif name in {"batch_size", "dl_chunk_size", "dl_buffer_size"} and (
        not isinstance(value, int) or value < 1
    ):
        raise ValueError(f"{name}={value!r}: must be a positive integer.")
    elif name == "dl_num_workers" and (not isinstance(value, int) or value < 0):
        raise ValueError(f"dl_num_workers={value!r}: must be an integer >= 0.")
    elif name == "seed" and value is not None and not isinstance(value, int):
        raise ValueError(f"seed={value!r}: must be an integer or None.")
    elif name == "logging_dir":
        return Path(value)
    return value


settings = Settings()
