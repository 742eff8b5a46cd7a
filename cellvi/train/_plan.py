"""The training plan: optimiser, KL warm-up, per-epoch ELBO metrics, NaN guardrail."""

from __future__ import annotations

import copy
import logging
import math

import lightning.pytorch as pl
import torch

from .._constants import REGISTRY_KEYS
from ..errors import NonFiniteLossError
from ..module import LossOutput
from ._checks import check_loss_kwargs
from ._config import TrainingPlanConfig
from ._optim import continue_optimizer, module_settings, without_aliases

__all__ = ["TrainingPlan"]

logger = logging.getLogger("cellvi")

# Sums kept per split during an epoch: loss x cells, reconstruction, kl_local, kl_global,
# minibatches, cells (summed across ranks under DDP, so every ratio is over all cells)
_N_STATS = 6


class TrainingPlan(pl.LightningModule):
    """Trains a cellvi module with the ELBO; owns the optimiser, KL warm-up and metrics.

    Metrics are accumulated on the device during an epoch (no per-step logging, no host
    synchronisation beyond the finiteness check) and logged once per epoch under the names of
    ``training.md`` §3: ``train_loss``, ``elbo_train``, ``reconstruction_loss_train``,
    ``kl_local_train``, ``kl_global_train``, ``kl_weight`` and their ``_validation`` twins.

    Parameters
    ----------
    module
        A cellvi module whose ``forward(tensors, kl_weight)`` returns a ``LossOutput``.
    config
        Optimiser and warm-up settings.
    batch_categories
        Names of the batch categories (used to describe a minibatch in error messages).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        config: TrainingPlanConfig | None = None,
        *,
        batch_categories: list | None = None,
    ):
        super().__init__()
        self.module = module
        self.config = config or TrainingPlanConfig()
        check_loss_kwargs(module, self.config.loss_kwargs)
        self.batch_categories = batch_categories
        self.n_obs_training: int | None = None
        self.n_obs_validation: int | None = None
        self.history_rows: list[dict] = []
        self.step_rows: list[dict] = []  # with ``on_step``: the loss of every training step
        self._stats: dict[str, torch.Tensor] = {}  # per split: summed loss terms
        self._counts: dict[str, list[int]] = {}  # per split: minibatches, cells
        self._trainable: list[torch.nn.Parameter] = []
        self.trained_on: torch.device | None = None
        self._val_row: dict[str, float] = {}
        self._last_good_state = None
        self._last_good_rows = (0, 0)  # (history rows, step rows) that go with that state
        self._current_batch: dict = {}
        self._current_batch_idx = -1
        self.lr_scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau | None = None
        self._lr_scheduler_state: dict | None = None  # from a resume checkpoint
        self.resumed_rows: tuple[int, int] | None = None  # history rows a checkpoint brought
        # train(resume=True): the optimiser state and the epochs/steps of earlier training
        self._continued_state: dict | None = None
        self._offsets = (0, 0)
        # at the last snapshot: the optimiser's state (CPU copy) and (epochs, steps) trained
        self.last_good_optimizer_state: dict | None = None
        self.progress: tuple[int, int] | None = None
        # the learning rate joins the history (``lr-<optimizer>``) when asked or scheduled
        self.log_learning_rate = bool(self.config.reduce_lr_on_plateau)
        self._compiled = bool(self.config.compile)
        self._compiled_size: int | None = None
        forward = (
            torch.compile(module, **{"dynamic": False, **(self.config.compile_kwargs or {})})
            if self._compiled
            else module
        )
        # not a registered submodule: the module's tensors belong to ``module`` alone, so
        # checkpoints of compiled and eager runs have the same names and resume either way
        object.__setattr__(self, "_forward", forward)

    METRIC_STEMS = ("elbo", "reconstruction_loss", "kl_local", "kl_global")

    def metric_names(self, *, validation: bool) -> list[str]:
        """Names this plan logs per epoch (with ``validation``, the validation ones too)."""
        names = ["train_loss", *(f"{m}_train" for m in self.METRIC_STEMS), "kl_weight"]
        if validation:
            names += ["validation_loss", *(f"{m}_validation" for m in self.METRIC_STEMS)]
        return names

    def observe_split(self, datamodule) -> None:
        """Called by the runner with the set-up data module, before training."""

    def why_not_logged(self, metric: str) -> str:
        """A sentence on why ``metric`` is missing from :meth:`metric_names` (or "")."""
        return ""

    def continue_from(self, optimizer_state: dict, epochs: int, steps: int) -> None:
        """Start from an earlier training's optimiser state (moments, step counts), with the
        KL warm-up ``epochs`` epochs / ``steps`` steps in (``train(resume=True)``).

        Raises
        ------
        ValueError
            When the state does not fit this module's trainable parameters.
        """
        params = [p for p in self.module.parameters() if p.requires_grad]
        groups = optimizer_state.get("param_groups", [])
        n_saved = sum(len(g["params"]) for g in groups)
        misfits = [  # state is keyed by the parameter's position
            k
            for k, s in optimizer_state.get("state", {}).items()
            if "exp_avg" in s
            and (k >= len(params) or tuple(s["exp_avg"].shape) != tuple(params[k].shape))
        ]
        if n_saved != len(params) or misfits:
            raise ValueError(
                f"resume=True: the kept optimiser state ({n_saved} parameter tensors) does not "
                f"match this model's {len(params)} trainable ones (their number or shapes "
                "differ: the model was changed since); train without resume=True."
            )
        # loaded once into a throwaway optimiser now, so that the state of another kind of
        # optimiser is refused before training starts (not inside Lightning)
        continue_optimizer(self._new_optimizer(), optimizer_state, self.config)
        self._continued_state = optimizer_state
        self._offsets = (int(epochs), int(steps))

    def check_rank_shares(self, datamodule, world_size: int) -> None:
        """Refuse, before any process starts, a split too small to give every rank a trainable
        share (``ceil(n / world)`` cells, ``n // world`` with ``drop_dataset_tail``)."""
        train_idx = getattr(datamodule, "train_idx", None)
        if world_size <= 1 or not getattr(datamodule, "distributed_sampler", False):
            return
        if train_idx is None:  # a data module that shards its own cells
            return
        n_train = len(train_idx)
        if getattr(datamodule, "drop_dataset_tail", False):
            per_rank = n_train // world_size
        else:
            per_rank = math.ceil(n_train / world_size)
        batch_norm = any(
            isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in self.module.modules()
        )
        if per_rank == 0 or (per_rank == 1 and batch_norm):
            why = (
                "batch normalisation cannot train on a single cell"
                if per_rank
                else "a process without cells has nothing to train on"
            )
            raise ValueError(
                f"{n_train} training cell(s) on {world_size} processes leave {per_rank} cell(s) "
                f"per process, and {why}. Train on one process (devices=1, no DDP strategy) or "
                "on more cells."
            )

    # ----------------------------------------------------------------- warm-up
    @property
    def kl_weight(self) -> float:
        """KL weight of the current epoch (or step), ``training.md`` §2 (counted from the
        first training when resumed with ``train(resume=True)``)."""
        cfg = self.config
        lo, hi = cfg.min_kl_weight, cfg.max_kl_weight
        if cfg.n_epochs_kl_warmup:
            n, t = cfg.n_epochs_kl_warmup, self.current_epoch + self._offsets[0]
        elif cfg.n_steps_kl_warmup:
            n, t = cfg.n_steps_kl_warmup, self.global_step + self._offsets[1]
        else:
            return hi
        return lo + (hi - lo) * t / n if t < n else hi

    # ------------------------------------------------------------------- steps
    def _accumulate(self, split: str, out: LossOutput) -> None:
        # loss sums stay on the device (no copy to the host per step); the minibatch and cell
        # counts are host numbers, so no host value travels to a GPU per step either. The loss
        # (a per-cell mean) is summed weighted by the minibatch's cells, so ``*_loss`` is the
        # mean over the epoch's cells, as Lightning's size-weighted epoch mean in scvi-tools
        # (summed in float32 at least: with precision="16-true" an epoch's sums pass float16's
        # largest value, 65504, and would read inf)
        wide = torch.promote_types(out.loss.dtype, torch.float32)
        row = torch.stack(
            [
                out.loss.detach().to(wide) * out.n_obs,
                out.reconstruction_loss.detach().to(wide).sum(),
                out.kl_local.detach().to(wide).sum(),
                out.kl_global.detach().to(out.loss.device, wide),
            ]
        )
        if split in self._stats:
            self._stats[split] += row
        else:
            self._stats[split] = row
        counts = self._counts.setdefault(split, [0, 0])
        counts[0] += 1
        counts[1] += out.n_obs

    def training_step(self, batch, batch_idx):
        self._kl_weight_used = self.kl_weight  # the history records the last step's weight
        out = self._step_forward(batch)
        if not bool(torch.isfinite(out.loss)):
            self._raise_nonfinite("loss", batch, batch_idx)
        self._accumulate("train", out)
        return out.loss

    def _step_forward(self, batch: dict) -> LossOutput:
        """The module's loss on a training minibatch, compiled when asked for.

        The compiled graph is specialised to the first minibatch size; a minibatch of another
        size (the smaller last one of an epoch) runs eagerly rather than compiling a second
        graph. The KL weight goes in as a tensor, so a new weight does not recompile.
        """
        n_cells = len(batch[REGISTRY_KEYS.X_KEY])
        if self._compiled and self._compiled_size in (None, n_cells):
            self._compiled_size = n_cells
            kl_weight = torch.tensor(self.kl_weight, device=self.device)
            return self._forward(batch, kl_weight=kl_weight, **self.config.loss_kwargs)
        return self.module(batch, kl_weight=self.kl_weight, **self.config.loss_kwargs)

    def on_train_start(self) -> None:
        # the parameters are fixed for the run: list them once, not at every step
        self._trainable = [p for p in self.module.parameters() if p.requires_grad]
        # where this process trains (unset in a launching process whose workers train)
        self.trained_on = self.device

    def on_after_backward(self) -> None:
        if not self.config.check_gradients:
            return
        grads = [p.grad for p in self._trainable if p.grad is not None]
        # one norm per tensor (a NaN or inf anywhere makes its norm non-finite), one check
        if grads and not bool(torch.stack(torch._foreach_norm(grads)).isfinite().all()):
            self._raise_nonfinite("gradient", self._current_batch, self._current_batch_idx)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.config.on_step:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.step_rows.append({"step": len(self.step_rows), "train_loss_step": float(loss)})

    def on_train_batch_start(self, batch, batch_idx):
        self._current_batch, self._current_batch_idx = batch, batch_idx

    def validation_step(self, batch, batch_idx):
        out = self.module(batch, kl_weight=self.kl_weight, **self.config.loss_kwargs)
        if not bool(torch.isfinite(out.loss)):
            self._raise_nonfinite("loss", batch, batch_idx, phase="validation")
        self._accumulate("validation", out)

    # ------------------------------------------------------------ epoch metrics
    def on_train_epoch_start(self) -> None:
        self._stats.pop("train", None)
        self._counts.pop("train", None)
        if self._last_good_state is None:
            self._snapshot(epochs_done=self.current_epoch)

    def on_validation_epoch_start(self) -> None:
        self._stats.pop("validation", None)
        self._counts.pop("validation", None)

    def _epoch_metrics(self, split: str, n_obs_split: int | None) -> dict[str, float]:
        sums = self._stats.get(split)
        if sums is None:
            return {}
        # float32 whatever the loss precision: counts stay exact up to 2^24 cells per rank
        counts = torch.tensor(self._counts[split], dtype=torch.float32, device=sums.device)
        stats = torch.cat([sums.float(), counts])
        if self.trainer is not None and self.trainer.world_size > 1:
            stats = self.trainer.strategy.reduce(stats.clone(), reduce_op="sum")
        loss, rec, kl_l, kl_g, n_batches, n_cells = (float(v) for v in stats.cpu())
        n_split = n_obs_split or n_cells
        kl_global = kl_g / n_batches
        return {
            f"{split}_loss": loss / n_cells,
            f"elbo_{split}": (rec + kl_l) / n_cells + kl_global / n_split,
            f"reconstruction_loss_{split}": rec / n_cells,
            f"kl_local_{split}": kl_l / n_cells,
            f"kl_global_{split}": kl_global,
        }

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        metrics = self._epoch_metrics("validation", self.n_obs_validation)
        for name, value in metrics.items():
            self.log(name, value, sync_dist=False, rank_zero_only=False)
        self._val_row = metrics

    def on_train_epoch_end(self) -> None:
        self._check_weights()  # before the epoch counts as finished and becomes the snapshot
        metrics = self._epoch_metrics("train", self.n_obs_training)
        metrics["kl_weight"] = float(getattr(self, "_kl_weight_used", self.kl_weight))
        if self.log_learning_rate:
            optimizer = self.optimizers()
            optimizer = getattr(optimizer, "optimizer", optimizer)
            name = f"lr-{type(optimizer).__name__}"
            metrics[name] = float(optimizer.param_groups[0]["lr"])
        for name, value in metrics.items():
            self.log(name, value, prog_bar=name == "train_loss")
        row = {"epoch": int(self.current_epoch), **metrics, **self._val_row}
        self._val_row = {}
        self.history_rows.append(row)
        self._step_lr_scheduler(row)  # after the row: it records the LR this epoch used
        self._snapshot(epochs_done=self.current_epoch + 1)
        for callback in self.trainer.callbacks:
            hook = getattr(callback, "on_epoch_metrics", None)
            if hook is not None:
                hook(self.trainer, self, row)

    def on_train_end(self) -> None:
        # DDP syncs buffers (BatchNorm statistics) at the start of each forward only, so after
        # the last step every rank holds its own; make them all rank 0's so outputs agree.
        if self.trainer is not None and self.trainer.world_size > 1:
            for buffer in self.module.buffers():
                buffer.copy_(self.trainer.strategy.broadcast(buffer, src=0))

    # --------------------------------------------------------------- guardrail
    def _snapshot(self, epochs_done: int) -> None:
        """Remember the current (finite) weights so a NaN can be rolled back, with the
        optimiser state and training progress that go with them (for ``resume=True``)."""
        self._last_good_state = copy.deepcopy(self.module.state_dict())
        self._last_good_rows = (len(self.history_rows), len(self.step_rows))
        optimizers = self.trainer.optimizers if self._trainer is not None else []
        if optimizers:
            state = optimizers[0].state_dict()
            self.last_good_optimizer_state = {
                "state": {
                    k: {
                        n: v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v
                        for n, v in s.items()
                    }
                    for k, s in state["state"].items()
                },
                "param_groups": copy.deepcopy(state["param_groups"]),
            }
            self.progress = (
                epochs_done + self._offsets[0],
                int(self.global_step) + self._offsets[1],
            )

    def _check_weights(self) -> None:
        """Refuse to end an epoch on non-finite weights (possible with ``check_gradients=False``:
        a NaN gradient under a finite loss), so the snapshot stays the last finite state."""
        params = list(self.module.named_parameters())
        if bool(torch.stack([torch.isfinite(p).all() for _, p in params]).all()):
            return
        bad = [name for name, p in params if not bool(torch.isfinite(p).all())]
        raise NonFiniteLossError(
            f"The weights became NaN/inf during epoch {self.current_epoch + 1} (history index "
            f"{self.current_epoch}; {', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}) while every minibatch's loss was finite: a "
            f"gradient was NaN/inf. {self._rollback_text()} Train with "
            "plan_kwargs={'check_gradients': True} (the "
            "default) to stop at the step and minibatch where it happens; a learning rate that "
            "is too high or no gradient clipping (gradient_clip_val=1.0) are likely causes."
        )

    def _rollback_text(self) -> str:
        if self.current_epoch == 0:  # no epoch of this run finished
            return (
                "The weights were rolled back to those this run started from (no epoch had "
                "finished)."
            )
        return "The weights were rolled back to the last finite state (end of the previous epoch)."

    def restore_last_good_state(self) -> bool:
        """Load the last finite weights into the module, and cut the history back to the rows
        that go with them (a partial epoch's per-step losses, an epoch row whose end failed);
        True if there were any."""
        if self._last_good_state is None:
            return False
        self.module.load_state_dict(self._last_good_state)
        n_epochs, n_steps = self._last_good_rows
        del self.history_rows[n_epochs:], self.step_rows[n_steps:]
        return True

    def _raise_nonfinite(
        self, what: str, batch: dict, batch_idx: int, phase: str = "training"
    ) -> None:
        cells = batch.get(REGISTRY_KEYS.INDICES_KEY)
        cell_text = ""
        if cells is not None:
            ids = cells.reshape(-1)[:10].tolist()
            cell_text = f" Cells (positions in the AnnData) of this minibatch start with {ids}."
        batch_codes = batch.get(REGISTRY_KEYS.BATCH_KEY)
        batch_text = ""
        if batch_codes is not None:
            codes = sorted(set(batch_codes.reshape(-1).tolist()))
            names = [self.batch_categories[c] if self.batch_categories else c for c in codes]
            batch_text = f" Batch categories in it: {names}."
        x = batch.get(REGISTRY_KEYS.X_KEY)
        x_text = ""
        if x is not None:
            x_text = f" Largest count in it: {float(x.max()):.6g}."
            if not math.isfinite(float(x.sum())):
                x_text += " The input itself contains NaN/inf."
        # counted from 1, as the epoch is
        where = f"step {self.global_step + 1} of the run (minibatch {batch_idx + 1} of the epoch)"
        if phase == "validation":
            where = f"validation minibatch {batch_idx + 1}"
        raise NonFiniteLossError(
            f"The {phase} {what} became NaN/inf in epoch {self.current_epoch + 1} (history "
            f"index {self.current_epoch}), "
            f"{where}.{batch_text}{cell_text}"
            f"{x_text} {self._rollback_text()} Likely causes: the matrix is not raw counts "
            "(check layer=), a "
            "learning rate that is too high (lower plan_kwargs={'lr': ...}), a very small "
            "batch_size, or no gradient clipping (try gradient_clip_val=1.0)."
        )

    # -------------------------------------------------------------- optimiser
    def _new_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        params = [p for p in self.module.parameters() if p.requires_grad]
        if cfg.optimizer == "Custom":
            return cfg.optimizer_creator(params)
        cls = torch.optim.Adam if cfg.optimizer == "Adam" else torch.optim.AdamW
        # the fused kernel updates all parameters in one pass (same maths, less overhead)
        fused = bool(params) and all(
            p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in params
        )
        return cls(params, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay, fused=fused)

    def configure_optimizers(self):
        cfg = self.config
        optimizer = self._new_optimizer()
        if self._continued_state is not None:
            continue_optimizer(optimizer, self._continued_state, cfg)
        self.lr_scheduler = None
        if cfg.reduce_lr_on_plateau:
            self.lr_scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer,
                mode="min",
                factor=cfg.lr_factor,
                patience=cfg.lr_patience,
                threshold=cfg.lr_threshold,
                threshold_mode="abs",
                min_lr=cfg.lr_min,
            )
            if self._lr_scheduler_state is not None:  # resumed: the checkpoint's state
                self.lr_scheduler.load_state_dict(self._lr_scheduler_state)
                self._lr_scheduler_state = None
        # The plan steps the scheduler itself (``_step_lr_scheduler``) rather than handing it
        # to Lightning, which steps a plateau scheduler after the epoch's checkpoint was
        # written (a resumed run would lose that step) and fails on epochs without validation.
        return optimizer

    def _step_lr_scheduler(self, row: dict) -> None:
        """ReduceLROnPlateau step on this epoch's ``lr_scheduler_metric``; skipped on epochs
        that do not log it (``check_val_every_n_epoch > 1``)."""
        value = row.get(self.config.lr_scheduler_metric)
        if self.lr_scheduler is not None and value is not None:
            self.lr_scheduler.step(value)

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["cellvi_history_rows"] = [dict(r) for r in self.history_rows]
        checkpoint["cellvi_step_rows"] = [dict(r) for r in self.step_rows]
        checkpoint["cellvi_rng"] = {"torch": torch.get_rng_state()}
        # (epochs, steps) trained with the optimiser state saved alongside (``resume=True``)
        if self.progress is not None:
            checkpoint["cellvi_progress"] = list(self.progress)
        # the epochs and steps of earlier runs this one continues (resume=True): a resume of
        # this checkpoint continues the warm-up and the progress count after them too
        checkpoint["cellvi_offsets"] = list(self._offsets)
        # what a resume compares with its own model and settings (see check_resume_checkpoint)
        checkpoint["cellvi_module_config"] = module_settings(self.module)
        checkpoint["cellvi_optimizer_settings"] = self.config.optimizer_settings()
        # the warm-up in use, so that a run resumed with a longer max_epochs keeps it
        checkpoint["cellvi_kl_warmup"] = self.config.kl_warmup()
        if self.lr_scheduler is not None:
            checkpoint["cellvi_lr_scheduler"] = self.lr_scheduler.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = without_aliases(checkpoint.get("state_dict", {}))
        self.history_rows = [dict(r) for r in checkpoint.get("cellvi_history_rows", [])]
        self.step_rows = [dict(r) for r in checkpoint.get("cellvi_step_rows", [])]
        self.resumed_rows = (len(self.history_rows), len(self.step_rows))
        # a checkpoint from before the plan stepped its scheduler holds it in Lightning's list
        state = checkpoint.get("cellvi_lr_scheduler") or next(
            iter(checkpoint.get("lr_schedulers") or []), None
        )
        self._lr_scheduler_state = state if self.config.reduce_lr_on_plateau else None
        offsets = checkpoint.get("cellvi_offsets")
        if offsets is not None:
            self._offsets = (int(offsets[0]), int(offsets[1]))
        rng = checkpoint.get("cellvi_rng")
        if rng is not None:
            torch.set_rng_state(rng["torch"])
