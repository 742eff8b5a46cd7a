"""Rich tables describing a registered setup."""

from __future__ import annotations

__all__ = ["print_registry"]


def print_registry(manager, *, hide_state_registries: bool = False, console=None) -> None:
    """Print version, setup call, summary statistics, data locations and field states."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    reg = manager.registry
    console.print(f"Set up with cellvi {reg['cellvi_version']} for {reg['model_name']}.")
    args = ", ".join(f"{k}={v!r}" for k, v in reg["setup_args"].items())
    console.print(f"{reg['setup_method_name']}({args})")
    stats = Table(title="Summary Statistics")
    stats.add_column("statistic")
    stats.add_column("value")
    for name, value in manager.summary_stats.items():
        stats.add_row(name, str(value))
    console.print(stats)
    data = Table(title="Data Registry")
    data.add_column("registry key")
    data.add_column("location")
    for key, loc in manager.data_registry.items():
        where = f"adata.{loc['attr_name']}"
        if loc["attr_key"] is not None:
            where += f"[{loc['attr_key']!r}]"
        data.add_row(key, where)
    console.print(data)
    if hide_state_registries:
        return
    for field in manager.fields:
        state = reg["field_registries"][field.registry_key]["state_registry"]
        table = field.view_state_registry(state)
        if table is not None:
            console.print(table)
