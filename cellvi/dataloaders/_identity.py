"""Digests of the data a run trains on, kept in its checkpoints so a resume can refuse others."""

from __future__ import annotations

import hashlib
import json

__all__ = ["data_identity", "identity_differences"]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def data_identity(manager) -> dict:
    """``{"n_obs", "obs_names", "fields"}``: the number of cells, a digest of their names in
    order, and one digest per registered field of what it records (gene names in order,
    categories in code order, covariate columns); what the manager does not have is left
    out. Plain values, so a checkpoint holding them loads with ``weights_only``."""
    out: dict = {}
    n_cells = (getattr(manager, "summary_stats", None) or {}).get("n_cells")
    if n_cells is not None:
        out["n_obs"] = int(n_cells)
    names = getattr(getattr(manager, "adata", None), "obs_names", None)
    if names is not None:
        out["obs_names"] = _digest("\n".join(map(str, names)))
    # (a duck-typed manager, e.g. a test double, may keep no registry)
    registries = (getattr(manager, "registry", None) or {}).get("field_registries", {})
    out["fields"] = {}
    for key, reg in registries.items():
        # what the field records of the data (the cell count is checked on its own; the
        # obs column a field was read from does not change what it holds)
        state = {
            k: v
            for k, v in (reg.get("state_registry") or {}).items()
            if k not in ("n_obs", "original_key")
        }
        out["fields"][key] = _digest(json.dumps(state, sort_keys=True, default=str))
    return out


def identity_differences(saved: dict, current: dict) -> list[str]:
    """What differs between the data a checkpoint was written for and the current data, in
    words (empty: the same, or the checkpoint recorded nothing)."""
    if not saved:
        return []
    problems = []
    if saved.get("n_obs") != current.get("n_obs"):
        problems.append(f"{saved.get('n_obs')} cells there, {current.get('n_obs')} here")
    elif (
        None not in (saved.get("obs_names"), current.get("obs_names"))
        and saved["obs_names"] != current["obs_names"]
    ):
        problems.append("other cell names or another cell order")
    theirs, ours = saved.get("fields") or {}, current.get("fields") or {}
    for key in sorted(set(theirs) | set(ours)):
        if theirs.get(key) != ours.get(key):
            problems.append(
                "the genes or their order differ"
                if key == "X"
                else f"the registered {key!r} field differs (its categories or columns)"
            )
    return problems
