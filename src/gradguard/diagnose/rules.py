"""Diagnosis rules: from a run's telemetry to plain-language findings (cause, evidence, advice).

Each rule is a small function ``rule(run: RunLog) -> Finding | None`` registered in :data:`RULES`
(in the order they are listed in reports with equal severity); ``diagnose`` runs them all. A rule
reads only the telemetry (``records.py``), tolerates any optional field being absent or null, and
stays quiet on a healthy run. Thresholds are module constants, each with where it comes from.

Rules (the ``cause`` id is the function's name):

``lr_too_high``          updates are a large fraction of the weights (update/weight ratio).
``init_depth``           gradient norms grow or shrink geometrically with depth from the start.
``missing_normalization`` a deep plain network without normalization layers had spikes/NaN.
``outlier_batch``        a spike or NaN came with a batch whose statistics are far off the rest.
``fp16_overflow``        fp16 loss scaling keeps overflowing or its scale collapses.
``recurrent_explosion``  a recurrent weight's spectral radius is above 1 around the events.
"""

from __future__ import annotations

import itertools
import math
import re
import statistics
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .records import RunLog


@dataclass
class Finding:
    """One likely cause. ``cause`` is a stable id (``lr_too_high``, ``init_depth``,
    ``missing_normalization``, ``outlier_batch``, ``fp16_overflow``, ``recurrent_explosion``);
    ``summary`` is one plain sentence; ``evidence`` the numbers behind it; ``advice`` what to try."""

    cause: str
    title: str
    summary: str
    evidence: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)
    severity: str = "medium"  # "high" | "medium" | "info"
    step: int | None = None
    layers: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


SEVERITIES = ("high", "medium", "info")

#: Events that mean the run got into trouble (``vanishing`` and ``amp_overflow`` are not: the
#: first is the opposite problem, the second is fp16 loss scaling's routine back-off).
TROUBLE_KINDS = ("nonfinite_grad", "nonfinite_loss", "grad_spike", "layer_spike", "loss_spike")

# ----- thresholds -----------------------------------------------------------------------------------

#: The update:data ratio rule of thumb: each step should change a weight matrix by about 1e-3 of
#: its norm (Karpathy, CS231n "Neural Networks Part 3", and "A Recipe for Training Neural Networks").
UPDATE_RATIO_TARGET = 1e-3
#: Ten times the rule of thumb for the median layer, before the trouble started: too high.
UPDATE_RATIO_HIGH = 1e-2
#: One layer changing by 10% of its norm per step (100x the rule of thumb) before the trouble.
UPDATE_RATIO_LAYER_HIGH = 0.1
#: Without any spike or NaN, only a median layer moving 10% per step is reported: far enough from
#: the rule of thumb that it is not a matter of taste (Adam at lr 3e-4 on weights of std 0.02 gives
#: about 1.5e-2, which trains well).
UPDATE_RATIO_SEVERE = 0.1

#: Steps at the start (before any event) whose per-layer gradient norms show the init/depth trend.
INIT_STEPS = 5
#: Weight layers needed to call a trend with depth a trend.
INIT_MIN_LAYERS = 6
#: Input-side vs output-side gradient norm (from the fit) beyond which the trend is reported: two
#: orders of magnitude, i.e. one learning rate is 100x off for one end of the network. (A deep tanh
#: MLP at 4x the Xavier gain gives ~1e3 over 12 layers, at 1x ~1.3; ReLU nets are positively
#: homogeneous, so scaling their init moves all layers' weight gradients alike, not with depth.)
INIT_RATIO = 1e2
#: Goodness of the log-linear fit (R^2) needed to say "geometric".
INIT_MIN_R2 = 0.8

#: Weight layers from which a plain (unnormalized) network counts as deep: beyond about 8-10
#: layers plain nets needed careful init or BatchNorm to train at all (VGG, Simonyan & Zisserman
#: 2014; He et al. 2015); a heuristic, applied only when the run had spikes or NaN.
NORM_MIN_LAYERS = 8

