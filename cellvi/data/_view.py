"""Rich tables describing a registered setup (``view_registry`` / ``view_anndata_setup``)."""

from __future__ import annotations

__all__ = ["print_registry", "state_table", "location"]


def location(attr_name: str, attr_key: str | None) -> str:
    """Where registered data live, written as the user would type it.

    Parameters
    ----------
    attr_name
        Attribute of the AnnData (``"X"``, ``"layers"``, ``"obs"``, ``"obsm"``).
    attr_key
        Key inside that attribute, or ``None`` for ``adata.X``.

    Returns
    -------
    str
        E.g. ``"adata.obs['_cellvi_batch']"``.

    Examples
    --------
    >>> location("obs", "_cellvi_batch")
    "adata.obs['_cellvi_batch']"
    >>> location("X", None)
    'adata.X'
    """
    where = f"adata.{attr_name}"
    return where if attr_key is None else f"{where}[{attr_key!r}]"


def state_table(title: str, header: list[str], rows: list[list]):
    """A rich table with one row per entry of a field's state.

    Parameters
    ----------
    title
        Table title.
    header
        Column names.
    rows
        Cell values; converted with ``str``.

    Returns
    -------
    rich.table.Table
    """
    from rich.table import Table

    table = Table(title=title)
    for name in header:
        table.add_column(name)
    for row in rows:
        table.add_row(*[str(v) for v in row])
    return table


def print_registry(manager, *, hide_state_registries: bool = False, console=None) -> None:
    """Print version, setup call, summary statistics, data locations and field states.

    Parameters
    ----------
    manager
        A registered :class:`~cellvi.data.AnnDataManager`.
    hide_state_registries
        Default ``False``. If ``True``, skip the per-field state tables.
    console
        A :class:`rich.console.Console`; default a new one writing to stdout.
    """
    from rich.console import Console

    console = console or Console()
    reg = manager.registry
    console.print(
        f"Anndata setup with cellvi version {reg['cellvi_version']} for {reg['model_name']}."
    )
    args = ", ".join(f"{k}={v!r}" for k, v in reg["setup_args"].items())
    console.print(f"Setup via `{reg['model_name']}.{reg['setup_method_name']}({args})`.")
    rows = [[name, value] for name, value in manager.summary_stats.items()]
    console.print(state_table("Summary Statistics", ["Summary Stat Key", "Value"], rows))
    rows = [
        [key, location(loc["attr_name"], loc["attr_key"])]
        for key, loc in manager.data_registry.items()
    ]
    console.print(state_table("Data Registry", ["Registry Key", "cellvi Location"], rows))
    if hide_state_registries:
        return
    for field in manager.fields:
        state = reg["field_registries"][field.registry_key]["state_registry"]
        table = field.view_state_registry(state)
        if table is not None:
            console.print(table)
