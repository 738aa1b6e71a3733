"""A labelled corpus of training runs: each made with one known cause injected (at a given
strength), or healthy, recorded by a Guard's telemetry and read back for the diagnosis rules.

A :class:`Case` trains one small model with its cause and says which findings the diagnosis must
make (``expect``: every one of them) and which it may also make (``allow``: effects the injected
cause really has, e.g. a run ruined by a NaN-free explosion also "degraded"; each ``allow`` says
why). Any other finding is a false positive. The causes and controls:

===========================  =================================================================
case                         what is injected
===========================  =================================================================
``lr/sgd|momentum|adam``     too high an LR for a shallow plain MLP on digits
``init/large|small``         He init scaled by ``init_scale`` (>1: gradients grow with depth,
                             <1: they vanish) in a deep tanh MLP at a modest LR
``deep_plain``               a 16-layer ReLU MLP without normalization at an LR that is fine
                             for a shallow one
``dead_relu``                a deep ReLU MLP at momentum LR 0.3 (its units die), or with
                             hidden biases pushed negative
``outlier``                  one batch whose inputs are scaled up (``poison:mode=scale``)
``label_noise``              a burst of consecutive batches with permuted labels
``fp16``                     frequent fp16 overflows under a GradScaler
``rnn_radius``               a vanilla RNN whose recurrent init puts its spectral radius > 1
``attention``                a GPT char LM at a high AdamW LR without qk-layernorm
``output_logits/mlp|gpt``    the output logits' common mode walked down a fixed step each
                             step (``logit_drift``: an output bias, or a bias-free head's rows)
``nan_once``                 one NaN gradient at one step, skipped by ``skip_nonfinite``
``lr_burst``                 the LR multiplied for a few steps (an update-norm spike)
``healthy/...``              negative controls: every model family trained well (a vanilla
                             RNN at 1-1.3x its default recurrent init: radius 0.6-0.85); data
                             whose epochs end in a small last batch; a slow, calm learner
===========================  =================================================================

``make(case, strength, seed, run_dir)`` trains it; ``CASES`` holds every case; ``diagnosed``
reads a run back and returns the set of causes found. The tests run one strength and seed of each
case, ``benchmarks/bench_diagnosis.py`` all of them over seeds and prints the confusion table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gradguard
from gradguard import faults
from gradguard.bench.models import build_model
from gradguard.bench.tasks import make_task
from gradguard.bench.train import pinned_threads
from gradguard.diagnose import diagnose, load_run

#: Steps per run for the small models (the GPT and the RNN take fewer).
STEPS = 300


@dataclass(frozen=True)
class Case:
    """One labelled kind of run. ``strengths``: the injected cause's settings the corpus covers
    (the tests use the first); ``make(strength, seed, run_dir)`` trains and records one run."""

    name: str
    expect: frozenset[str]
    allow: frozenset[str]
    strengths: tuple[Any, ...]
    make: Callable[[Any, int, Path], dict[str, Any]]
    why_allowed: str = ""
    #: What a run must be diagnosed with instead when its trained model was measured non-finite
    #: (the cause took that run past its usual effect, to NaN weights; ``expect`` is then allowed:
    #: it may have shown before the NaN); None: ``expect`` holds whatever the run did.
    if_nonfinite: frozenset[str] | None = None

    @property
    def label(self) -> str:
        return ",".join(sorted(self.expect)) or "healthy"


@dataclass
class Setup:
    """What one run trains: a task, a model, an optimizer and how the Guard watches."""

    task: Any
    model: nn.Module
    optimizer: torch.optim.Optimizer
    policy: str = "none"
    faults: str = "none"
    steps: int = STEPS
    batch_size: int = 64
    scaler: torch.amp.GradScaler | None = None
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None


def train(s: Setup, seed: int, run_dir: Path) -> dict[str, Any]:
    """Train ``s`` for its steps with a Guard recording telemetry to ``run_dir``, and return what
    is true of the trained model (:func:`truth`). A run whose weights went non-finite stops a few
    steps later (nothing more can happen to it)."""
    plan = faults.parse(s.faults, seed=seed) if s.faults != "none" else None
    gen = torch.Generator().manual_seed(seed)
    batches = s.batches or s.task.batches(s.batch_size, gen)
    loss_fn = s.loss or s.task.loss
    guard = gradguard.Guard(
        s.model,
        s.optimizer,
        s.policy,
        check_finite=s.policy != "none",
        scaler=s.scaler,
        log_dir=run_dir,
    )
    dead_for = 0
    try:
        for step in range(s.steps):
            x, y = next(batches)
            if plan is not None:
                x, y = plan.on_batch(step, x, y)
            s.optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(s.model(x), y)
            (s.scaler.scale(loss) if s.scaler is not None else loss).backward()
            if plan is not None:
                plan.on_gradients(step, s.model)
                plan.on_optimizer(step, s.optimizer)
            guard.step(loss)
            if plan is not None:
                plan.after_step(step, s.optimizer)
            finite = all(bool(torch.isfinite(p).all()) for p in s.model.parameters())
            dead_for = 0 if finite else dead_for + 1
            if dead_for > 5:
                break
    finally:
        guard.close()
    return truth(s)


#: A ReLU unit is dead when it outputs 0 for every one of these many training examples.
TRUTH_EXAMPLES = 512


def truth(s: Setup) -> dict[str, Any]:
    """Measured on the trained model, independently of the telemetry: ``finite`` (every weight)
    and ``dead`` (the share of its ReLU units, features or channels, that output 0 for every one
    of the first ``TRUTH_EXAMPLES`` training inputs; None without ReLUs or with non-finite
    weights)."""
    finite = all(bool(torch.isfinite(p).all()) for p in s.model.parameters())
    counts = [0, 0]
    layers: list[float] = []

    def hook(_m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        alive = (out != 0).flatten(2).any(-1) if out.dim() > 2 else out != 0
        units = alive.any(0)
        counts[0] += int((~units).sum())
        counts[1] += units.numel()
        layers.append(float((~units).float().mean()))

    handles = [m.register_forward_hook(hook) for m in s.model.modules() if isinstance(m, nn.ReLU)]
    x = s.task.train[0][:TRUTH_EXAMPLES]
    try:
        with torch.no_grad():
            s.model(x)
    finally:
        for h in handles:
            h.remove()
    dead = counts[0] / counts[1] if counts[1] and finite else None
    worst = max(layers) if layers and finite else None
    return {"finite": finite, "dead": dead, "dead_layer": worst}


# ----- the models --------------------------------------------------------------------------------
_DIGITS: dict[int, Any] = {}


def digits(seed: int = 0) -> Any:
    if seed not in _DIGITS:
        _DIGITS[seed] = make_task("digits", seed=seed)
    return _DIGITS[seed]


def _seeded(seed: int) -> None:
    torch.manual_seed(1000 + seed)


def _opt(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    raise ValueError(name)


def mlp_setup(seed: int, opt: str, lr: float, **model: Any) -> Setup:
    task = digits(seed)
    _seeded(seed)
    net = build_model("mlp", task.input_shape, task.num_outputs, **model)
    return Setup(task, net, _opt(opt, net.parameters(), lr))


# ----- causes ------------------------------------------------------------------------------------
def _lr(opt: str, depth: int = 3) -> Callable[[Any, int, Path], dict[str, Any]]:
    def make(lr: float, seed: int, run_dir: Path) -> dict[str, Any]:
        return train(mlp_setup(seed, opt, lr, depth=depth, width=64), seed, run_dir)

    return make


def _init(
    activation: str, depth: int, opt: str = "sgd"
) -> Callable[[Any, int, Path], dict[str, Any]]:
    def make(scale: float, seed: int, run_dir: Path) -> dict[str, Any]:
        s = mlp_setup(
            seed, opt, 0.01, depth=depth, width=64, activation=activation, init_scale=scale
        )
        return train(s, seed, run_dir)

    return make


def _deep_plain(lr: float, seed: int, run_dir: Path) -> dict[str, Any]:
    return train(mlp_setup(seed, "momentum", lr, depth=16, width=64), seed, run_dir)


def _dead_lr(lr: float, seed: int, run_dir: Path) -> dict[str, Any]:
    return train(mlp_setup(seed, "momentum", lr, depth=12, width=64), seed, run_dir)


def _dead_bias(bias: float, seed: int, run_dir: Path) -> dict[str, Any]:
    s = mlp_setup(seed, "momentum", 0.01, depth=6, width=64)
    linears = [m for m in s.model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for m in linears[1:-1]:  # the hidden layers after the first
            m.bias.fill_(bias)
    return train(s, seed, run_dir)


def _outlier(scale: float, seed: int, run_dir: Path) -> dict[str, Any]:
    s = mlp_setup(seed, "momentum", 0.03, depth=4, width=64)
    s.faults = f"poison:mode=scale,scale={scale},at={25 + 7 * seed}"
    return train(s, seed, run_dir)


def _label_noise(burst: int, seed: int, run_dir: Path) -> dict[str, Any]:
    s = mlp_setup(seed, "momentum", 0.03, depth=4, width=64)
    start = 150 + 11 * seed
    s.faults = "poison:mode=shuffle,at=" + "|".join(str(start + i) for i in range(burst))
    return train(s, seed, run_dir)


def _overflowing(s: Setup, p: float) -> Setup:
    """``s`` under a GradScaler whose steps overflow with probability ``p``, skipped."""
    s.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    s.faults = f"fp16_overflow:p={p}"
    s.policy = "skip_nonfinite"
    return s


def _fp16(p: float, seed: int, run_dir: Path) -> dict[str, Any]:
    return train(_overflowing(mlp_setup(seed, "sgd", 0.05, depth=4, width=64), p), seed, run_dir)


def _sequence_task(T: int, seed: int) -> Any:
    return make_task("adding", T=T, seed=seed)


def _rnn(opt: str, lr: float) -> Callable[[Any, int, Path], dict[str, Any]]:
    def make(init_scale: float, seed: int, run_dir: Path) -> dict[str, Any]:
        task = make_task("adding", T=50, seed=seed)
        _seeded(seed)
        net = build_model(
            "rnn", task.input_shape, task.num_outputs, hidden=64, init_scale=init_scale
        )
        start = recurrent_radius(net)
        measured = train(
            Setup(task, net, _opt(opt, net.parameters(), lr), steps=150), seed, run_dir
        )
        end = recurrent_radius(net)
        # the cause is true of the run where the radius was above 1 at its start or its end (an
        # init scale puts it there for most seeds, not all: 1.6x gave 0.95-1.36)
        measured["radius"] = max(start, end)  # inf where the weights went non-finite
        return measured

    return make


def recurrent_radius(model: nn.Module) -> float:
    """The largest |eigenvalue| of a vanilla ``nn.RNN``'s recurrent weights in ``model``, read
    from the weights (not the telemetry); inf when they are non-finite."""
    worst = 0.0
    for m in model.modules():
        if isinstance(m, nn.RNN):
            for name, w in m.named_parameters():
                if name.startswith("weight_hh"):
                    if not bool(torch.isfinite(w).all()):
                        return math.inf
                    worst = max(worst, float(torch.linalg.eigvals(w.detach()).abs().max()))
    return worst


_CHARLM: list[Any] = []


def _charlm() -> Any:
    if not _CHARLM:
        _CHARLM.append(make_task("charlm", context=32, max_chars=200_000))
    return _CHARLM[0]


def _gpt(lr: float, seed: int, run_dir: Path, *, qk_layernorm: bool = False) -> dict[str, Any]:
    task = _charlm()
    _seeded(seed)
    net = build_model(
        "gpt", task.input_shape, task.num_outputs, d_model=64, n_layers=2, qk_layernorm=qk_layernorm
    )
    s = Setup(task, net, _opt("adamw", net.parameters(), lr), steps=200, batch_size=32)
    return train(s, seed, run_dir)


def _logit_drift_mlp(rate: float, seed: int, run_dir: Path) -> dict[str, Any]:
    """A shallow MLP at a healthy Adam LR whose output bias walks down ``rate`` nats a step."""
    s = mlp_setup(seed, "adam", 1e-3, depth=4, width=64)
    s.faults = f"logit_drift:rate={rate},p=1"
    return train(s, seed, run_dir)


def _logit_drift_gpt(rate: float, seed: int, run_dir: Path) -> dict[str, Any]:
    """The GPT at a healthy AdamW LR whose bias-free head's rows walk along its mean input."""
    task = _charlm()
    _seeded(seed)
    net = build_model("gpt", task.input_shape, task.num_outputs, d_model=64, n_layers=2)
    s = Setup(task, net, _opt("adamw", net.parameters(), 1e-3), steps=200, batch_size=32)
    s.faults = f"logit_drift:rate={rate},p=1"
    return train(s, seed, run_dir)