#: Robust z-score (median/MAD of the steps before) beyond which a batch's input statistics are an
#: outlier; 6 is the spike threshold used for the gradient norm too (OLMo-core, ``skip_spike``).
OUTLIER_Z = 6.0
#: Steps of input statistics before an event needed to compare against, and how many are used.
OUTLIER_MIN_HISTORY = 8
OUTLIER_WINDOW = 200
#: Floors on the spread, so that perfectly steady inputs do not turn a tiny change into a huge z:
#: 0.05 decades (12%) for log10 absmax / log10 std, 5% of the typical std for the mean.
OUTLIER_LOG_FLOOR = 0.05
OUTLIER_MEAN_FLOOR = 0.05

#: fp16 loss scaling (GradScaler defaults: growth_interval=2000, backoff 0.5) expects about one
#: overflow per 2000 steps once the scale has settled; more than 5% of steps is a persistent one.
AMP_OVERFLOW_RATE = 0.05
AMP_MIN_OVERFLOWS = 3
#: A scale below 1 means the values overflow fp16 even unscaled: no loss scaling can fix that.
AMP_SCALE_FLOOR = 1.0
#: "Falling steadily": over the second half of the run the scale never grew and fell by 2^8.
AMP_FALL_LOG2 = 8

#: A recurrent weight's spectral radius above 1 is necessary for exploding gradients in a tanh RNN
#: (Pascanu, Mikolov & Bengio 2013, "On the difficulty of training RNNs", section 2.1).
RADIUS_LIMIT = 1.0
#: Steps before/after a spike or NaN event within which a radius sample counts as "around" it.
RADIUS_WINDOW = 100

# ----- helpers ----------------------------------------------------------------------------------------


