"""Where an explosion starts: the module that first made a NaN/Inf, and how it spread.

Two methods, both producing a ``localization`` record (see ``records.py``):

``localize_static(step_record, meta)``
    From telemetry alone (no model, no batch): a NaN made in backward reaches every layer on the
    input side of the layer that made it, so the origin is the non-finite layer nearest the
    output. It cannot see activations: when the loss itself is non-finite (the forward pass
    overflowed), every gradient is poisoned and only a replay can tell where.

``replay(model, closure)``
    Re-runs the step with hooks (:mod:`gradguard.replay`, part of the core, re-exported here with
    the rerun attribution ``attribute``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..replay import (
    INPUT,
    LOSS,
    PATH_LIMIT,
    REPLAY_NOTE,
    REPRODUCIBLE,
    RERUN_RTOL,
    ROOT,
    TRANSIENT,
    Localization,
    attribute,
    replay,
)

__all__ = [
    "INPUT",
    "LOSS",
    "PATH_LIMIT",
    "REPLAY_NOTE",
    "REPRODUCIBLE",
    "RERUN_RTOL",
    "ROOT",
    "TRANSIENT",
    "Localization",
    "attribute",
    "localize_static",
    "replay",
]


# ----- static: from a step record -------------------------------------------------------------------


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _order(meta: Mapping[str, Any], extra: Sequence[int]) -> list[int]:
    """Layer indices input side first: the meta's forward order, then the rest by index."""
    n = len(meta.get("layers") or [])
    order = [int(i) for i in (meta.get("forward_order") or [])]
    seen = set(order)
    for i in [*range(n), *sorted(extra)]:
        if i not in seen:
            seen.add(i)
            order.append(i)
    return order


def _layer_name(layers: Sequence[Any], i: int) -> str:
    return str(layers[i]) if 0 <= i < len(layers) else f"layer[{i}]"


def _gradient_origin(
    detail: dict[str, Any],
    layers: Sequence[Any],
    order: list[int],
    rank: dict[int, int],
    backward: list[int],
) -> str:
    """The non-finite layer nearest the output (``backward[0]``); ``detail`` gains whether every
    layer on its input side is non-finite too, and the note saying so."""
    origin = _layer_name(layers, backward[0])
    upstream = order[: rank[backward[0]] + 1]
    finite_before = [_layer_name(layers, i) for i in upstream if i not in set(backward)]
    detail["contiguous"] = not finite_before
    if finite_before:
        detail["finite_before_origin"] = finite_before[:PATH_LIMIT]
    detail["note"] = (
        f"{origin} is the non-finite layer nearest the output: a NaN made in backward reaches "
        "every layer on the input side of where it was made"
        + ("" if not finite_before else "; some of those stayed finite, so not all of it")
    )
    return origin


def localize_static(
    step_record: Mapping[str, Any], meta: Mapping[str, Any]
) -> dict[str, Any] | None:
    """A ``localization`` record (method ``static``) for a step with non-finite gradients.

    The origin is the non-finite layer last in forward order (first in backward order): a NaN
    made in backward flows towards the input and reaches every layer before it, never one after.
    ``path`` lists the non-finite layers in backward order. ``detail["contiguous"]`` says whether
    every layer on the input side of the origin is non-finite too, as one backward NaN implies;
    when it is not, the names of the finite ones are given (a parallel branch, or a parameter's
    own gradient computation, made it). A non-finite loss means the forward pass overflowed;
    every gradient is then poisoned and ``detail`` says to replay the step.

    Returns None when neither the gradients nor the loss are non-finite.
    """
    layers = list(meta.get("layers") or [])
    bad = sorted({int(i) for i in (step_record.get("nonfinite_layers") or [])})
    loss = step_record.get("loss")
    loss_finite = loss is None or _finite_number(loss)  # None: not recorded, nothing to say
    if not bad and loss_finite:
        return None

    order = _order(meta, bad)
    rank = {li: r for r, li in enumerate(order)}
    backward = sorted(bad, key=lambda li: -rank[li])
    path = [_layer_name(layers, i) for i in backward]
    detail: dict[str, Any] = {
        "nonfinite_layers": len(bad),
        "layers": len(layers),
        "forward_order_known": bool(meta.get("forward_order")),
    }
    origin = _gradient_origin(detail, layers, order, rank, backward) if bad else LOSS
    if not loss_finite:
        detail["loss_finite"] = False
        detail["note"] = (
            f"the loss is {loss}: the forward pass overflowed, so every gradient is poisoned and "
            "the static method cannot tell where it started; replay the step "
            "(guard.step(loss, replay=lambda: loss_fn(model(x), y))) to find the module"
        )
        detail["suggest"] = "replay"
    return {
        "type": "localization",
        "step": step_record.get("step"),
        "origin": origin,
        "phase": "gradient",
        "path": path[:PATH_LIMIT],
        "method": "static",
        "detail": detail,
    }