def _nan_once(at: int, seed: int, run_dir: Path) -> dict[str, Any]:
    s = mlp_setup(seed, "adam" if seed % 2 else "momentum", 1e-3 if seed % 2 else 0.03, depth=4)
    s.faults = f"nan:at={at}"
    s.policy = "skip_nonfinite"
    return train(s, seed, run_dir)


def _lr_burst(factor: float, seed: int, run_dir: Path) -> dict[str, Any]:
    s = mlp_setup(seed, "momentum", 0.01, depth=4, width=64)
    s.faults = f"lr_burst:factor={factor},steps=10,at={150 + 7 * seed}"
    return train(s, seed, run_dir)


# ----- negative controls -------------------------------------------------------------------------
def _healthy_mlp(opt: str) -> Callable[[Any, int, Path], dict[str, Any]]:
    lrs = {"sgd": 0.1, "momentum": 0.01, "adam": 1e-3, "adamw": 1e-3}

    def make(depth: int, seed: int, run_dir: Path) -> dict[str, Any]:
        return train(mlp_setup(seed, opt, lrs[opt], depth=depth, width=64), seed, run_dir)

    return make


def _healthy_deep(depth: int, seed: int, run_dir: Path) -> dict[str, Any]:
    """A deep plain ReLU MLP (He init) at a modest LR: it trains well."""
    return train(mlp_setup(seed, "sgd", 0.01, depth=depth, width=64), seed, run_dir)