def _num(x: Any) -> float | None:
    """A finite float, or None (missing, null, NaN, Inf, or not a number)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _step(rec: Mapping[str, Any]) -> int | None:
    s = rec.get("step")
    return s if isinstance(s, int) and not isinstance(s, bool) else None


def _list(x: Any) -> list:
    return x if isinstance(x, list) else []


def _names(run: RunLog) -> list[str]:
    return [str(n) for n in _list(run.meta.get("layers"))]


def _forward_order(run: RunLog) -> list[int]:
    """Layer indices input side first (the meta's forward order, then the rest by index)."""
    n = len(_names(run))
    order = [i for i in _list(run.meta.get("forward_order")) if isinstance(i, int) and 0 <= i < n]
    order = list(dict.fromkeys(order))
    return order + [i for i in range(n) if i not in set(order)]


def _layer(run: RunLog, i: int) -> str:
    names = _names(run)
    return names[i] if 0 <= i < len(names) else f"layer[{i}]"


def _g(x: float) -> str:
    return f"{x:.3g}"


def _trouble(run: RunLog) -> list[dict[str, Any]]:
    """Spike and non-finite events, by step."""
    out = [e for e in run.events if e.get("kind") in TROUBLE_KINDS and _step(e) is not None]
    return sorted(out, key=lambda e: e["step"])


def _first_trouble(run: RunLog) -> int | None:
    """The first step with a spike or non-finite event (or, without AMP, a non-finite step)."""
    steps = [e["step"] for e in _trouble(run)]
    if not run.meta.get("amp"):  # with fp16 scaling a non-finite gradient is routine
        for s in run.steps:
            loss = s.get("loss")
            bad_loss = isinstance(loss, float) and not math.isfinite(loss)
            if _step(s) is not None and (_list(s.get("nonfinite_layers")) or bad_loss):
                steps.append(s["step"])
                break
    return min(steps) if steps else None


_WEIGHT_TYPES = re.compile(r"Linear|Conv|Bilinear")


def _weight_layers(run: RunLog) -> list[int]:
    """Layers with a weight matrix (Linear/Conv), input side first. Without layer types: all."""
    types = _list(run.meta.get("layer_types"))
    n = len(_names(run))
    order = _forward_order(run)
    if len(types) != n:
        return order
    return [
        i
        for i in order
        if isinstance(types[i], str) and _WEIGHT_TYPES.search(types[i]) and "Norm" not in types[i]
    ]


def _robust(values: list[float], floor: float) -> tuple[float, float]:
    """Median and MAD-based standard deviation (at least ``floor``)."""
    med = statistics.median(values)
    mad = statistics.median(abs(v - med) for v in values) * 1.4826
    return med, max(mad, floor)


# ----- the registry -----------------------------------------------------------------------------------

Rule = Callable[[RunLog], "Finding | None"]

#: Every rule, in report order for equal severity. A contract test runs over this list.
RULES: list[Rule] = []


def register(rule: Rule) -> Rule:
    RULES.append(rule)
    return rule


def list_rules() -> list[str]:
    """The ``cause`` ids of the registered rules."""
    return [r.__name__ for r in RULES]


# ----- the rules --------------------------------------------------------------------------------------


@register
def lr_too_high(run: RunLog) -> Finding | None:
    """Update/weight ratio far above ~1e-3 on the sampled steps before the first spike or NaN."""
    first = _first_trouble(run)
    sampled = [
        s
        for s in run.steps
        if isinstance(s.get("update_ratio"), list)
        and _step(s) is not None
        and not s.get("skipped")
        and not s.get("rolled_back")
        and (first is None or s["step"] < first)
    ]
    per_layer: dict[int, list[float]] = {}
    for s in sampled:
        for i, r in enumerate(s["update_ratio"]):
            v = _num(r)
            if v is not None and v > 0:  # 0: a frozen layer, which does not learn at all
                per_layer.setdefault(i, []).append(v)
    if not per_layer:
        return None
    by_layer = {i: statistics.median(v) for i, v in per_layer.items()}
    typical = statistics.median(by_layer.values())
    worst = max(by_layer, key=lambda i: by_layer[i])
    if first is not None:
        fires = typical > UPDATE_RATIO_HIGH or by_layer[worst] > UPDATE_RATIO_LAYER_HIGH
    else:
        fires = typical > UPDATE_RATIO_SEVERE
    if not fires:
        return None
    lrs = [v for v in (_num(s.get("lr")) for s in sampled) if v is not None]
    lr = statistics.median(lrs) if lrs else None
    hot = sorted(
        (i for i, r in by_layer.items() if r > UPDATE_RATIO_HIGH), key=lambda i: -by_layer[i]
    )
    span = f"steps {sampled[0]['step']}-{sampled[-1]['step']}"
    when = f"before the first spike/non-finite step ({first})" if first is not None else span
    evidence = [
        f"median update/weight ratio {_g(typical)} over {len(by_layer)} layers and "
        f"{len(sampled)} sampled steps {when} ({span}); the rule of thumb is ~1e-3",
        f"largest: {_layer(run, worst)} at {_g(by_layer[worst])} per step",
    ]
    if lr is not None:
        evidence.append(f"learning rate {_g(lr)}")
    if typical > 1:
        evidence.append(
            "the updates are larger than the weights themselves: the run diverges from its first "
            "steps, which also points at the initialization or unscaled inputs"
        )
    if first is not None:
        evidence.append(f"the first spike or non-finite gradient came at step {first}")
    advice = []
    if typical > 1:
        # Updates larger than the weights: the run is already running away, and the ratio grows
        # with the weights it inflates; it no longer scales linearly with the LR.
        target = f" (from {_g(lr)} to {lr / 10:.2g} or less)" if lr is not None else ""
        advice.append(
            f"Divide the learning rate by 10 or more{target} and measure again: at updates "
            f"{_g(typical)}x the weights the run is already diverging, so this ratio overstates "
            "the factor (updates scale about linearly with the LR only near the ~1e-3 working point)."
        )
    elif typical > UPDATE_RATIO_HIGH:
        factor = typical / UPDATE_RATIO_TARGET
        target = f" (from {_g(lr)} to about {lr / factor:.2g})" if lr is not None else ""
        advice.append(
            f"Divide the learning rate by about {factor:.0f}{target}: the update grows about "
            "linearly with the LR for SGD and Adam, and ~1e-3 of the weights per step is the "
            "usual working point."
        )
    else:
        factor = by_layer[worst] / UPDATE_RATIO_TARGET
        advice.append(
            f"Give {_layer(run, worst)} its own parameter group with a learning rate about "
            f"{factor:.0f}x smaller, or bound updates relative to the weights with policy 'agc'."
        )
    advice += [
        "Warm the learning rate up linearly over the first few hundred to few thousand steps "
        "(e.g. torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=1000)).",
        "Keep a safety net while tuning: policy 'default' (skip non-finite steps, clip spikes) "
        "or 'skip_nonfinite+lr_backoff' to cut the LR when spikes repeat.",
    ]
    return Finding(
        cause="lr_too_high",
        title="Learning rate too high",
        summary=(
            "The learning rate is too high: each step changes the weights by "
            f"{_g(typical if typical > UPDATE_RATIO_HIGH else by_layer[worst])} of their size, "
            "far above the ~1e-3 that trains stably."
        ),
        evidence=evidence,
        advice=advice,
        severity="high" if first is not None else "medium",
        step=first if first is not None else sampled[0]["step"],
        layers=[_layer(run, i) for i in (hot or [worst])[:5]],
    )


def _fit(ys: list[float]) -> tuple[float, float]:
    """Least-squares slope of ys against 0..n-1, and R^2 (0 when ys are constant)."""
    n = len(ys)
    mx = (n - 1) / 2
    my = sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in range(n))
    sxy = sum((x - mx) * (y - my) for x, y in enumerate(ys))
    slope = sxy / sxx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - (my + slope * (x - mx))) ** 2 for x, y in enumerate(ys))
    return slope, (1 - ss_res / ss_tot) if ss_tot > 0 else 0.0


