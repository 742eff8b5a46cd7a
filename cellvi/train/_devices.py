"""Device requests checked before any process starts."""

from __future__ import annotations

import os

import torch

__all__ = ["check_devices", "device_count"]


def device_count(accelerator, devices) -> int | None:
    """How many processes ``devices`` asks Lightning for; None when it leaves that to
    Lightning (``"auto"``)."""
    if isinstance(devices, list | tuple):
        return len(devices)
    if isinstance(devices, str) and devices.isdigit():
        return int(devices)
    if devices == -1 and accelerator in ("gpu", "cuda", "auto"):
        return torch.cuda.device_count()
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        return devices
    return None


def check_devices(accelerator, devices) -> None:
    """Refuse device requests that cannot be met, before any process starts."""
    count = device_count(accelerator, devices)
    if isinstance(accelerator, str):
        _check_accelerator_name(accelerator)
    if accelerator in ("gpu", "cuda"):
        available = torch.cuda.device_count()
        if available == 0:
            raise ValueError(
                f"accelerator={accelerator!r} but this machine has no CUDA device; use "
                "accelerator='cpu' (or 'auto')."
            )
        if count is not None and count > available:
            raise ValueError(
                f"devices={devices!r} asks for {count} GPUs but {available} exist; use "
                f"devices={available} or devices=-1 (all)."
            )
    elif accelerator == "cpu" and count is not None and count > (os.cpu_count() or 1):
        raise ValueError(
            f"devices={devices!r} asks for {count} CPU processes but the machine has "
            f"{os.cpu_count()} cores; use at most that many."
        )


_ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")


def _check_accelerator_name(accelerator: str) -> None:
    """A known accelerator whose backend this machine has (Lightning would otherwise fail
    inside its Trainer, after the run folder exists)."""
    import importlib.util

    if accelerator not in _ACCELERATORS:
        raise ValueError(
            f"accelerator={accelerator!r} is not one of {', '.join(map(repr, _ACCELERATORS))}; "
            "'auto' picks a GPU when there is one."
        )
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise ValueError(
            "accelerator='mps' but this machine has no Apple-silicon GPU; use accelerator="
            "'cpu' (or 'auto')."
        )
    if accelerator == "tpu" and importlib.util.find_spec("torch_xla") is None:
        raise ValueError(
            "accelerator='tpu' needs torch_xla, which is not installed; use accelerator='cpu' "
            "(or 'auto')."
        )
