"""Where each guarded parameter lives: its name, the layer (module) that owns it, and which layer is
the model's output head. Built once per Guard; the per-step statistics index into it."""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ._lazy import torch

if TYPE_CHECKING:
    from torch import nn


@dataclass
class ParamLayout:
    """The guarded parameters in optimizer order, with names and layer membership.

    ``layer_of[i]`` is the index in ``layer_names`` of the module that directly owns parameter ``i``
    (a Linear's weight and bias share a layer). Parameters that the optimizer holds but the model
    does not name are given the names ``param.<i>`` and a layer each.
    """

    params: list[torch.Tensor]
    names: list[str]
    layer_names: list[str]
    layer_of: list[int]
    module: nn.Module | None = None
    # Layers in the order their forward ran the first time (filled by `watch_forward_order`).
    forward_order: list[int] = field(default_factory=list)
    _index_cache: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = field(
        default_factory=dict, repr=False
    )

    @classmethod
    def build(cls, model: nn.Module | None, optimizer: torch.optim.Optimizer) -> ParamLayout:
        params: list[torch.Tensor] = []
        seen: set[int] = set()
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        owner: dict[int, tuple[str, str]] = {}
        if model is not None:
            for mod_name, mod in model.named_modules(remove_duplicate=False):
                for p_name, p in mod.named_parameters(recurse=False, remove_duplicate=False):
                    # The first owner wins: tied weights belong to the module registered first.
                    if id(p) not in owner:
                        full = f"{mod_name}.{p_name}" if mod_name else p_name
                        owner[id(p)] = (full, mod_name or "(root)")
        names: list[str] = []
        layer_names: list[str] = []
        layer_of: list[int] = []
        layer_index: dict[str, int] = {}
        for i, p in enumerate(params):
            name, layer = owner.get(id(p), (f"param.{i}", f"param.{i}"))
            names.append(name)
            if layer not in layer_index:
                layer_index[layer] = len(layer_names)
                layer_names.append(layer)
            layer_of.append(layer_index[layer])
        return cls(params, names, layer_names, layer_of, module=model)

    def __len__(self) -> int:
        return len(self.params)

    def select(self, patterns: Iterable[str]) -> list[int]:
        """Indices of the parameters whose name or layer name matches any glob pattern."""
        pats = list(patterns)
        return [
            i
            for i, (n, li) in enumerate(zip(self.names, self.layer_of, strict=True))
            if any(
                fnmatch.fnmatchcase(n, p) or fnmatch.fnmatchcase(self.layer_names[li], p)
                for p in pats
            )
        ]

    def watch_forward_order(self) -> None:
        """Record the order in which parameter-owning layers start during the next forward pass.

        Pre-hooks (called when a module's forward starts) give the order; they are removed after
        the first forward, so training pays nothing afterwards. The last layer to start is the
        output head (e.g. the classifier AGC leaves unclipped), found from what the model computes
        rather than from where the layer is registered. A container that owns parameters itself
        (the root's ``logit_scale``, say) starts before its children, so it is never taken for the
        head just because its forward returns last.
        """
        if self.module is None or self.forward_order:
            return
        layer_index = {n: i for i, n in enumerate(self.layer_names)}
        handles: list[torch.utils.hooks.RemovableHandle] = []
        order: list[int] = []

        def on_start(mod_name: str) -> Callable[[nn.Module, object], None]:
            def hook(_module: nn.Module, _inp: object) -> None:
                li = layer_index.get(mod_name)
                if li is not None:
                    order.append(li)

            return hook

        def on_root_done(_module: nn.Module, _inp: object, _out: object) -> None:
            if order:
                # Keep the first start of each layer, in order.
                self.forward_order[:] = list(dict.fromkeys(order))
            for h in handles:
                h.remove()

        for mod_name, mod in self.module.named_modules():
            if any(True for _ in mod.parameters(recurse=False)):
                handles.append(mod.register_forward_pre_hook(on_start(mod_name or "(root)")))
        handles.append(self.module.register_forward_hook(on_root_done))

    def head_layer(self) -> int | None:
        """Index of the output layer: the last parameter-owning layer the forward pass ran.

        Before any forward has been seen, falls back to the last registered layer, with a warning.
        """
        if self.forward_order:
            return self.forward_order[-1]
        if not self.layer_names:
            return None
        warnings.warn(
            "gradguard could not observe a forward pass to find the output layer; assuming the last "
            "registered layer is the head. Build the Guard before the first forward, or pass "
            "exclude=[...] explicitly.",
            stacklevel=3,
        )
        return len(self.layer_names) - 1

    def index_tensor(self, values: Sequence[int], device: torch.device) -> torch.Tensor:
        """A cached long tensor of ``values`` on ``device``.

        Building an index tensor from a Python list is a host-to-device copy, which on CUDA waits
        for the stream; the index sets a step needs repeat, so each is built once.
        """
        key = (tuple(values), device)
        t = self._index_cache.get(key)
        if t is None:
            if len(self._index_cache) > 256:  # grads appearing and vanishing in many patterns
                self._index_cache.clear()
            t = self._index_cache[key] = torch.tensor(key[0], dtype=torch.long, device=device)
        return t

    def params_of_layers(self, layers: Sequence[int]) -> list[int]:
        wanted = set(layers)
        return [i for i, li in enumerate(self.layer_of) if li in wanted]