@register
def init_depth(run: RunLog) -> Finding | None:
    """Per-layer gradient norms at the start grow or shrink geometrically toward the input."""
    quiet = {"amp_overflow"}
    event_steps = [
        e["step"] for e in run.events if _step(e) is not None and e.get("kind") not in quiet
    ]
    before = min(event_steps) if event_steps else None
    early = [
        s
        for s in run.steps
        if _step(s) is not None
        and (before is None or s["step"] < before)
        and _list(s.get("layer_norms"))
        and not _list(s.get("nonfinite_layers"))
    ][:INIT_STEPS]
    if not early:
        return None
    layers, logs = [], []
    for i in _weight_layers(run):
        vals = []
        for s in early:
            norms = s["layer_norms"]
            v = _num(norms[i]) if i < len(norms) else None
            if v is not None and v > 0:
                vals.append(math.log10(v))
        if vals:
            layers.append(i)
            logs.append(statistics.median(vals))
    if len(layers) < INIT_MIN_LAYERS:
        return None
    slope, r2 = _fit(logs)
    # Input side vs output side, from the fit: log10(first / last).
    decades = -slope * (len(layers) - 1)
    if r2 < INIT_MIN_R2 or abs(decades) < math.log10(INIT_RATIO):
        return None
    per_layer = 10 ** (-slope)
    explode = decades > 0
    first, last = _layer(run, layers[0]), _layer(run, layers[-1])
    steps = f"steps {early[0]['step']}-{early[-1]['step']}"
    evidence = [
        f"{len(layers)} weight layers in forward order, {steps}: gradient norm "
        f"{10 ** logs[0]:.3g} at {first} (input side) vs {10 ** logs[-1]:.3g} at {last} (output side)",
        f"log10(norm) vs depth: slope {slope:+.3f} per layer, R^2 = {r2:.2f}; ratio input/output "
        f"from the fit 10^{decades:+.1f}",
    ]
    trouble = _first_trouble(run)
    if trouble is not None:
        evidence.append(f"the first spike or non-finite gradient came at step {trouble}")
    if explode:
        summary = (
            f"Initialization/depth: going from the output toward the input the gradient is "
            f"multiplied by about {per_layer:.2f} per layer, so {first} gets "
            f"{10**decades:.3g}x the gradient of {last} (exploding gradients from the start)."
        )
        advice = [
            "Initialize at scale 1: He (nn.init.kaiming_normal_, ReLU/GELU) or Xavier "
            "(nn.init.xavier_uniform_ with gain=nn.init.calculate_gain('tanh') for tanh); a "
            f"factor of {per_layer:.2f} per layer compounds over {len(layers)} layers.",
            "Add residual connections and normalization (LayerNorm/BatchNorm) so that the "
            "gradient's size no longer multiplies layer by layer.",
            "Or use fewer layers; meanwhile clip: policy 'default' or 'clip_norm:1.0'.",
        ]
    else:
        summary = (
            f"Initialization/depth: going from the output toward the input the gradient shrinks "
            f"by about {1 / per_layer:.2f}x per layer, so {first} gets only "
            f"{10**decades:.2g} of the gradient of {last} (vanishing gradients)."
        )
        advice = [
            "Initialize at scale 1: He (nn.init.kaiming_normal_) for ReLU/GELU, Xavier with the "
            "activation's gain for tanh; PyTorch's default Linear init is smaller than both.",
            "Use ReLU/GELU rather than sigmoid/tanh in deep stacks; add residual connections "
            "and normalization (LayerNorm/BatchNorm).",
            "Or use fewer layers.",
        ]
    return Finding(
        cause="init_depth",
        title="Initialization / depth: " + ("exploding" if explode else "vanishing") + " gradients",
        summary=summary,
        evidence=evidence,
        advice=advice,
        severity="high" if explode and trouble is not None else "medium",
        step=early[0]["step"],
        layers=[first, last],
    )


