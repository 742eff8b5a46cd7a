"""One rank of a :func:`~cellvi.model._launch.train_in_subprocess` run (started by
``torchrun -m cellvi.model._ddp_rank <folder>``; not imported by the package)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def _main(folder: str) -> None:
    """Load the saved model, train it with ``strategy="ddp"``; rank 0 saves the result."""
    import cellvi

    folder_path = Path(folder)
    job = json.loads((folder_path / "job.json").read_text())
    rank = int(os.environ.get("RANK", "0"))
    try:
        _train(cellvi, folder_path, job, rank)
    except BaseException as err:  # the launching session shows this, not torchrun's summary
        (folder_path / f"error_rank{rank}.txt").write_text(f"{type(err).__name__}: {err}")
        raise


def _train(cellvi, folder_path: Path, job: dict, rank: int) -> None:
    with cellvi.settings.override(**job["settings"]):
        cls = getattr(cellvi.model, job["model_class"])
        model = cls.load(folder_path / "in")
        model.train(
            accelerator=job["accelerator"], devices=job["devices"], strategy="ddp", **job["train"]
        )
        if rank == 0:
            model.save(folder_path / "out", save_optimizer_state=True)


if __name__ == "__main__":
    _main(sys.argv[1])