def _healthy_cnn(width: int, seed: int, run_dir: Path) -> dict[str, Any]:
    task = digits(seed)
    _seeded(seed)
    net = build_model("cnn", task.input_shape, task.num_outputs, depth=3, width=width)
    return train(
        Setup(task, net, _opt("momentum", net.parameters(), 0.01), steps=150), seed, run_dir
    )


def _healthy_rnn(hidden: int, seed: int, run_dir: Path) -> dict[str, Any]:
    task = _sequence_task(20, seed)
    _seeded(seed)
    net = build_model("lstm", task.input_shape, task.num_outputs, hidden=hidden)
    return train(Setup(task, net, _opt("adam", net.parameters(), 3e-3), steps=150), seed, run_dir)


def _healthy_gpt(lr: float, seed: int, run_dir: Path) -> dict[str, Any]:
    return _gpt(lr, seed, run_dir)


def _small_last_batch(last: int, seed: int, run_dir: Path) -> dict[str, Any]:
    """Epochs in order, the last batch of each holding only ``last`` examples."""
    s = mlp_setup(seed, "momentum", 0.01, depth=4, width=64)
    x, y = s.task.train
    n = 64 * 6 + last
    x, y = x[:n], y[:n]

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(n, generator=gen)
            for i in range(0, n, 64):
                idx = order[i : i + 64]
                yield x[idx], y[idx]

    s.batches = batches()
    return train(s, seed, run_dir)