@register
def missing_normalization(run: RunLog) -> Finding | None:
    """A deep plain network (no normalization layer) that had spikes or non-finite gradients."""
    if run.meta.get("normalization") is not False:  # absent: unknown, say nothing
        return None
    weights = _weight_layers(run)
    events = _trouble(run)
    if len(weights) < NORM_MIN_LAYERS or not events:
        return None
    kinds = Counter(e["kind"] for e in events)
    return Finding(
        cause="missing_normalization",
        title="No normalization layers",
        summary=(
            f"The model stacks {len(weights)} weight layers without any normalization layer, so "
            "the size of activations and gradients compounds with depth; it had "
            f"{len(events)} spike or non-finite events."
        ),
        evidence=[
            f"{len(weights)} weight layers ({_layer(run, weights[0])} ... "
            f"{_layer(run, weights[-1])}); no BatchNorm/LayerNorm/GroupNorm/RMSNorm layer",
            "events: "
            + ", ".join(f"{k} x{n}" for k, n in kinds.most_common())
            + f"; the first at step {events[0]['step']}",
        ],
        advice=[
            "Add normalization: BatchNorm after each conv (before the activation) in a CNN, "
            "LayerNorm in an MLP, transformer (pre-norm) or on an RNN's input and hidden state "
            "(Ioffe & Szegedy 2015; Ba et al. 2016).",
            "Standardize the inputs with the training set's mean and std.",
            "Residual connections help too; until then keep policy 'default' to skip and clip.",
        ],
        severity="medium",
        step=events[0]["step"],
    )


_INPUT_KEYS = ("mean", "std", "absmax")


def _input_stats(rec: Mapping[str, Any]) -> dict[str, float] | None:
    inp = rec.get("input")
    if not isinstance(inp, Mapping):
        return None
    out = {}
    for k in _INPUT_KEYS:
        v = inp.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None
        out[k] = float(v)
    return out


