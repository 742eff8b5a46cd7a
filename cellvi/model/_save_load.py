"""Save and load models as versioned, pickle-free directories (``persistence.md``)."""

from __future__ import annotations

import logging
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..data import is_on_disk
from ..data._manager import UUID_KEY
from ..errors import CellviWarning, ModelFileError, SetupError
from ..io import (
    fetch_backup,
    from_plain,
    h5ad_stamp,
    read_model_file,
    stamp_h5ad,
    to_plain,
    write_model_dir,
)
from ..train._callbacks import current_checkpoint_run
from ._history import append_history, run_history

__all__ = ["save_model", "load_model", "load_registry", "resolve_device"]

logger = logging.getLogger("cellvi")

# attributes saved with every model (learned state ends in "_")
_SAVED_ATTRS = (
    "registry_",
    "init_params_",
    "is_trained_",
    "history_",
    "train_indices_",
    "validation_indices_",
    "test_indices_",
    "run_dir_",
)


def resolve_device(accelerator: str = "auto", device: int | str = "auto") -> torch.device:
    """One torch device from Lightning-style ``accelerator``/``device`` (single device only)."""
    if (
        isinstance(device, list | tuple)
        or device == -1
        or (isinstance(device, str) and ("," in device or device == "-1"))
    ):
        raise ValueError(
            f"device={device!r}: loading needs a single device, e.g. device=0 or 'cpu'."
        )
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator == "cpu":
        return torch.device("cpu")
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"accelerator={accelerator!r} but no CUDA device is available.")
        index = 0 if device == "auto" else int(device)
        return torch.device(f"cuda:{index}")
    if accelerator == "mps":
        return torch.device("mps")
    raise ValueError(f"accelerator={accelerator!r}: use 'auto', 'cpu', 'gpu' or 'mps'.")


def save_model(
    model,
    dir_path: str | Path,
    *,
    prefix: str | None = None,
    overwrite: bool = False,
    save_anndata: bool = False,
    save_kwargs: dict | None = None,
    anndata_write_kwargs: dict | None = None,
    save_optimizer_state: bool = False,
) -> Path:
    """Write ``model`` to ``dir_path`` atomically (see :meth:`BaseModel.save`)."""
    save_kwargs = _check_save_kwargs(save_kwargs)
    optimizer = None
    if save_optimizer_state:
        if model._optimizer_state is None:
            raise ValueError(
                f"save_optimizer_state=True, but this {type(model).__name__} holds no optimiser "
                "state (it was not trained in this session, or was loaded from a file saved "
                "without save_optimizer_state=True)."
            )
        epochs, steps = model._training_progress
        optimizer = {"optimizer": model._optimizer_state, "epochs": epochs, "steps": steps}
        if model._kl_warmup is not None:
            optimizer["kl_warmup"] = dict(model._kl_warmup)
    if model.module is None:
        raise SetupError(
            f"This {type(model).__name__} has no module yet (created without data); train it "
            "with model.train(datamodule=dm) before saving."
        )
    attrs = _saved_attributes(model)
    attrs["model_class"] = type(model).__name__
    run = current_checkpoint_run()
    if run is not None:  # a best-model checkpoint: the history and split of this run so far
        attrs.update(_checkpoint_attributes(model, run))
    extra = {}
    save_id = uuid.uuid4().hex
    if save_anndata:
        if model.adata is None:
            warnings.warn(
                "save_anndata=True but the model has no AnnData; only the model is saved.",
                CellviWarning,
                stacklevel=3,
            )
        elif any(is_on_disk(m) for m in (model.adata.X, *model.adata.layers.values())):
            warnings.warn(
                "save_anndata=True but the model's counts are read from disk "
                f"({model.adata.X!r}); they are not copied. Reopen them with "
                "cellvi.data.read_backed / read_collection and pass adata= to load.",
                CellviWarning,
                stacklevel=3,
            )
        else:
            adata = model.adata
            kwargs = dict(anndata_write_kwargs or {})

            def write_adata(path):
                adata.write_h5ad(path, **kwargs)
                stamp_h5ad(path, save_id)  # the model file carries the same token

            extra[f"{prefix or ''}adata.h5ad"] = write_adata
    var_names = model.registry_["field_registries"]["X"]["state_registry"]["column_names"]
    state = {k: v.detach().cpu() for k, v in model.module.state_dict().items()}
    return write_model_dir(
        dir_path,
        state_dict=state,
        var_names=list(var_names),
        attr_dict=to_plain(attrs),
        prefix=prefix,
        overwrite=overwrite,
        extra_files=extra or None,
        save_kwargs=save_kwargs,
        optimizer_state=optimizer,
        save_id=save_id if extra else None,
    )


