"""Save and load models as versioned, pickle-free directories (``persistence.md``)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..data import is_on_disk
from ..errors import CellviWarning, ModelFileError, SetupError
from ..io import from_plain, read_model_file, to_plain, write_model_dir

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
    if model.module is None:
        raise SetupError(
            f"This {type(model).__name__} has no module yet (created without data); train it "
            "with model.train(datamodule=dm) before saving."
        )
    names = _SAVED_ATTRS + tuple(getattr(type(model), "_EXTRA_SAVED_ATTRS", ()))
    attrs = {name: getattr(model, name, None) for name in names}
    attrs["model_class"] = type(model).__name__
    extra = {}
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
            extra[f"{prefix or ''}adata.h5ad"] = lambda path: adata.write_h5ad(path, **kwargs)
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
    )


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
    return from_plain(content["attr_dict"])["registry_"]


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
):
    """Rebuild a model of class ``cls`` from ``dir_path`` (see :meth:`BaseModel.load`)."""
    torch_device = resolve_device(accelerator, device)
    content = read_model_file(dir_path, prefix=prefix, allow_pickle=allow_pickle)
    attrs = from_plain(content["attr_dict"])
    registry = attrs["registry_"]
    # the class that saved it (a registry from a data module names the module instead)
    saved_class = attrs.get("model_class") or registry.get("model_name")
    if saved_class != cls.__name__:
        raise ModelFileError(
            f"{dir_path} holds a {saved_class} model; load it with "
            f"cellvi.model.{saved_class}.load, not {cls.__name__}.load."
        )
    if adata is None:
        path = Path(dir_path) / f"{prefix or ''}adata.h5ad"
        if path.exists():
            import anndata

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
        manager = cls._build_manager(registry["setup_args"])
        manager.register_fields(adata, source_registry=registry, check_var_names=check_var_names)
        cls._register_manager(manager)
    init = attrs["init_params_"]
    model = cls(
        adata if adata is not False else None,
        registry=None if adata is not False else registry,
        **init["non_kwargs"],
        **init.get("kwargs", {}),
    )
    for name in _SAVED_ATTRS + tuple(getattr(cls, "_EXTRA_SAVED_ATTRS", ())):
        if name in attrs and name not in ("registry_", "init_params_"):
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
    model.module.to(torch_device)
    model.module.eval()
    saved = content.get("optimizer_state")  # save(..., save_optimizer_state=True)
    if saved is not None:
        model._optimizer_state = saved["optimizer"]
        model._training_progress = (int(saved["epochs"]), int(saved["steps"]))
    return model
