"""A user's own training setup as an entry point: load it, check it, and feed its batches.

The contract (``gradguard advise --entry package.module:function``): the function builds one
fresh training setup and returns a :class:`Setup`, a dict with the same keys, or a tuple
``(model, optimizer, loss, data[, evaluate])``:

``model``
    the ``nn.Module`` to train, freshly initialized.
``optimizer``
    ``optimizer(model) -> torch.optim.Optimizer``, built at the learning rate you train with.
    The probe scales every param group's ``lr`` by the same factor, so ratios between groups hold.
``loss``
    ``loss(model, batch) -> Tensor``: the scalar training loss of one batch (it runs the forward).
``data``
    an iterable of batches, in whatever form ``loss`` takes them. A re-iterable (a ``DataLoader``,
    a list) is iterated again when an epoch ends; a one-shot iterator must not run out.
``evaluate`` (optional)
    ``evaluate(model) -> float`` (or a dict with a ``"metric"`` key): a held-out score, e.g. test
    accuracy. Without it the probe ranks policies by their final training loss.
``higher_is_better`` (optional, default True)
    which way ``evaluate``'s score points (False for a validation loss).

The function is called once per probe run (in worker processes), after ``torch.manual_seed``,
``random.seed`` and ``numpy.random.seed`` with the run's seed; if it takes a ``seed`` argument it
gets the seed too. See ``examples/advise_entry.py``.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import random
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

#: The keys of the contract, required first.
REQUIRED = ("model", "optimizer", "loss", "data")
OPTIONAL = ("evaluate", "higher_is_better")


@dataclass
class Setup:
    """What an entry point returns: one fresh training setup (see the module doc)."""

    model: Any
    optimizer: Callable[[Any], Any]
    loss: Callable[[Any, Any], Any]
    data: Iterable[Any]
    evaluate: Callable[[Any], Any] | None = None
    higher_is_better: bool = True


def _split(text: str) -> tuple[str, str]:
    if not isinstance(text, str) or text.count(":") != 1:
        raise ConfigError(
            f"entry point {text!r} must be 'package.module:function' (one colon), "
            "e.g. examples.advise_entry:build"
        )
    module, name = (part.strip() for part in text.split(":"))
    if not module or not name or not name.isidentifier():
        raise ConfigError(
            f"entry point {text!r} must be 'package.module:function', e.g. examples.advise_entry:build"
        )
    if module.endswith(".py") or "/" in module or os.sep in module:
        dotted = module.removesuffix(".py").replace(os.sep, ".").replace("/", ".")
        raise ConfigError(
            f"entry point {text!r}: give the module's import name, not a file path "
            f"(e.g. {dotted}:{name}, run from the folder that holds it)"
        )
    return module, name


def _import(module: str, text: str):
    # Like `python -m`, the current folder is importable (a console script does not add it).
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            raise ConfigError(
                f"entry point {text!r}: cannot import module {module!r} ({e}); run from the folder "
                "that holds it, or add that folder to PYTHONPATH"
            ) from None
        raise ConfigError(f"entry point {text!r}: importing {module!r} failed: {e}") from None
    except Exception as e:
        raise ConfigError(
            f"entry point {text!r}: importing {module!r} raised {type(e).__name__}: {e}"
        ) from None


def load_entry(text: str) -> Callable[..., Any]:
    """The function ``text`` names (``package.module:function``); ConfigError saying what is wrong."""
    module_name, name = _split(text)
    module = _import(module_name, text)
    if not hasattr(module, name):
        found = sorted(
            n
            for n, v in vars(module).items()
            if callable(v)
            and not n.startswith("_")
            and getattr(v, "__module__", None) == module_name
        )
        hint = f"; it defines: {', '.join(found)}" if found else ""
        raise ConfigError(f"entry point {text!r}: module {module_name!r} has no {name!r}{hint}")
    fn = getattr(module, name)
    if not callable(fn):
        raise ConfigError(
            f"entry point {text!r}: {name!r} is a {type(fn).__name__}, not a function; point at "
            "the function that builds the setup"
        )
    return fn


def entry_digest(text: str) -> str:
    """A fingerprint of the entry point's module source (empty if it has none): part of each run's
    stored config, so an edited setup is probed afresh rather than answered from old runs."""
    module = _import(_split(text)[0], text)
    try:
        path = inspect.getsourcefile(module)
    except TypeError:
        path = None
    if not path or not os.path.isfile(path):
        return ""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def seed_everything(seed: int) -> None:
    """torch, numpy and random seeded alike, so a run is reproducible from its seed."""
    import numpy as np
    import torch

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def build_setup(fn: Callable[..., Any], seed: int, text: str) -> Setup:
    """Seed, call the entry function (with ``seed=`` if it takes one) and check what it returned."""
    seed_everything(seed)
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None
    takes_seed = sig is not None and (
        "seed" in sig.parameters
        or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    )
    if sig is not None:
        required = [
            p.name
            for p in sig.parameters.values()
            if p.default is inspect.Parameter.empty
            and p.name != "seed"
            and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        if required:
            raise ConfigError(
                f"entry point {text!r} requires argument(s) {', '.join(required)}; it must take no "
                "argument, or a `seed` argument (the probe passes each run's seed)"
            )
    try:
        out = fn(seed=seed) if takes_seed else fn()
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"entry point {text!r} raised {type(e).__name__}: {e}") from None
    return as_setup(out, text)


def as_setup(obj: Any, text: str = "the entry point") -> Setup:
    """A :class:`Setup` from what an entry point returned, every field checked."""
    setup = _setup_of(obj, text)
    _check_setup(setup, text)
    return setup


def _setup_of(obj: Any, text: str) -> Setup:
    """``obj`` as a :class:`Setup`: one already, or a dict or tuple of its fields."""
    shape = (
        "a gradguard.advice.Setup, a dict with keys model, optimizer, loss, data (optional: "
        "evaluate, higher_is_better), or a tuple (model, optimizer, loss, data[, evaluate])"
    )
    if isinstance(obj, Setup):
        return obj
    if isinstance(obj, Mapping):
        missing = [k for k in REQUIRED if k not in obj]
        unknown = sorted(set(obj) - set(REQUIRED) - set(OPTIONAL))
        if missing or unknown:
            what = []
            if missing:
                what.append(f"lacks key(s) {', '.join(missing)}")
            if unknown:
                what.append(f"has unknown key(s) {', '.join(map(str, unknown))}")
            raise ConfigError(f"{text} returned a dict that {' and '.join(what)}; return {shape}")
        return Setup(**obj)
    if isinstance(obj, tuple) and len(obj) in (4, 5):
        return Setup(*obj)
    got = f"a tuple of {len(obj)}" if isinstance(obj, tuple) else type(obj).__name__
    raise ConfigError(f"{text} returned {got}; return {shape}")


def _check_setup(setup: Setup, text: str) -> None:
    """Refuse a setup whose fields are not what the probe trains with, saying how to fix it."""
    import torch

    if not isinstance(setup.model, torch.nn.Module):
        raise ConfigError(
            f"{text}: model must be a torch.nn.Module, got {type(setup.model).__name__}"
        )
    if not any(True for _ in setup.model.parameters()):
        raise ConfigError(f"{text}: the model has no parameters to train")
    if isinstance(setup.optimizer, torch.optim.Optimizer):
        raise ConfigError(
            f"{text}: optimizer must be a factory, optimizer(model) -> Optimizer, not an "
            "optimizer (the probe builds one per run and LR), e.g. "
            "lambda model: torch.optim.SGD(model.parameters(), lr=0.1)"
        )
    for name in ("optimizer", "loss"):
        if not callable(getattr(setup, name)):
            example = (
                "lambda model: torch.optim.SGD(model.parameters(), lr=0.1)"
                if name == "optimizer"
                else "lambda model, batch: F.cross_entropy(model(batch[0]), batch[1])"
            )
            raise ConfigError(
                f"{text}: {name} must be a function, got {type(getattr(setup, name)).__name__} "
                f"(e.g. {example})"
            )
    if not isinstance(setup.data, Iterable):
        raise ConfigError(
            f"{text}: data must be an iterable of batches (a DataLoader, a list, a generator), "
            f"got {type(setup.data).__name__}"
        )
    if setup.evaluate is not None and not callable(setup.evaluate):
        raise ConfigError(
            f"{text}: evaluate must be a function evaluate(model) -> float, got "
            f"{type(setup.evaluate).__name__}"
        )
    if not isinstance(setup.higher_is_better, bool):
        raise ConfigError(
            f"{text}: higher_is_better must be True or False, got {setup.higher_is_better!r}"
        )


def make_optimizer(setup: Setup, text: str = "the entry point"):
    """``setup.optimizer(model)``, checked to be a torch optimizer over the model's parameters."""
    import torch

    try:
        opt = setup.optimizer(setup.model)
    except Exception as e:
        raise ConfigError(
            f"{text}: optimizer(model) raised {type(e).__name__}: {e}; it must build an "
            "optimizer for the model it is given"
        ) from None
    if not isinstance(opt, torch.optim.Optimizer):
        raise ConfigError(
            f"{text}: optimizer(model) must return a torch.optim.Optimizer, got {type(opt).__name__}"
        )
    lr = opt.param_groups[0].get("lr")
    if isinstance(lr, torch.Tensor):
        lr = float(lr)
    if not isinstance(lr, (int, float)) or not lr > 0:
        raise ConfigError(f"{text}: the optimizer's learning rate must be a number > 0, got {lr!r}")
    return opt