def _slow_calm(lr: float, seed: int, run_dir: Path) -> dict[str, Any]:
    return train(mlp_setup(seed, "sgd", lr, depth=3, width=64), seed, run_dir)


# ----- the corpus --------------------------------------------------------------------------------
def _case(
    name: str,
    expect: str | tuple[str, ...],
    strengths: tuple[Any, ...],
    make: Callable[[Any, int, Path], dict[str, Any]],
    allow: tuple[str, ...] = (),
    why: str = "",
    if_nonfinite: tuple[str, ...] | None = None,
) -> Case:
    exp = (expect,) if isinstance(expect, str) else expect
    nonfinite = None if if_nonfinite is None else frozenset(if_nonfinite)
    return Case(
        name, frozenset(e for e in exp if e), frozenset(allow), strengths, make, why, nonfinite
    )


_DEGRADES = "the injected cause ruins the run, so the loss ends far above its best"

CASES: list[Case] = [
    _case("lr/sgd", "lr_too_high", (2.0, 4.0), _lr("sgd"), ("loss_degradation",), _DEGRADES),
    _case(
        "lr/momentum", "lr_too_high", (0.5, 1.0), _lr("momentum"), ("loss_degradation",), _DEGRADES
    ),
    _case("lr/adam", "lr_too_high", (0.05, 0.2), _lr("adam"), ("loss_degradation",), _DEGRADES),
    _case(
        "init/tanh_large",
        "init_depth",
        (3.0, 2.5),
        _init("tanh", 12),
        ("loss_degradation",),
        _DEGRADES,
    ),
    _case(
        "init/relu_large",
        "init_depth",
        (2.5, 2.0),
        _init("relu", 6, "momentum"),
        ("loss_degradation", "dead_units", "lr_too_high"),
        "outputs of ~1e3 at the start make every update too large for the LR and kill the ReLUs "
        "the first steps push below zero",
    ),
    _case("init/small", "init_depth", (0.5, 0.6), _init("relu", 12)),
    _case(
        "deep_plain",
        "missing_normalization",
        (0.1, 0.2),
        _deep_plain,
        ("lr_too_high", "init_depth", "dead_units", "loss_degradation"),
        "a deep plain net diverges at an LR a shallow one takes, its gradients grow with depth "
        "and its ReLUs die: each is a true account of it",
    ),
    _case(
        "dead_relu/lr",
        "dead_units",
        (0.3, 0.2),
        _dead_lr,
        ("lr_too_high", "missing_normalization", "loss_degradation"),
        "the units die because the LR is too high for a deep plain net; on some float paths the "
        "same LR then takes the weights to NaN, and the too-high LR is what must be found",
        if_nonfinite=("lr_too_high",),
    ),
    _case("dead_relu/bias", "dead_units", (-3.0, -10.0), _dead_bias),
    _case("outlier", "outlier_batch", (1e3, 1e2), _outlier, ("loss_degradation",), _DEGRADES),
    _case("label_noise", "label_noise", (10, 5), _label_noise),
    _case("fp16", "fp16_overflow", (0.3, 0.6), _fp16),
    _case(
        "rnn_radius/sgd",
        "recurrent_explosion",
        (2.0, 2.5),
        _rnn("sgd", 0.05),
        ("lr_too_high", "loss_degradation"),
        "a recurrence that explodes makes every update too large for the LR, and ruins the run",
    ),
    _case(
        "attention",
        "attention_logits",
        (1e-2, 3e-2),
        _gpt,
        ("lr_too_high", "loss_degradation"),
        "the logits grow because the LR is too high without qk-layernorm",
    ),
    _case("output_logits/mlp", "output_logits", (0.5, 0.2), _logit_drift_mlp),
    _case("output_logits/gpt", "output_logits", (0.5, 0.2), _logit_drift_gpt),
    _case("nan_once", "single_bad_step", (3, 150), _nan_once),
    _case(
        "lr_burst",
        "update_spike",
        (30.0, 100.0),
        _lr_burst,
        ("lr_too_high", "loss_degradation"),
        "during the burst the LR is too high",
    ),
    _case("healthy/mlp_sgd", (), (3, 6), _healthy_mlp("sgd")),
    _case("healthy/mlp_momentum", (), (3, 6), _healthy_mlp("momentum")),
    _case("healthy/mlp_adam", (), (3, 6), _healthy_mlp("adam")),
    _case("healthy/deep_mlp", (), (12, 10), _healthy_deep),
    _case("healthy/cnn", (), (32, 64), _healthy_cnn),
    _case("healthy/lstm", (), (64, 32), _healthy_rnn),
    _case("healthy/rnn", (), (1.0, 1.3), _rnn("sgd", 0.05)),
    _case("healthy/gpt", (), (1e-3, 3e-4), _healthy_gpt),
    _case("healthy/small_last_batch", (), (3, 1), _small_last_batch),
    _case("healthy/slow_calm", (), (0.003, 0.001), _slow_calm),
]