def _saved_attributes(model) -> dict:
    """Every public attribute ending in ``_`` (persistence.md §1), so flags such as SCANVI's
    ``was_pretrained_`` survive; values the plain codec cannot store (e.g. ``config_``, which
    the stored init params rebuild) are left out."""
    names = _SAVED_ATTRS + tuple(getattr(type(model), "_EXTRA_SAVED_ATTRS", ()))
    attrs = {name: getattr(model, name, None) for name in names}
    for name, value in vars(model).items():
        if name.endswith("_") and not name.startswith("_") and name not in attrs:
            try:
                to_plain(value)
            except TypeError:
                continue
            attrs[name] = value
    return attrs


def _checkpoint_attributes(model, run) -> dict:
    """History and split that go with a checkpoint's weights, as ``_record_run`` would set
    them had training ended at that epoch."""
    base = model._history_before(run, resumed=run.resumed_rows is not None)
    new = run_history(run.history_rows, run.step_rows)
    attrs = {"history_": append_history(base, new), "run_dir_": str(run.run_dir)}
    for name, value in (
        ("train_indices_", run.train_idx),
        ("validation_indices_", run.val_idx),
        ("test_indices_", run.test_idx),
    ):
        attrs[name] = None if value is None else np.asarray(value, dtype=np.int64)
    return attrs


_TORCH_SAVE_ARGS = (
    "pickle_protocol",
    "_use_new_zipfile_serialization",
    "_disable_byteorder_record",
)


def _check_save_kwargs(save_kwargs) -> dict:
    """``save_kwargs`` for ``torch.save``, refused before anything is written when they would
    fail or make the file need unpickling."""
    if save_kwargs is None:
        return {}
    if not isinstance(save_kwargs, Mapping):
        raise TypeError(f"save_kwargs must be a dict of torch.save arguments; got {save_kwargs!r}.")
    if "pickle_module" in save_kwargs:
        raise ValueError(
            "save_kwargs={'pickle_module': ...} is refused: model.pt holds tensors and plain "
            "values only, read back without unpickling; drop pickle_module."
        )
    if save_kwargs.get("pickle_protocol", 2) != 2:
        raise ValueError(
            f"save_kwargs={{'pickle_protocol': {save_kwargs['pickle_protocol']!r}}} is refused: "
            "the safe reader of model.pt (torch.load with weights_only) expects protocol 2."
        )
    unknown = sorted(set(save_kwargs) - set(_TORCH_SAVE_ARGS))
    if unknown:
        raise TypeError(
            f"save_kwargs has arguments torch.save does not take: {unknown}; it takes "
            f"{list(_TORCH_SAVE_ARGS)}. AnnData write options go as keywords of save()."
        )
    return dict(save_kwargs)


def view_setup_args(dir_path, prefix: str | None = None) -> None:
    """Print the setup method and its arguments from a saved model's registry."""
    registry = load_registry(dir_path, prefix)
    method = registry.get("setup_method_name", "setup_anndata")
    args = registry.get("setup_args", {})
    lines = [f"{registry.get('model_name', 'model')}.{method}("]
    lines += [f"    {name}={value!r}," for name, value in args.items()]
    print("\n".join([*lines, ")"]))


def load_registry(dir_path: str | Path, prefix: str | None = None) -> dict:
    """The data registry of a saved model, without building the model."""
    content = read_model_file(dir_path, prefix=prefix)
    return _checked_attributes(content, dir_path)["registry_"]