@register
def outlier_batch(run: RunLog) -> Finding | None:
    """At a spike or NaN, the batch's input statistics are far from those of the steps before."""
    events = _trouble(run)
    if not events:
        return None
    event_steps = {e["step"] for e in events}
    inputs = [
        (s["step"], st)
        for s in run.steps
        if _step(s) is not None and (st := _input_stats(s)) is not None
    ]
    hits: list[tuple[float, int, str, str]] = []  # (|z|, step, kind, evidence)
    seen: set[int] = set()
    for e in events:
        step = e["step"]
        if step in seen:
            continue
        seen.add(step)
        cur = next((st for s, st in inputs if s == step), None)
        if cur is None:
            continue
        if not all(math.isfinite(v) for v in cur.values()):
            hits.append(
                (
                    math.inf,
                    step,
                    e["kind"],
                    f"step {step} ({e['kind']}): the batch contains NaN/Inf",
                )
            )
            continue
        hist = [
            st
            for s, st in inputs
            if s < step and s not in event_steps and all(math.isfinite(v) for v in st.values())
        ][-OUTLIER_WINDOW:]
        if len(hist) < OUTLIER_MIN_HISTORY:
            continue
        typical_std = statistics.median(h["std"] for h in hist)
        scores = []
        for key in ("absmax", "std"):
            past = [math.log10(h[key]) for h in hist if h[key] > 0]
            if len(past) < OUTLIER_MIN_HISTORY or cur[key] <= 0:
                continue
            med, sd = _robust(past, OUTLIER_LOG_FLOOR)
            z = (math.log10(cur[key]) - med) / sd
            scores.append((abs(z), z, key, cur[key], 10**med))
        med, sd = _robust([h["mean"] for h in hist], OUTLIER_MEAN_FLOOR * typical_std + 1e-12)
        z = (cur["mean"] - med) / sd
        scores.append((abs(z), z, "mean", cur["mean"], med))
        az, z, key, value, usual = max(scores)
        if az > OUTLIER_Z:
            hits.append(
                (
                    az,
                    step,
                    e["kind"],
                    f"step {step} ({e['kind']}): input {key} {_g(value)} vs a median of "
                    f"{_g(usual)} over the {len(hist)} steps before (z = {z:+.1f})",
                )
            )
    if not hits:
        return None
    hits.sort(key=lambda h: h[1])
    first = hits[0][1]
    evidence = [h[3] for h in hits[:5]]
    evidence.append(
        f"{len(hits)} of {len(seen)} spike/non-finite steps came with an outlier batch "
        f"(|z| > {OUTLIER_Z:g} against the median and MAD of earlier batches)"
    )
    return Finding(
        cause="outlier_batch",
        title="Outlier batch",
        summary=(
            f"An outlier batch: the {hits[0][2]} at step {first} came on a batch whose "
            "statistics were far from those of the batches before it."
        ),
        evidence=evidence,
        advice=[
            "Standardize the inputs with statistics of the training set (per-feature mean and "
            "std computed once, applied to every batch), not per batch.",
            f"Find the samples of step {first} (log the sample ids) and fix or drop them; if "
            "extreme values are legitimate, clip input features to a few std (e.g. +-5).",
            "Let the Guard skip such steps: add 'skip_spike' to the policy "
            "(e.g. 'skip_nonfinite+skip_spike+zclip').",
        ],
        severity="high",
        step=first,
    )