def set_lr(opt, lr: float) -> None:
    """Scale every param group's LR so that the first group's becomes ``lr`` (ratios kept)."""
    base = float(opt.param_groups[0]["lr"])
    for g in opt.param_groups:
        g["lr"] = float(g["lr"]) * lr / base
        if "initial_lr" in g:
            g["initial_lr"] = float(g["initial_lr"]) * lr / base


def batches(data: Iterable[Any], text: str = "the entry point") -> Iterator[Any]:
    """Batches without end: a re-iterable is iterated again at each epoch's end; a one-shot
    iterator that runs out raises ConfigError."""
    one_shot = iter(data) is data
    seen = 0
    while True:
        epoch = 0
        for batch in data:
            epoch += 1
            seen += 1
            yield batch
        if one_shot:
            raise ConfigError(
                f"{text}: data ran out after {seen} batch(es); return a re-iterable (a DataLoader, "
                "a list) or an endless generator"
            )
        if epoch == 0:
            raise ConfigError(f"{text}: data yielded no batch")


def loss_value(setup: Setup, model, batch, text: str = "the entry point"):
    """``setup.loss(model, batch)``, checked to be a scalar tensor that can be back-propagated."""
    import torch

    try:
        loss = setup.loss(model, batch)
    except Exception as e:
        raise ConfigError(f"{text}: loss(model, batch) raised {type(e).__name__}: {e}") from None
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        got = (
            f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        )
        raise ConfigError(
            f"{text}: loss(model, batch) must return a scalar tensor (the batch's mean loss), got {got}"
        )
    if not loss.requires_grad:
        raise ConfigError(
            f"{text}: loss(model, batch) returned a tensor that does not require grad; compute it "
            "from model(...) outputs, outside torch.no_grad()"
        )
    return loss.reshape(())