BY_NAME = {c.name: c for c in CASES}

#: A second set of strengths per case, between and beyond the corpus's own (``python
#: benchmarks/bench_diagnosis.py --off-grid``). Not held out: the rules were revisited on it
#: twice (issue 16: the lone-spike, momentum build-up and init bounds; then the loss-jump evidence
#: for a too-high LR), and it is reported beside the corpus, misses included.
OFF_GRID: dict[str, tuple[Any, ...]] = {
    "lr/sgd": (1.5, 3.0),
    "lr/momentum": (0.3, 0.7),
    "lr/adam": (0.03, 0.1),
    "init/tanh_large": (2.2,),
    "init/relu_large": (3.0,),
    "init/small": (0.4, 0.7),
    "deep_plain": (0.15,),
    "dead_relu/lr": (0.25,),
    "dead_relu/bias": (-5.0,),
    "outlier": (3e2,),
    "label_noise": (7,),
    "fp16": (0.45,),
    "rnn_radius/sgd": (1.7, 3.0),
    "attention": (2e-2,),
    "output_logits/mlp": (0.35,),
    "output_logits/gpt": (0.35,),
    "nan_once": (50,),
    "lr_burst": (50.0,),
    "healthy/mlp_sgd": (4,),
    "healthy/mlp_momentum": (4,),
    "healthy/mlp_adam": (4,),
    "healthy/deep_mlp": (8,),
    "healthy/cnn": (48,),
    "healthy/lstm": (48,),
    "healthy/rnn": (0.8, 1.15),
    "healthy/gpt": (6e-4,),
    "healthy/small_last_batch": (2,),
    "healthy/slow_calm": (0.002,),
}