@register
def fp16_overflow(run: RunLog) -> Finding | None:
    """fp16 loss scaling that keeps overflowing, or whose scale collapses."""
    if not run.meta.get("amp"):
        return None
    over = sorted(
        {e["step"] for e in run.events if e.get("kind") == "amp_overflow" and _step(e) is not None}
    )
    steps = [s for s in run.steps if _step(s) is not None]
    n_steps = max(
        len(steps),
        (_step(run.end) or 0) if isinstance(run.end, Mapping) else 0,
        (max(over) + 1) if over else 0,
    )
    # GradScaler starts at 2^16 and backs off on the first steps until it fits: not a problem.
    start = steps[0]["step"] if steps else 0
    calibration = 0
    while calibration < len(over) and over[calibration] == start + calibration:
        calibration += 1
    counted = over[calibration:]
    rate = len(counted) / n_steps if n_steps else 0.0
    scales = [
        (s["step"], v) for s in steps if (v := _num(s.get("amp_scale"))) is not None and v > 0
    ]
    low = min(scales, key=lambda t: t[1]) if scales else None
    below_one = low is not None and low[1] < AMP_SCALE_FLOOR
    half = scales[len(scales) // 2 :]
    falling = (
        len(half) >= 2
        and all(b[1] <= a[1] for a, b in itertools.pairwise(half))
        and math.log2(half[0][1] / half[-1][1]) >= AMP_FALL_LOG2
    )
    frequent = len(counted) >= AMP_MIN_OVERFLOWS and rate > AMP_OVERFLOW_RATE
    if not (frequent or below_one or falling):
        return None
    # Which layer overflows: the events' most implicated layer, else the static origin of each
    # overflow step (the non-finite layer nearest the output).
    culprits: Counter[str] = Counter()
    for e in run.events:
        if e.get("kind") == "amp_overflow" and _list(e.get("layers")):
            culprits[str(e["layers"][0])] += 1
    if not culprits:
        rank = {li: r for r, li in enumerate(_forward_order(run))}
        for s in steps:
            bad = [i for i in _list(s.get("nonfinite_layers")) if isinstance(i, int)]
            if s["step"] in set(over) and bad:
                culprits[_layer(run, max(bad, key=lambda i: rank.get(i, i)))] += 1
    for loc in run.localizations:
        if loc.get("step") in set(over) and loc.get("origin"):
            culprits[str(loc["origin"])] += 1
    evidence = []
    if over:
        evidence.append(
            f"{len(over)} fp16 overflows in {n_steps} steps"
            + (f" ({calibration} while the scale calibrated at the start)" if calibration else "")
            + f"; {len(counted)} after that, {rate:.1%} of steps"
        )
    if scales:
        evidence.append(
            f"loss scale {_g(scales[0][1])} at step {scales[0][0]}, lowest {_g(low[1])} at step "
            f"{low[0]}, last {_g(scales[-1][1])}"
        )
    if falling:
        evidence.append(
            f"the scale only fell over the second half of the run (by 2^{math.log2(half[0][1] / half[-1][1]):.0f})"
        )
    layer = culprits.most_common(1)[0][0] if culprits else None
    if layer is not None:
        evidence.append(f"overflowing layer: {layer} ({culprits[layer]} of the overflows)")
    advice = [
        "Use bf16 autocast (torch.autocast(device_type='cuda', dtype=torch.bfloat16)) where the "
        "GPU supports it (Ampere or newer): bf16 has fp32's exponent range, so it does not "
        "overflow and needs no GradScaler.",
        "Staying on fp16: keep GradScaler's defaults (init_scale=2**16, growth_interval=2000) "
        "and pass it to the Guard (Guard(..., scaler=scaler)) so it unscales before clipping."
        + (
            " A scale below 1 means values overflow even unscaled: no loss scaling fixes that;"
            " the values themselves must shrink."
            if below_one
            else ""
        ),
        "Scale the loss down (a mean rather than a sum over tokens/pixels) and lower the LR.",
    ]
    if layer is not None:
        advice.insert(
            1,
            f"Run {layer} in fp32 (wrap it in torch.autocast(device_type='cuda', enabled=False) "
            "and cast its input with .float()), or add normalization before it.",
        )
    return Finding(
        cause="fp16_overflow",
        title="fp16 overflow",
        summary=(
            "fp16 overflows: "
            + (
                f"the loss scale collapsed to {_g(low[1])}, so the values overflow fp16 even unscaled."
                if below_one
                else "the gradients keep overflowing fp16's range ("
                f"{rate:.0%} of steps), so loss scaling skips steps and backs off."
            )
        ),
        evidence=evidence,
        advice=advice,
        severity="high" if below_one or falling else "medium",
        step=counted[0] if counted else (low[0] if low else None),
        layers=[layer] if layer else [],
    )


@register
def recurrent_explosion(run: RunLog) -> Finding | None:
    """A recurrent weight's spectral radius above 1 around spike or non-finite events."""
    recurrent = [str(n) for n in _list(run.meta.get("recurrent"))]
    events = _trouble(run)
    if not recurrent or not events:
        return None
    samples: list[tuple[int, str, float]] = []
    for s in run.steps:
        radius = s.get("radius")
        if _step(s) is None or not isinstance(radius, Mapping):
            continue
        for name, v in radius.items():
            r = _num(v)
            if r is not None and str(name) in recurrent:
                samples.append((s["step"], str(name), r))
    worst: dict[str, tuple[float, int, int]] = {}  # layer -> (radius, its step, the event's step)
    for e in events:
        for step, name, r in samples:
            if abs(step - e["step"]) <= RADIUS_WINDOW and r > worst.get(name, (-1.0,))[0]:
                worst[name] = (r, step, e["step"])
    over = {n: w for n, w in worst.items() if w[0] > RADIUS_LIMIT}
    if not over:
        return None
    layer = max(over, key=lambda n: over[n][0])
    r, _, ev = over[layer]
    first_sample = next(((s, v) for s, n, v in samples if n == layer), None)
    evidence = [
        f"{n}: spectral radius {_g(w[0])} at step {w[1]}, near the event at step {w[2]}"
        for n, w in sorted(over.items(), key=lambda t: -t[1][0])
    ]
    grew = first_sample is not None and first_sample[1] < r
    if grew:
        evidence.append(
            f"{layer}'s radius was {_g(first_sample[1])} at step {first_sample[0]}: training "
            "pushed it up"
        )
    evidence.append(
        f"{len(events)} spike/non-finite events, the first at step {events[0]['step']}; a radius "
        "above 1 is what lets the gradient grow over time steps (Pascanu et al. 2013)"
    )
    types = dict(zip(_names(run), _list(run.meta.get("layer_types")), strict=False))
    vanilla = [n for n in over if types.get(n) == "RNN"]
    advice = [
        "Clip the gradient norm, Pascanu et al.'s remedy: policy 'skip_nonfinite+clip_norm:1.0' "
        "(or 'default', which clips spikes adaptively).",
        "Initialize the recurrent weights orthogonal with a gain below 1, e.g. "
        "nn.init.orthogonal_(w, gain=0.9) for each weight_hh_l* block, so the radius starts < 1.",
    ]
    if vanilla:
        advice.append(
            f"Replace the vanilla RNN ({', '.join(vanilla)}) with an LSTM or GRU: the gates "
            "keep the gradient through time bounded."
        )
    else:
        advice.append(
            "Use an LSTM or GRU if this is a vanilla RNN; keep the gates' biases default."
        )
    if grew:
        advice.append("Lower the learning rate: the radius grew during training.")
    return Finding(
        cause="recurrent_explosion",
        title="Exploding recurrent weights",
        summary=(
            f"Exploding recurrent weights: the spectral radius of {layer}'s recurrent weights was "
            f"{_g(r)} (> 1) around step {ev}, so the gradient grows with every time step."
        ),
        evidence=evidence,
        advice=advice,
        severity="high",
        step=ev,
        layers=sorted(over, key=lambda n: -over[n][0]),
    )


# ----- entry point ------------------------------------------------------------------------------------


def diagnose(run: RunLog, rules: Iterable[Rule] | None = None) -> list[Finding]:
    """The findings for a run, most severe first; empty for a healthy run.

    A rule that fails on an unexpected file is reported as a warning and skipped, so one bad
    field never costs the whole report.
    """
    found: list[Finding] = []
    for rule in RULES if rules is None else rules:
        try:
            f = rule(run)
        except Exception as e:  # a report must survive one rule's bug
            warnings.warn(f"gradguard: diagnosis rule {rule.__name__} failed: {e!r}", stacklevel=2)
            continue
        if f is not None:
            found.append(f)
    rank = {s: i for i, s in enumerate(SEVERITIES)}
    return sorted(found, key=lambda f: rank.get(f.severity, len(rank)))