def evaluate(setup: Setup, model, text: str = "the entry point") -> float:
    """The setup's held-out score (NaN without ``evaluate``), in eval mode and without grad."""
    import math

    import torch

    if setup.evaluate is None:
        return math.nan
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = setup.evaluate(model)
    except Exception as e:
        raise ConfigError(f"{text}: evaluate(model) raised {type(e).__name__}: {e}") from None
    finally:
        model.train(was)
    if isinstance(out, Mapping):
        if "metric" not in out:
            raise ConfigError(
                f"{text}: evaluate(model) returned a dict without a 'metric' key; return a float "
                "or {'metric': value}"
            )
        out = out["metric"]
    if isinstance(out, torch.Tensor) and out.numel() == 1:
        out = float(out)
    if isinstance(out, bool) or not isinstance(out, (int, float)):
        raise ConfigError(
            f"{text}: evaluate(model) must return a number (e.g. test accuracy), got {type(out).__name__}"
        )
    return float(out)


@dataclass(frozen=True)
class EntryInfo:
    """What checking an entry point found: its LR and whether it has a held-out score."""

    lr: float
    has_evaluate: bool
    higher_is_better: bool


def check_entry(text: str) -> EntryInfo:
    """Load the entry point, build seed 0's setup, run one batch forward and backward (and the
    evaluation): every contract error surfaces here, in this process, as a ConfigError, before
    any probe run starts."""
    fn = load_entry(text)
    setup = build_setup(fn, 0, text)
    opt = make_optimizer(setup, text)
    lr = float(opt.param_groups[0]["lr"])
    batch = next(batches(setup.data, text))
    opt.zero_grad(set_to_none=True)
    loss_value(setup, setup.model, batch, text).backward()
    if not any(p.grad is not None for p in setup.model.parameters()):
        raise ConfigError(
            f"{text}: loss(model, batch) gives no gradient to the model's parameters; compute "
            "the loss from the model it is given"
        )
    if setup.evaluate is not None:
        evaluate(setup, setup.model, text)
    return EntryInfo(lr, setup.evaluate is not None, setup.higher_is_better)