# set from the registry and init params when the model is rebuilt, not copied from the file
_REBUILT = ("registry_", "init_params_", "config_")
# a query model's freezing (load_query_data): restored so that training it again after
# loading moves only what it moved before
_QUERY_FREEZING = "query_freezing_"


def _checked_attributes(content: dict, dir_path) -> dict:
    """The decoded ``attr_dict`` of a model file, refused with a clear error when parts that
    loading needs are missing or of the wrong kind (a damaged or hand-edited file)."""

    def broken(what: str) -> ModelFileError:
        return ModelFileError(
            f"The model file in {dir_path} is damaged or was edited: {what}. Save the model "
            "again from a working copy."
        )

    if not isinstance(content.get("model_state_dict"), Mapping):
        raise broken("model_state_dict is not a dictionary of tensors")
    bad = [
        name
        for name, value in content["model_state_dict"].items()
        if torch.is_tensor(value) and value.is_floating_point() and not value.isfinite().all()
    ]
    if bad:  # training never ends on such weights (its guardrail rolls them back)
        raise broken(f"its weights hold NaN or inf values ({', '.join(bad[:3])})")
    if not isinstance(content.get("attr_dict"), Mapping):
        raise broken("it has no attr_dict")
    try:
        attrs = from_plain(content["attr_dict"])
    except (TypeError, ValueError, KeyError) as err:
        raise broken(f"attr_dict cannot be decoded ({err})") from None
    registry = attrs.get("registry_")
    if not isinstance(registry, Mapping) or not isinstance(
        registry.get("field_registries"), Mapping
    ):
        raise broken("attr_dict has no data registry (registry_ with field_registries)")
    if not isinstance(registry.get("setup_args"), Mapping):
        raise broken("the data registry has no setup_args")
    init = attrs.get("init_params_")
    if not isinstance(init, Mapping) or not isinstance(init.get("non_kwargs"), Mapping):
        raise broken("attr_dict has no init_params_ with non_kwargs")
    if not isinstance(init.get("kwargs", {}), Mapping):
        raise broken("init_params_['kwargs'] is not a dictionary")
    history = attrs.get("history_")
    if history is not None and not (
        isinstance(history, Mapping) and all(hasattr(v, "index") for v in history.values())
    ):
        raise broken("history_ is not a dictionary of tables")
    return attrs