# ----- across models: the causes on models and optimizers the corpus's cases do not use ---------
def _cnn(seed: int, opt: str, lr: float, steps: int = 200, **model: Any) -> Setup:
    task = digits(seed)
    _seeded(seed)
    net = build_model("cnn", task.input_shape, task.num_outputs, **model)
    return Setup(task, net, _opt(opt, net.parameters(), lr), steps=steps)


def _seq(seed: int, model: str, opt: str, lr: float, T: int = 20, **options: Any) -> Setup:
    task = make_task("adding", T=T, seed=seed)
    _seeded(seed)
    net = build_model(model, task.input_shape, task.num_outputs, **options)
    return Setup(task, net, _opt(opt, net.parameters(), lr), steps=150)


def _gpt3(seed: int, lr: float) -> Setup:
    """A wider, deeper GPT than the corpus's (d_model 96, 3 layers)."""
    task = _charlm()
    _seeded(seed)
    net = build_model("gpt", task.input_shape, task.num_outputs, d_model=96, n_layers=3)
    return Setup(task, net, _opt("adamw", net.parameters(), lr), steps=200, batch_size=32)


def _with(
    setup: Callable[..., Setup],
    *args: Any,
    faults: Callable[[Any, int], str] | None = None,
    policy: str = "none",
    **kw: Any,
) -> Callable[[Any, int, Path], dict[str, Any]]:
    """A case's ``make``: trains ``setup(seed, *args, **kw)`` (an ``arg`` that is
    :data:`_strength` is the case's strength) with ``faults(strength, seed)`` and ``policy``."""

    def make(strength: Any, seed: int, run_dir: Path) -> dict[str, Any]:
        s = setup(seed, *(strength if a is _strength else a for a in args), **kw)
        if faults is not None:
            s.faults = faults(strength, seed)
        s.policy = policy
        return train(s, seed, run_dir)

    return make


#: In :func:`_with`'s arguments: the case's strength goes here.
_strength = object()


def _cnn_bias(bias: float, seed: int, run_dir: Path) -> dict[str, Any]:
    s = _cnn(seed, "momentum", 0.01, depth=4, width=32)
    with torch.no_grad():
        for m in [m for m in s.model.modules() if isinstance(m, nn.Conv2d)][1:]:
            m.bias.fill_(bias)
    return train(s, seed, run_dir)


def _mlp_bias_sgd(bias: float, seed: int, run_dir: Path) -> dict[str, Any]:
    s = mlp_setup(seed, "sgd", 0.05, depth=8, width=48)
    with torch.no_grad():
        for m in [m for m in s.model.modules() if isinstance(m, nn.Linear)][2:-1]:
            m.bias.fill_(bias)
    return train(s, seed, run_dir)


def _fp16_cnn(p: float, seed: int, run_dir: Path) -> dict[str, Any]:
    return train(_overflowing(_cnn(seed, "sgd", 0.05, depth=3, width=32), p), seed, run_dir)


def _radius_h32(init_scale: float, seed: int, run_dir: Path) -> dict[str, Any]:
    s = _seq(seed, "rnn", "sgd", 0.03, T=30, hidden=32, init_scale=init_scale)
    start = recurrent_radius(s.model)
    measured = train(s, seed, run_dir)
    measured["radius"] = max(start, recurrent_radius(s.model))
    return measured


_ACROSS_DEEP = ("lr_too_high", "init_depth", "dead_units", "loss_degradation")
_ACROSS_LR = ("loss_degradation",)

