"""Schema of ``cellvi run`` workflow files: every key, its type, checked before any work."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import tomllib
from pathlib import Path

__all__ = ["ConfigError", "load_workflow", "SCHEMA"]


class ConfigError(ValueError):
    """The workflow file is invalid; the message names the key and what to write instead."""


_ANY = object


def _model_keys(name: str = "SCVI") -> dict[str, type]:
    """The ``[model]`` keys of ``name``: its constructor's arguments (SCANVI has more)."""
    from ..model import SCANVI, SCVI

    params = inspect.signature((SCANVI if name == "SCANVI" else SCVI).__init__).parameters
    out = {"name": str}
    for name, p in params.items():
        if name in ("self", "adata", "registry") or p.kind is p.VAR_KEYWORD:
            continue
        out[name] = type(p.default) if p.default is not None else _ANY
    return out


SCHEMA: dict[str, dict[str, type]] = {
    "input": {
        "path": str,
        "backed": bool,
        "paths": list,
        "join": str,
        "label": str,
        "layer": str,
        "simulate": dict,
    },
    "setup": {
        "batch_key": str,
        "labels_key": str,
        "size_factor_key": str,
        "categorical_covariate_keys": list,
        "continuous_covariate_keys": list,
        "unlabeled_category": (str, int),  # integer labels take an integer category
    },
    "train": {
        "max_epochs": int,
        "accelerator": str,
        "devices": _ANY,
        "strategy": str,
        "batch_size": int,
        "train_size": float,
        "validation_size": float,
        "early_stopping": bool,
        "early_stopping_patience": int,
        "early_stopping_monitor": str,
        "check_val_every_n_epoch": int,
        "early_stopping_min_delta": float,
        "early_stopping_mode": str,
        "early_stopping_warmup_epochs": int,
        "enable_checkpointing": bool,
        "checkpointing_monitor": str,
        "load_best_on_end": bool,
        "learning_rate_monitor": bool,
        "gradient_clip_val": float,
        "precision": _ANY,
        "deterministic": bool,
        "shuffle_set_split": bool,
        "seed": int,
        "plan_kwargs": dict,
        "datasplitter_kwargs": dict,
        "num_nodes": int,
        "save_resume_checkpoint": bool,
        "enable_progress_bar": bool,
        # further Lightning Trainer arguments (max_steps, log_every_n_steps, ...)
        "trainer_kwargs": dict,
    },
    "outputs": {
        "dir": str,
        "latent": bool,
        "normalized_expression": bool,
        "de": dict,
        "save_model": bool,
        "predictions": bool,
        "reference_mapping": dict,
    },
}


def _check_section(name: str, values: dict, allowed: dict[str, type], where: str) -> None:
    for key, value in values.items():
        if key not in allowed:
            close = difflib.get_close_matches(key, list(allowed), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{where}: unknown key [{name}].{key}.{hint} Valid keys: {sorted(allowed)}."
            )
        expected = allowed[key]
        if expected is _ANY:
            continue
        kinds = expected if isinstance(expected, tuple) else (expected,)
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            names = " or ".join(k.__name__ for k in kinds)
            raise ConfigError(
                f"{where}: [{name}].{key} must be {names}, got {value!r} ({type(value).__name__})."
            )


