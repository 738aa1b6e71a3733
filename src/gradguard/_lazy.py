"""torch and numpy, imported on first use.

The core modules (errors, layout, stats, policies, ...) write ``from .._lazy import torch`` (``np``) and
use ``torch.x`` as usual. The first attribute read imports the module and puts the real module in
place of the proxy in every gradguard module's globals (``_lazy``'s own included, so a module
imported later gets the real one): from then on ``torch.x`` is a plain module attribute read, and
patching ``torch.save`` in a test reaches gradguard as it would with ``import torch``. What this
buys: importing gradguard, parsing a policy spec, ``gradguard policies`` and ``gradguard check``
and every ``--help`` run without importing torch (~2 s on a small machine), since none of them
touches a tensor. Type checkers see the real module.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__all__ = ["np", "torch"]


class LazyModule:
    """A module imported when one of its attributes is first read."""

    def __init__(self, name: str) -> None:
        self._lazy_name = name

    def __getattr__(self, attr: str) -> Any:  # every read through a proxy still held somewhere
        if attr == "_lazy_name":  # a copy made without __init__ (pickle, copy): not a module
            raise AttributeError(attr)
        module = importlib.import_module(self._lazy_name)
        self._bind(module)
        return getattr(module, attr)

    def _bind(self, module: types.ModuleType) -> None:
        """Put ``module`` in place of this proxy in the globals of gradguard's modules."""
        for name, mod in list(sys.modules.items()):
            if name == __package__ or name.startswith(f"{__package__}."):
                namespace = getattr(mod, "__dict__", {})
                for key in [k for k, v in namespace.items() if v is self]:
                    namespace[key] = module

    def __repr__(self) -> str:
        return f"<lazy module {self._lazy_name!r}>"


if TYPE_CHECKING:
    import numpy as np
    import torch as torch
else:
    np = LazyModule("numpy")
    torch = LazyModule("torch")