#: The causes of the corpus injected into models and optimizers its cases do not use: CNNs
#: (plain, batch-normed), a GRU and LSTMs, AdamW, wider and deeper MLPs, a 3-layer GPT
#: (``python benchmarks/bench_diagnosis.py --across``). Not held out: made in the session that
#: fixed four rules on them (the radius before the update, the momentum-carried update spike, a
#: deep plain net that never learned, the lead-in blow-up, the outlier the run took).
ACROSS: list[Case] = [
    _case("across/lr/cnn_sgd", "lr_too_high", (1.5,), _with(_cnn, "sgd", _strength, depth=3, width=32), _ACROSS_LR, _DEGRADES),
    _case("across/lr/cnn_adam", "lr_too_high", (0.05,), _with(_cnn, "adam", _strength, depth=3, width=32), _ACROSS_LR, _DEGRADES),
    _case("across/lr/mlp_adamw", "lr_too_high", (0.08,), _with(mlp_setup, "adamw", _strength, depth=4, width=96), _ACROSS_LR, _DEGRADES),
    _case("across/lr/gru_sgd", "lr_too_high", (20.0,), _with(_seq, "gru", "sgd", _strength, hidden=48), _ACROSS_LR, _DEGRADES),
    _case("across/lr/lstm_adam", "lr_too_high", (0.3,), _with(_seq, "lstm", "adam", _strength, hidden=64), _ACROSS_LR, _DEGRADES),
    _case("across/init/cnn_large", "init_depth", (3.0,), _with(_cnn, "sgd", 0.01, depth=6, width=32, init_scale=3.0), ("lr_too_high", "loss_degradation", "dead_units"), "outputs far too large at the start make every update too large for the LR"),
    _case("across/init/cnn_small", "init_depth", (0.4,), _with(_cnn, "sgd", 0.01, depth=8, width=32, init_scale=0.4)),
    _case("across/init/tanh_small", "init_depth", (0.45,), _with(mlp_setup, "sgd", 0.01, depth=14, width=48, activation="tanh", init_scale=0.45)),
    _case("across/deep_plain/mlp20_sgd", "missing_normalization", (0.3,), _with(mlp_setup, "sgd", _strength, depth=20, width=48), _ACROSS_DEEP, "as deep_plain"),
    _case("across/deep_plain/mlp24_momentum", "missing_normalization", (0.1,), _with(mlp_setup, "momentum", _strength, depth=24, width=64), _ACROSS_DEEP, "as deep_plain"),
    _case("across/deep_plain/cnn12", "missing_normalization", (0.05,), _with(_cnn, "momentum", _strength, depth=12, width=32), _ACROSS_DEEP, "as deep_plain"),
    _case("across/dead_relu/mlp_bias_sgd", "dead_units", (-6.0,), _mlp_bias_sgd),
    _case("across/dead_relu/cnn_bias", "dead_units", (-4.0,), _cnn_bias),
    _case("across/outlier/cnn", "outlier_batch", (500.0,), _with(_cnn, "momentum", 0.01, depth=3, width=32, faults=lambda k, seed: f"poison:mode=scale,scale={k},at={40 + 5 * seed}"), _ACROSS_LR, _DEGRADES),
    _case("across/outlier/lstm", "outlier_batch", (300.0,), _with(_seq, "lstm", "adam", 3e-3, hidden=48, faults=lambda k, seed: f"poison:mode=scale,scale={k},at={60 + 5 * seed}"), _ACROSS_LR, _DEGRADES),
    _case("across/label_noise/cnn", "label_noise", (8,), _with(_cnn, "momentum", 0.01, steps=300, depth=3, width=32, faults=lambda k, seed: "poison:mode=shuffle,at=" + "|".join(str(160 + 3 * seed + i) for i in range(k)))),
    _case("across/fp16/cnn", "fp16_overflow", (0.4,), _fp16_cnn),
    _case("across/rnn_radius/h32_T30", "recurrent_explosion", (2.2,), _radius_h32, ("lr_too_high", "loss_degradation"), "a recurrence that explodes makes every update too large for the LR"),
    _case("across/attention/gpt3", "attention_logits", (2e-2,), _with(_gpt3, _strength), ("lr_too_high", "loss_degradation"), "the logits grow because the LR is too high without qk-layernorm"),
    _case("across/output_logits/cnn", "output_logits", (0.3,), _with(_cnn, "adam", 1e-3, depth=3, width=32, faults=lambda k, _: f"logit_drift:rate={k},p=1")),
    _case("across/nan_once/cnn", "single_bad_step", (80,), _with(_cnn, "adam", 1e-3, depth=3, width=32, faults=lambda k, _: f"nan:at={k}", policy="skip_nonfinite")),
    _case("across/nan_once/gru", "single_bad_step", (30,), _with(_seq, "gru", "adam", 3e-3, hidden=48, faults=lambda k, _: f"nan:at={k}", policy="skip_nonfinite")),
    _case("across/nan_once/gpt", "single_bad_step", (60,), _with(_gpt3, 1e-3, faults=lambda k, _: f"nan:at={k}", policy="skip_nonfinite")),
    _case("across/lr_burst/adam", "update_spike", (40.0,), _with(mlp_setup, "adam", 1e-3, depth=4, width=64, faults=lambda k, seed: f"lr_burst:factor={k},steps=8,at={120 + 9 * seed}"), ("lr_too_high", "loss_degradation"), "during the burst the LR is too high"),
    _case("across/healthy/cnn_adam", (), (1e-3,), _with(_cnn, "adam", _strength, depth=3, width=32)),
    _case("across/healthy/cnn_sgd", (), (0.05,), _with(_cnn, "sgd", _strength, depth=2, width=16)),
    _case("across/healthy/cnn_batchnorm", (), (0.05,), _with(_cnn, "momentum", _strength, depth=4, width=32, norm="batch")),
    _case("across/healthy/gru_adam", (), (3e-3,), _with(_seq, "gru", "adam", _strength, hidden=48)),
    _case("across/healthy/gru_adamw", (), (5e-3,), _with(_seq, "gru", "adamw", _strength, hidden=32)),
    _case("across/healthy/lstm_T10", (), (5e-3,), _with(_seq, "lstm", "adam", _strength, T=10, hidden=48)),
    _case("across/healthy/mlp_adamw", (), (1e-3,), _with(mlp_setup, "adamw", _strength, depth=5, width=96)),
    _case("across/healthy/mlp_wide_sgd", (), (0.05,), _with(mlp_setup, "sgd", _strength, depth=2, width=256)),
    _case("across/healthy/gpt3", (), (1e-3,), _with(_gpt3, _strength)),
]  # fmt: skip