def load_model(
    cls,
    dir_path: str | Path,
    adata=None,
    *,
    accelerator: str = "auto",
    device: int | str = "auto",
    prefix: str | None = None,
    check_var_names: str = "error",
    allow_pickle: bool = False,
    backup_url=None,
    sha256: str | None = None,
    datamodule=None,
    allowed_classes_names_list=None,
):
    """Rebuild a model of class ``cls`` from ``dir_path`` (see :meth:`BaseModel.load`)."""
    torch_device = resolve_device(accelerator, device)
    if datamodule is not None and adata is not None and adata is not False:
        raise ValueError("Pass either adata= or datamodule= to load, not both.")
    fetch_backup(Path(dir_path) / f"{prefix or ''}model.pt", backup_url, sha256)
    content = read_model_file(dir_path, prefix=prefix, allow_pickle=allow_pickle)
    attrs = _checked_attributes(content, dir_path)
    registry = attrs["registry_"]
    # the class that saved it (a registry from a data module names the module instead)
    saved_class = attrs.get("model_class") or registry.get("model_name")
    allowed = _allowed_classes(allowed_classes_names_list)
    if saved_class != cls.__name__ and saved_class not in allowed:
        raise ModelFileError(
            f"{dir_path} holds a {saved_class} model; load it with "
            f"cellvi.model.{saved_class}.load, not {cls.__name__}.load."
        )
    if datamodule is not None:
        from ..train._checks import check_datamodule

        check_datamodule(datamodule)
        adata = False  # rebuilt from the registry; the module is checked against it below
    if adata is None:
        path = Path(dir_path) / f"{prefix or ''}adata.h5ad"
        if path.exists():
            import anndata

            _check_same_save(path, content)
            adata = anndata.read_h5ad(path)
        elif registry.get("setup_method_name") == "setup_datamodule":
            adata = False  # trained on a data module: outputs take dataloader=
        else:
            warnings.warn(
                f"No AnnData given and none saved in {dir_path}: the model is loaded without "
                "data. Pass adata= to compute outputs.",
                CellviWarning,
                stacklevel=3,
            )
            adata = False
    if adata is not False:
        if cls._store.holds_another(adata):  # a copy of set-up data: the original keeps its id
            adata.uns.pop(UUID_KEY, None)
        manager = cls._build_manager(registry["setup_args"])
        manager.register_fields(adata, source_registry=registry, check_var_names=check_var_names)
        cls._register_manager(manager)
    init = attrs["init_params_"]
    try:
        model = cls(
            adata if adata is not False else None,
            registry=None if adata is not False else registry,
            **init_kwargs(init),
        )
    except TypeError as err:  # init params of another version or a hand-edited file
        raise ModelFileError(
            f"The init params stored in {dir_path} do not fit {cls.__name__}: {err}"
        ) from err
    # the known attributes and those the rebuilt model has (e.g. SCANVI's was_pretrained_);
    # other names in a hand-edited file are not set
    known = set(_SAVED_ATTRS) | set(getattr(cls, "_EXTRA_SAVED_ATTRS", ())) | set(vars(model))
    known.add(_QUERY_FREEZING)
    for name in attrs:
        if name in known and name.endswith("_") and name not in _REBUILT:
            value = attrs[name]
            if name.endswith("indices_") and value is not None:
                value = np.asarray(value, dtype=np.int64)
            setattr(model, name, value)
    model.registry_ = registry if adata is False else model.registry_
    state = {k: v for k, v in content["model_state_dict"].items()}
    try:
        model.module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelFileError(
            f"The weights in {dir_path} do not fit the {cls.__name__} architecture stored with "
            f"them: {err}"
        ) from err
    if attrs.get(_QUERY_FREEZING) is not None:
        from ._query import refreeze

        refreeze(model.module, attrs[_QUERY_FREEZING])
    model.module.to(torch_device)
    model.module.eval()
    saved = content.get("optimizer_state")  # save(..., save_optimizer_state=True)
    if saved is not None:
        model._optimizer_state = saved["optimizer"]
        model._training_progress = (int(saved["epochs"]), int(saved["steps"]))
        model._kl_warmup = saved.get("kl_warmup")  # absent in files saved before it was kept
    if datamodule is not None:  # checked against the saved registry, then used for outputs
        model._attach_manager(datamodule.manager, "the data module")
    return model


def _check_same_save(adata_path: Path, content: dict) -> None:
    """Refuse a saved AnnData that another save wrote than the model file's (a save into a
    folder shared with other files, killed between its per-file renames, or files copied
    together from different saves)."""
    ours, theirs = content.get("save_id"), h5ad_stamp(adata_path)
    if ours is not None and theirs is not None and ours != theirs:
        raise ModelFileError(
            f"{adata_path} was written by another save than the model file beside it (an "
            "interrupted save, or files copied from different saves). Save the model again, "
            "or load it with the AnnData you mean: Model.load(dir_path, adata=...)."
        )


def _allowed_classes(names) -> set[str]:
    if names is None:
        return set()
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise ValueError(
            f'allowed_classes_names_list={names!r} must be a list of class names, e.g. ["SCVI"].'
        )
    return set(names)


def init_kwargs(init: Mapping) -> dict:
    """The constructor arguments of ``init_params_``: its named ones and its ``**kwargs``,
    stored flat or, as scvi-tools and persistence.md lay them out, under the name of the
    variadic parameter (``{"kwargs": {"kwargs": {...}}}``)."""
    out = dict(init["non_kwargs"])
    for name, value in (init.get("kwargs") or {}).items():
        if name == "kwargs" and isinstance(value, Mapping):
            out.update(value)
        else:
            out[name] = value
    return out
