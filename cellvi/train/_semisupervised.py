"""Semi-supervised training plan: ELBO on all cells + classification on labeled cells."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .._constants import REGISTRY_KEYS
from ._config import TrainingPlanConfig
from ._plan import TrainingPlan

__all__ = ["SemiSupervisedTrainingPlan"]

_N_BINS = 10  # calibration-error bins


class SemiSupervisedTrainingPlan(TrainingPlan):
    """:class:`TrainingPlan` for SCANVI: adds ``classification_ratio`` × cross-entropy.

    Training steps receive ``{"full": batch, "labeled": batch}`` (or a plain batch when no
    cell is labeled). ``train_loss`` is the optimised loss, ELBO plus
    ``classification_ratio`` × cross-entropy (``validation_loss`` and the ELBO metrics have
    no classification term). Logged per epoch, besides the ELBO metrics:
    ``train_classification_loss``, ``train_accuracy``, ``train_f1_score`` (micro-averaged,
    equal to accuracy for single-label classes), ``train_calibration_error`` (expected
    calibration error over 10 confidence bins) and their ``validation_`` twins (computed on
    the labeled cells of the validation set).

    Parameters
    ----------
    module
        A :class:`~cellvi.module.SCANVAE`.
    config
        Optimiser and warm-up settings.
    classification_ratio
        Weight of the classification loss (50).
    n_classes
        Number of label classes (the unlabeled code is ``n_classes``).
    batch_categories
        Batch names for error messages.
    """

    CLASS_STEMS = ("classification_loss", "accuracy", "f1_score", "calibration_error")

    def __init__(
        self,
        module,
        config: TrainingPlanConfig | None = None,
        *,
        classification_ratio: float = 50.0,
        n_classes: int,
        batch_categories: list | None = None,
    ):
        super().__init__(module, config, batch_categories=batch_categories)
        self.classification_ratio = classification_ratio
        self.n_classes = n_classes
        self._class_stats: dict[str, torch.Tensor] = {}
        self._labeled_in: dict[str, bool] = {}  # per split, set by observe_split

    def metric_names(self, *, validation: bool) -> list[str]:
        names = super().metric_names(validation=validation)
        splits = ["train", "validation"] if validation else ["train"]
        for split in splits:
            if self._labeled_in.get(split, True):
                names += [f"{split}_{m}" for m in self.CLASS_STEMS]
        return names

    def observe_split(self, datamodule) -> None:
        """Classification metrics of a split are logged only if it has labeled cells."""
        mask = getattr(datamodule, "labeled_mask", None)
        if mask is None:
            return
        for split in ("train", "validation"):
            idx = getattr(datamodule, "train_idx" if split == "train" else "val_idx", None)
            if idx is not None:
                self._labeled_in[split] = bool(mask[idx].any())

    def why_not_logged(self, metric: str) -> str:
        split = "validation" if metric.startswith("validation_") else "train"
        if metric in {f"{split}_{m}" for m in self.CLASS_STEMS} and not self._labeled_in.get(
            split, True
        ):
            return f" The {split} set has no labeled cells, so it has no classification metrics."
        return ""

    def _classification(self, split: str, batch: dict) -> torch.Tensor | None:
        labels = batch[REGISTRY_KEYS.LABELS_KEY].reshape(-1)
        keep = labels < self.n_classes
        if not bool(keep.any()):
            return None
        sub = {k: v[keep] for k, v in batch.items()}
        logits = self.module.classify(sub)
        y = labels[keep]
        ce = F.cross_entropy(logits, y)
        with torch.no_grad():
            probs = logits.softmax(-1)
            conf, pred = probs.max(-1)
            correct = (pred == y).to(conf.dtype)
            bins = torch.clamp((conf * _N_BINS).long(), max=_N_BINS - 1)
            hist = torch.zeros(3, _N_BINS, dtype=conf.dtype, device=logits.device)
            hist[0].index_add_(0, bins, torch.ones_like(conf))
            hist[1].index_add_(0, bins, conf)
            hist[2].index_add_(0, bins, correct)
            row = torch.cat(
                [
                    torch.stack(
                        [
                            ce.detach() * len(y),
                            correct.sum(),
                            torch.tensor(float(len(y)), device=y.device),
                        ]
                    ),
                    hist.reshape(-1),
                ]
            )
        self._class_stats[split] = self._class_stats.get(split, 0) + row
        return ce

    def training_step(self, batch, batch_idx):
        full = batch["full"] if "full" in batch else batch
        loss = super().training_step(full, batch_idx)
        if "labeled" in batch:
            ce = self._classification("train", batch["labeled"])
            if ce is not None:
                term = self.classification_ratio * ce
                loss = loss + term
                # ``train_loss`` is the minibatch loss that is optimised (as in scvi-tools,
                # whose SCANVAE loss includes the classification term); the ELBO metrics
                # stay without it
                n_cells = len(full[REGISTRY_KEYS.X_KEY])
                self._stats["train"][0] += term.detach().to(self._stats["train"].dtype) * n_cells
        return loss

    def on_train_batch_start(self, batch, batch_idx):
        super().on_train_batch_start(batch["full"] if "full" in batch else batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        with torch.no_grad():
            self._classification("validation", batch)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._class_stats.pop("train", None)

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._class_stats.pop("validation", None)

    def _epoch_metrics(self, split: str, n_obs_split: int | None) -> dict[str, float]:
        metrics = super()._epoch_metrics(split, n_obs_split)
        stats = self._class_stats.get(split)
        if not metrics:
            return metrics
        if self.trainer is not None and self.trainer.world_size > 1:
            # every rank joins the sum, also one whose cells held no label (its share of the
            # validation set is its own), or the others would wait for it
            if stats is None:
                weight = next(self.module.parameters())
                stats = torch.zeros(3 + 3 * _N_BINS, dtype=weight.dtype, device=weight.device)
            stats = self.trainer.strategy.reduce(stats.clone(), reduce_op="sum")
        if stats is None or float(stats[2]) == 0:
            return metrics
        stats = stats.cpu()
        ce_sum, correct, n = (float(v) for v in stats[:3])
        count, conf, right = stats[3:].reshape(3, _N_BINS)
        ece = float((conf - right).abs().sum() / max(n, 1))
        metrics.update(
            {
                f"{split}_classification_loss": ce_sum / n,
                f"{split}_accuracy": correct / n,
                f"{split}_f1_score": correct / n,
                f"{split}_calibration_error": ece,
            }
        )
        return metrics