BY_NAME.update({c.name: c for c in ACROSS})


def make(case: Case, strength: Any, seed: int, run_dir: Path) -> dict[str, Any]:
    """Train one run of ``case`` into ``run_dir`` with one CPU thread (so the run is the same on
    any machine); what is true of the trained model."""
    with pinned_threads(1):
        return case.make(strength, seed, Path(run_dir))


def diagnosed(run_dir: Path) -> set[str]:
    """The causes the diagnosis found in a recorded run."""
    return {f.cause for f in diagnose(load_run(run_dir))}


#: A vanilla RNN's measured recurrent radius (:func:`recurrent_radius`, the larger of the run's
#: start and end) above which "recurrent weights past the stability edge" is true of the run
#: (Pascanu et al. 2013's condition: above 1), with a band about 1 in which a finding is neither
#: expected nor false: the telemetry samples the radius at other steps than the start and the
#: end, and a radius of 0.95-1.02 moves across 1 and back in a run (measured: 0.952, 0.932 at
#: steps 0 and 100, 1.024 at the end).
RADIUS_TRUTH = 1.0
RADIUS_BAND = 0.03

#: Measured dead share (:func:`truth`) from which "dead units" is true of any run: of all ReLU
#: units, or of one ReLU layer's.
DEAD_TRUTH = 0.5
DEAD_TRUTH_LAYER = 0.95


def allowed(case: Case, measured: dict[str, Any] | None = None) -> frozenset[str]:
    """What the diagnosis may find in a run of ``case``: its ``allow``, "dead units" where the
    trained model's units were measured dead (a too-high LR or a huge batch kills ReLUs too), and
    "recurrent weights past the edge" where a vanilla RNN's radius was measured above 1 (less
    :data:`RADIUS_BAND`)."""
    dead = (measured or {}).get("dead")
    layer = (measured or {}).get("dead_layer")
    is_dead = (dead is not None and dead >= DEAD_TRUTH) or (
        layer is not None and layer >= DEAD_TRUTH_LAYER
    )
    extra = {"dead_units"} if is_dead else set()
    radius = (measured or {}).get("radius")
    if radius is not None and radius > RADIUS_TRUTH - RADIUS_BAND:
        extra.add("recurrent_explosion")  # the condition is in the weights, exploded or not
    if expected(case, measured) is not case.expect:
        # a run that went non-finite may have shown the case's usual effect before the NaN (its
        # units dying), which no measurement of its NaN weights can confirm or refute
        extra |= case.expect
    return case.allow | extra


def expected(case: Case, measured: dict[str, Any] | None = None) -> frozenset[str]:
    """What the diagnosis must find in a run of ``case``: its ``expect``, or its ``if_nonfinite``
    where the trained model was measured non-finite; never a recurrent radius above 1 where the
    vanilla RNN's was measured at or below 1 (within :data:`RADIUS_BAND`) at the start and the
    end of the run."""
    if case.if_nonfinite is not None and (measured or {}).get("finite") is False:
        return case.if_nonfinite
    radius = (measured or {}).get("radius")
    if radius is not None and radius <= RADIUS_TRUTH + RADIUS_BAND:
        return case.expect - {"recurrent_explosion"}
    return case.expect


def judge(
    case: Case, found: set[str], measured: dict[str, Any] | None = None
) -> dict[str, list[str]]:
    """What the diagnosis got right and wrong on one run of ``case``."""
    must = expected(case, measured)
    return {
        "missed": sorted(must - found),
        "false": sorted(found - must - allowed(case, measured)),
    }
