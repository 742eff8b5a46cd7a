"""Training: plans, trainer runner, callbacks, progress display, structured configs."""

from ._callbacks import (
    BestModelCheckpoint,
    HistoryWriter,
    LoudEarlyStopping,
    ResumeCheckpoint,
    SaveCheckpoint,
)
from ._config import (
    UNSET,
    SemiSupervisedTrainingPlanConfig,
    TrainerConfig,
    TrainingPlanConfig,
    build_dataclass,
    config_to_kwargs,
)
from ._plan import TrainingPlan
from ._progress import EpochProgress
from ._runner import RunResult, TrainingInterrupted, default_run_dir, run_training
from ._semisupervised import SemiSupervisedTrainingPlan

__all__ = [
    "BestModelCheckpoint",
    "EpochProgress",
    "HistoryWriter",
    "LoudEarlyStopping",
    "ResumeCheckpoint",
    "RunResult",
    "SaveCheckpoint",
    "SemiSupervisedTrainingPlan",
    "SemiSupervisedTrainingPlanConfig",
    "TrainerConfig",
    "TrainingInterrupted",
    "TrainingPlan",
    "TrainingPlanConfig",
    "UNSET",
    "build_dataclass",
    "config_to_kwargs",
    "default_run_dir",
    "run_training",
]