def load_workflow(path: str | Path) -> dict:
    """Read and validate a TOML workflow; returns the config with defaults filled in."""
    path = Path(path)
    try:
        config = tomllib.loads(path.read_text())
    except FileNotFoundError as err:
        raise ConfigError(f"No workflow file at {path}.") from err
    except IsADirectoryError as err:
        raise ConfigError(f"{path} is a folder; pass the workflow .toml file.") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"Cannot read the workflow file {path}: {err}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from err
    name = (
        config.get("model", {}).get("name", "SCVI")
        if isinstance(config.get("model"), dict)
        else None
    )
    schema = dict(SCHEMA, model=_model_keys(name))
    if name == "SCANVI":  # SCANVI.train also takes n_samples_per_label (labelled cells per class)
        schema["train"] = dict(
            SCHEMA["train"], n_samples_per_label=int, adversarial_classifier=bool
        )
    for section, values in config.items():
        if section not in schema:
            close = difflib.get_close_matches(section, list(schema), n=1)
            hint = f" Did you mean [{close[0]}]?" if close else ""
            raise ConfigError(f"{path}: unknown section [{section}].{hint}")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: [{section}] must be a table.")
        _check_section(section, values, schema[section], str(path))
    inp = config.setdefault("input", {})
    if sum(key in inp for key in ("path", "paths", "simulate")) != 1:
        raise ConfigError(
            f"{path}: [input] needs exactly one of path = '...h5ad', paths = ['a.h5ad', ...] "
            "(several files on disk) or simulate = {...}."
        )
    if "backed" in inp and "path" not in inp:
        raise ConfigError(f"{path}: [input].backed applies to path = '...' only.")
    for key in ("join", "label"):
        if key in inp and "paths" not in inp:
            raise ConfigError(f"{path}: [input].{key} applies to paths = [...] only.")
    if inp.get("join", "inner") not in ("inner", "outer"):
        raise ConfigError(f"{path}: [input].join must be 'inner' or 'outer'.")
    if not all(isinstance(p, str) for p in inp.get("paths", [])):
        raise ConfigError(f"{path}: [input].paths must be a list of file names (strings).")
    _check_files(path, "[input]", [inp["path"]] if "path" in inp else inp.get("paths", []))
    on_disk = inp.get("backed", False) or "paths" in inp
    if on_disk and config.get("outputs", {}).get("normalized_expression"):
        raise ConfigError(
            f"{path}: [outputs].normalized_expression would hold cells x genes in memory, "
            "which data read from disk are meant to avoid; drop it or compute it for a subset "
            "in Python (model.get_normalized_expression(indices=...))."
        )
    model = config.setdefault("model", {})
    if model.get("name", "SCVI") not in ("SCVI", "SCANVI"):
        raise ConfigError(f"{path}: [model].name must be 'SCVI' or 'SCANVI'.")
    if model.get("name") == "SCANVI":
        setup = config.get("setup", {})
        if "labels_key" not in setup or "unlabeled_category" not in setup:
            raise ConfigError(
                f"{path}: SCANVI needs [setup].labels_key and [setup].unlabeled_category."
            )
    config.setdefault("setup", {})
    train = config.setdefault("train", {})
    train.setdefault("seed", 0)  # recorded in config.resolved.json, as every run is seeded
    for key in ("max_epochs", "batch_size"):
        value = train.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{path}: [train].{key} must be a positive integer (got {value!r}).")
    _check_run_settings(path, train)
    from ..train._config import TrainerConfig, build_dataclass

    fields = {f.name for f in dataclasses.fields(TrainerConfig)}
    trainer_keys = {k: v for k, v in train.items() if k in fields}
    if trainer_keys:  # values Lightning or the plan would refuse only once training starts
        try:
            build_dataclass(TrainerConfig, trainer_keys, "[train]")
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{path}: {err}") from err
    if "plan_kwargs" in train:  # checked here, before the run folder is created
        from ..train._config import (
            SemiSupervisedTrainingPlanConfig,
            TrainingPlanConfig,
            build_dataclass,
        )

        plan_cls = (
            SemiSupervisedTrainingPlanConfig
            if model.get("name") == "SCANVI"
            else TrainingPlanConfig
        )
        try:
            build_dataclass(plan_cls, dict(train["plan_kwargs"]), "[train].plan_kwargs")
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{path}: {err}") from err
    outputs = config.setdefault("outputs", {})
    if outputs.get("predictions") and model.get("name") != "SCANVI":
        raise ConfigError(
            f"{path}: [outputs].predictions needs a classifier: set [model].name = 'SCANVI' "
            "(with [setup].labels_key and unlabeled_category), or drop predictions."
        )
    if model.get("name", "SCVI") == "SCVI" and "unlabeled_category" in config.get("setup", {}):
        raise ConfigError(
            f"{path}: [setup].unlabeled_category is a SCANVI setting; set [model].name = "
            "'SCANVI' (or drop it for SCVI)."
        )
    outputs.setdefault("predictions", model.get("name") == "SCANVI")
    mapping = outputs.get("reference_mapping")
    if mapping is not None:
        _check_section(
            "outputs.reference_mapping", mapping, {"query": str, "max_epochs": int}, str(path)
        )
        if "query" not in mapping:
            raise ConfigError(f"{path}: [outputs.reference_mapping] needs query = '...h5ad'.")
        _check_files(path, "[outputs.reference_mapping].query", [mapping["query"]])
    outputs.setdefault("dir", "cellvi_run")
    outputs.setdefault("latent", True)
    outputs.setdefault("save_model", True)
    # the resolved config names input files by absolute path, so `cellvi validate` (which
    # reopens them) and `--rerun` work from any working folder
    if "path" in inp:
        inp["path"] = str(Path(inp["path"]).resolve())
    if "paths" in inp:
        inp["paths"] = [str(Path(f).resolve()) for f in inp["paths"]]
    if mapping is not None:
        mapping["query"] = str(Path(mapping["query"]).resolve())
    return config


def _check_files(path: Path, where: str, files) -> None:
    """Input files must exist before anything starts (paths are read from the working folder)."""
    missing = [str(f) for f in files if not Path(f).exists()]
    if missing:
        raise ConfigError(
            f"{path}: {where} names files that do not exist: {missing}. Relative paths are "
            f"read from the working folder ({Path.cwd()})."
        )


def _check_run_settings(path: Path, train: dict) -> None:
    """``[train]`` values that Lightning or the data splitter would refuse only once the run
    folder exists (and without naming the key): checked up front."""
    seed = train.get("seed", 0)
    if not 0 <= seed <= 2**32 - 1:
        raise ConfigError(f"{path}: [train].seed must be in [0, 2**32 - 1] (got {seed}).")
    if "train_size" in train or "validation_size" in train:
        from ..dataloaders._splitter import split_sizes

        try:
            # the checks are on the fractions; the cell count (100) only sizes the result
            split_sizes(100, train.get("train_size", 0.9), train.get("validation_size"))
        except ValueError as err:
            raise ConfigError(f"{path}: [train]: {err}") from err
    if "accelerator" in train or "devices" in train:
        from ..train._devices import check_devices

        try:
            check_devices(train.get("accelerator", "auto"), train.get("devices", "auto"))
        except ValueError as err:
            raise ConfigError(f"{path}: [train]: {err}") from err
