"""``cellvi run workflow.toml``: a declarative, resumable workflow."""

from __future__ import annotations

import contextlib
import json
import platform
import warnings
from pathlib import Path

from ..errors import InvalidDataError
from ._schema import load_workflow

__all__ = ["run_workflow", "versions"]


def versions() -> dict[str, str]:
    """Versions of cellvi and the packages that determine its results."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for package in ("cellvi", "torch", "lightning", "anndata", "numpy", "scipy", "pandas"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    return out


class _State:
    """Which steps of a run are finished (``state.json``), so ``--resume`` can skip them."""

    def __init__(self, path: Path):
        self.path = path
        self.done = json.loads(path.read_text()) if path.exists() else {}

    def mark(self, step: str, value=True) -> None:
        self.done[step] = value
        _write_text(self.path, json.dumps(self.done, indent=2))


def _write_atomically(path: Path, write) -> None:
    """``write(tmp)`` to a temporary sibling, then renamed over ``path`` (``cellvi.io`` is
    imported here: it imports torch, which ``cellvi --help`` should not wait for)."""
    from ..io import atomic_file

    with atomic_file(path) as tmp:
        write(tmp)


def _write_text(path: Path, text: str) -> None:
    _write_atomically(path, lambda tmp: tmp.write_text(text))


def _load_input(config: dict):
    import anndata

    import cellvi

    inp = config["input"]
    if "simulate" in inp:
        try:
            return cellvi.data.simulate(**inp["simulate"])
        except (InvalidDataError, TypeError) as err:  # fixed in the workflow, not in a file
            raise ValueError(f"[input.simulate]: {err}") from None
    if "paths" in inp:  # several files, counts left on disk
        return cellvi.data.read_collection(
            inp["paths"],
            join=inp.get("join", "inner"),
            label=inp.get("label", "dataset"),
            layer=inp.get("layer"),
        )
    path = Path(inp["path"])
    try:
        if inp.get("backed"):
            return cellvi.data.read_backed(path, layer=inp.get("layer"))
        if path.is_dir():  # a .zarr store
            return anndata.read_zarr(path)
        return anndata.read_h5ad(path)
    except OSError as err:  # not an AnnData file: one line, not h5py's traceback
        raise ValueError(
            f"[input].path = {str(path)!r} could not be read as an .h5ad file or .zarr store: {err}"
        ) from err


def secondary_rank() -> bool:
    """Whether this is a DDP process other than rank 0 (``devices=2``: Lightning runs the
    command again in a second process, which trains its share and then stops)."""
    import os

    return any(int(os.environ.get(k, "0") or 0) > 0 for k in ("RANK", "LOCAL_RANK"))


def _write_outputs(adata, path: Path) -> None:
    """The AnnData with its results; counts read from disk are not copied into it."""
    import anndata

    import cellvi

    if cellvi.data.is_on_disk(adata.X) or any(
        cellvi.data.is_on_disk(m) for m in adata.layers.values()
    ):
        adata = anndata.AnnData(  # annotations and results (simulated truth included)
            obs=adata.obs,
            var=adata.var,
            obsm=dict(adata.obsm),
            varm=dict(adata.varm),
            uns=dict(adata.uns),
        )
    _write_atomically(path, adata.write_h5ad)


_OWN_FILES = {"config.resolved.json", "state.json", "runs"}


def _check_output_dir(out: Path, resume: bool) -> None:
    """Refuse a folder holding anything worth keeping, unless resuming.

    The folder of a run that failed before finishing any step or epoch (only the resolved
    config, an empty state and runs without a checkpoint) is reused: after fixing the
    workflow the user reruns the same command.
    """
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"[outputs].dir = {str(out)!r} is a file; name a folder.")
    if resume or not out.exists():
        return
    names = {p.name for p in out.iterdir()}
    if not names:
        return
    state = out / "state.json"
    progress = (
        not names <= _OWN_FILES
        or (state.exists() and json.loads(state.read_text()))
        or _last_checkpoint(out / "runs") is not None
    )
    if progress:
        done = json.loads(state.read_text()) if state.exists() else {}
        steps = [k for k, v in done.items() if v is True] or ["none (training was interrupted)"]
        raise FileExistsError(
            f"{out} is not empty: it holds a run (finished steps: {', '.join(steps)}). "
            "To continue it, use --resume (`cellvi run WORKFLOW.toml --resume`); or set another "
            "[outputs].dir (or delete the folder) to start over."
        )


# what --resume may change: training then stops at the new epoch count, as ckpt_path= does
_RESUMABLE_EDITS = {("train", "max_epochs")}


def _check_same_workflow(out: Path, config: dict) -> None:
    """``--resume`` continues the run its folder records: a workflow edited since (other than
    ``[train].max_epochs``) would leave outputs that its recorded settings do not describe."""
    recorded = out / "config.resolved.json"
    if not recorded.exists():
        return
    before = json.loads(recorded.read_text()).get("config") or {}
    now = json.loads(json.dumps(config))
    differ = []
    for section in sorted(set(before) | set(now)):
        old, new = before.get(section) or {}, now.get(section) or {}
        for key in sorted(set(old) | set(new), key=str):
            if (section, key) in _RESUMABLE_EDITS:
                continue
            if old.get(key) != new.get(key):
                differ.append(f"[{section}].{key} ({old.get(key)!r} there, {new.get(key)!r} now)")
    if differ:
        raise ValueError(
            f"--resume continues the run recorded in {recorded}, and the workflow was edited "
            f"since: {'; '.join(differ[:4])}{' ...' if len(differ) > 4 else ''}. Restore "
            "those settings to resume, or set another [outputs].dir for a new run."
        )


def _last_checkpoint(runs: Path) -> Path | None:
    candidates = sorted(runs.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


def _training_checkpoint(out: Path, state: _State) -> Path | None:
    """The checkpoint ``--resume`` continues the model's training from: that of its own run
    once it finished (later runs in the folder, e.g. a query's, are not it), else the newest
    (the interrupted training)."""
    own = state.done.get("train_run")
    if own and (Path(own) / "checkpoints" / "last.ckpt").exists():
        return Path(own) / "checkpoints" / "last.ckpt"
    return None if state.done.get("train") else _last_checkpoint(out / "runs")


def run_workflow(path: str | Path, *, resume: bool = False, check: bool = False) -> Path:
    """Run (or resume) the workflow in ``path``; returns the output directory. With ``check``,
    only the checks made before training: nothing is trained or written."""
    return run_config(load_workflow(path), source=str(path), resume=resume, check=check)


def run_config(
    config: dict, *, source: str = "<config>", resume: bool = False, check: bool = False
) -> Path:
    """Run a validated workflow config (see :func:`~cellvi.cli._schema.load_workflow`);
    ``check`` stops after the checks made before training (see :func:`run_workflow`)."""
    import cellvi
    from cellvi.analysis import check_de_request
    from cellvi.model import SCANVI, SCVI

    out = Path(config["outputs"]["dir"])
    _check_output_dir(out, resume)
    if resume:
        _check_same_workflow(out, config)
    state = _State(out / "state.json")
    train_cfg = dict(config["train"])
    seed = train_cfg.pop("seed", 0)
    train_cfg.update(train_cfg.pop("trainer_kwargs", {}))  # Lightning's, passed through
    model_cls = SCANVI if config["model"].get("name") == "SCANVI" else SCVI
    model_kwargs = {k: v for k, v in config["model"].items() if k != "name"}
    with cellvi.settings.override(seed=seed, logging_dir=out / "runs"):
        # data, setup, DE request and model are checked before the folder is created
        adata = _load_input(config)
        setup = dict(config["setup"])
        # (read_collection reads the layer into X; a single file keeps it in layers)
        if config["input"].get("layer") and "paths" not in config["input"]:
            setup["layer"] = config["input"]["layer"]
        model_cls.setup_anndata(adata, **setup)
        if config["outputs"].get("de") is not None and not state.done.get("de"):
            try:  # before training, not after
                check_de_request(adata, **config["outputs"]["de"])
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"[outputs].de: {err}") from err
        trained = state.done.get("train") and (out / "model").exists()
        if trained:
            model = model_cls.load(out / "model", adata=adata)
        else:
            model = model_cls(adata, **model_kwargs)
        mapping = config["outputs"].get("reference_mapping")
        if mapping and not state.done.get("reference_mapping"):
            _check_query(model_cls, model, mapping["query"])  # before training, not after
        if check:
            if not trained:  # train()'s own checks, up to its Lightning trainer
                from ..train._checks import ChecksPassed, checks_only

                with checks_only(), contextlib.suppress(ChecksPassed):
                    model.train(**train_cfg)
            return out
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(
                f"[outputs].dir = {str(out)!r} cannot be created ({err.strerror}: "
                f"{err.filename}); name a folder you can write to."
            ) from err
        _write_text(
            out / "config.resolved.json",
            json.dumps({"workflow": source, "config": config, "versions": versions()}, indent=2),
        )
        if not trained:
            ckpt = _training_checkpoint(out, state) if resume else None
            with warnings.catch_warnings():
                # a finished training (not saved: save_model = false) is taken back whole
                warnings.filterwarnings("ignore", message=".*already holds .* finished epochs")
                model.train(**train_cfg, ckpt_path=str(ckpt) if ckpt else None)
            if secondary_rank():  # a DDP process Lightning started: rank 0 writes the outputs
                return out
            if config["outputs"].get("save_model", True):
                model.save(out / "model", overwrite=True)
            state.mark("train_run", str(model.run_dir_))
            state.mark("train")
        outputs = config["outputs"]
        if outputs.get("latent"):
            adata.obsm["X_scVI"] = model.get_latent_representation()
        if outputs.get("predictions"):
            _add_predictions(model, adata.obs, adata.obsm)
        if outputs.get("normalized_expression"):
            adata.layers["cellvi_normalized"] = model.get_normalized_expression(return_numpy=True)
        if outputs.get("de") is not None and not state.done.get("de"):
            table = model.differential_expression(**outputs["de"])
            _write_atomically(out / "de.csv", table.to_csv)
            state.mark("de")
        if mapping and not state.done.get("reference_mapping"):
            _map_query(model_cls, model, mapping, out)
            state.mark("reference_mapping")
        _write_outputs(adata, out / "adata.h5ad")
        state.mark("outputs")
    return out


def _check_query(model_cls, reference, path: str) -> None:
    """The query can be mapped onto this reference (shared genes, known labels, readable
    file); checked with the untrained reference, so that a mistake is not found only after
    the reference has trained."""
    import warnings

    import anndata

    try:
        with warnings.catch_warnings():  # said once, when the query is mapped for real
            warnings.simplefilter("ignore")
            query = anndata.read_h5ad(path)
            model_cls.prepare_query_anndata(query, reference)
            model_cls.load_query_data(query, reference)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"[outputs.reference_mapping].query = {path!r}: {err}") from err


def _map_query(model_cls, reference, mapping: dict, out: Path) -> None:
    """Map a query data set onto the trained reference; write its latent space."""
    import anndata

    query = anndata.read_h5ad(mapping["query"])
    model_cls.prepare_query_anndata(query, reference)
    query_model = model_cls.load_query_data(query, reference)
    query_model.train(
        max_epochs=int(mapping.get("max_epochs", 100)), plan_kwargs={"weight_decay": 0.0}
    )
    query.obsm["X_scVI"] = query_model.get_latent_representation()
    if model_cls.__name__ == "SCANVI":
        _add_predictions(query_model, query.obs, query.obsm)
    query_model.save(out / "query_model", overwrite=True)
    _write_atomically(out / "query_adata.h5ad", query.write_h5ad)


def _add_predictions(model, obs, obsm) -> None:
    """A SCANVI model's label of each cell (``obs["cellvi_prediction"]``, categorical over the
    model's labels) and the probabilities behind it (``obsm["cellvi_prediction_probabilities"]``,
    a DataFrame with a column per label)."""
    import pandas as pd

    probabilities = model.predict(soft=True)
    labels = list(probabilities.columns)
    best = probabilities.to_numpy().argmax(1)
    obs["cellvi_prediction"] = pd.Categorical.from_codes(best, categories=labels)
    probabilities.columns = [str(label) for label in labels]  # h5ad needs string names
    obsm["cellvi_prediction_probabilities"] = probabilities
