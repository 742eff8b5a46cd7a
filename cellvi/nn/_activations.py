"""Activations by name, so that an architecture stored in a model file stays plain JSON.

A model file never executes code (``STYLE.md`` rule 9), so a layer's activation is saved as
one of the names below; the torch objects scvi-tools users pass (``torch.exp``,
``torch.nn.functional.softplus``, ``torch.nn.LeakyReLU``, ...) are translated to their name
once, when the configuration is built.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["HIDDEN_ACTIVATIONS", "VARIANCE_ACTIVATIONS", "activation_name"]

#: Activations of the hidden blocks of an FC stack (``activation_fn`` in extra kwargs).
HIDDEN_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "selu": nn.SELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
}

#: Maps of the encoder variance head to positive values (``var_activation``).
VARIANCE_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "exp": torch.exp,
    "softplus": F.softplus,
}


def activation_name(value, table: dict, arg: str) -> str:
    """The name under which ``value`` (a name or one of the objects of ``table``) is stored.

    Parameters
    ----------
    value
        A key of ``table`` or one of its values (compared by identity).
    table
        :data:`HIDDEN_ACTIVATIONS` or :data:`VARIANCE_ACTIVATIONS`.
    arg
        The argument name as the user wrote it, for the error message.

    Returns
    -------
    str
        The key of ``table``.

    Raises
    ------
    ValueError
        ``value`` is neither a known name nor a known object.

    Examples
    --------
    >>> import torch
    >>> activation_name(torch.exp, VARIANCE_ACTIVATIONS, "var_activation")
    'exp'
    >>> activation_name("leaky_relu", HIDDEN_ACTIVATIONS, "activation_fn")
    'leaky_relu'
    """
    if isinstance(value, str) and value in table:
        return value
    for name, obj in table.items():
        if value is obj:
            return name
    objects = ", ".join(f"{_qualname(obj)} ({name!r})" for name, obj in table.items())
    raise ValueError(
        f"{arg}={value!r} is not supported: model files store activations by name (no code "
        f"is saved). Use one of {list(table)}, or the matching torch object: {objects}."
    )


def _qualname(obj) -> str:
    module = getattr(obj, "__module__", None) or "torch"
    if module.startswith("torch.nn.modules"):
        module = "torch.nn"
    elif module == "torch._C._nn":  # where torch.nn.functional's C functions live
        module = "torch.nn.functional"
    return f"{module}.{getattr(obj, '__name__', repr(obj))}"
