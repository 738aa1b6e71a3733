"""skip_spike: the same skips as a written-out reference of its rule on long sequences (and on the
loss), OLMo-core's warmup, and its level shift (``admit``): a sustained move to a new level is
admitted after ``admit`` finite outliers in a row (the window restarts from them), where a spike,
a shorter burst or a run broken by a NaN is skipped and kept out of the window. Before ``admit``,
every skipped value stayed out of the window for good, so a shift was skipped until the Guard
stopped the run."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import gradguard
from gradguard import ConfigError, SpecError
from gradguard.policies.skip import is_outlier, is_spike, outlier_run
from gradguard.policies.xp import HOST, TORCH

from tests.reference.olmo_skip_reference import olmo_skips


def level(n: int, at: float = 1.0, seed: int = 0) -> list[float]:
    """``n`` values uniform in ``[at, 1.2 at]``."""
    gen = torch.Generator().manual_seed(seed)
    return (at * (torch.rand(n, generator=gen) * 0.2 + 1.0)).tolist()


def make_guard(spec: str, **kw) -> gradguard.Guard:
    model = nn.Linear(1, 1, bias=False)
    return gradguard.Guard(model, torch.optim.SGD(model.parameters(), lr=0.0), spec, **kw)


def feed(guard: gradguard.Guard, values: list[float], on: str = "grad_norm") -> list[bool]:
    """One step a value: the gradient norm (``on="grad_norm"``) or the loss; whether skipped."""
    (w,) = guard.model.parameters()
    out = []
    for v in values:
        if on == "grad_norm":
            w.grad = torch.full((1, 1), v)
            out.append(guard.step().skipped)
        else:
            w.grad = torch.ones(1, 1)
            out.append(guard.step(loss=torch.tensor(v)).skipped)
    return out


def spike_state(guard: gradguard.Guard) -> dict:
    return next(p for p in guard.policies if p.name == "skip_spike").state_dict()


def skipped_at(skips: list[bool]) -> list[int]:
    return [i for i, s in enumerate(skips) if s]


@pytest.mark.parametrize("on", ["grad_norm", "loss"])
@pytest.mark.parametrize("admit", [2, 8, 19])
def test_a_sustained_shift_is_admitted_after_admit_skips(on, admit):
    """The norm (or loss) rises 10x at step 100 and stays: ``admit`` skips, then every step at
    the new level trains, and a spike at the new level is still caught once the window refilled.
    Before, every later step was skipped and the Guard stopped the run after 20."""
    values = level(100) + level(300, at=10.0, seed=1)
    values[350] = 1e4
    guard = make_guard(f"skip_spike:admit={admit},on={on}")
    skips = feed(guard, values, on)
    assert skipped_at(skips) == [*range(100, 100 + admit), 350]
    assert guard.counters["skipped"] == admit + 1


def test_the_window_restarts_from_the_run_of_outliers():
    values = level(40) + level(20, at=10.0, seed=1)
    guard = make_guard("skip_spike:window=16,admit=5,on=grad_norm")
    assert skipped_at(feed(guard, values[:44])) == [40, 41, 42, 43]
    state = spike_state(guard)
    assert state["grad_norm"] == values[24:40]  # the window as it was before the shift
    assert state["grad_norm_outliers"] == pytest.approx(values[40:44], rel=1e-6)
    assert feed(guard, values[44:45]) == [True]  # the 5th: admitted, and skipped
    state = spike_state(guard)
    assert state["grad_norm"] == pytest.approx(values[40:45], rel=1e-6)
    assert state["grad_norm_outliers"] == []
    assert not any(feed(guard, values[45:]))


def test_a_burst_shorter_than_admit_is_skipped_and_stays_out_of_the_window():
    """Two bursts of admit-1 outliers with one calm step between them: eight outliers, never
    admit=5 in a row, so all are skipped and the window is the calm values' alone."""
    calm = level(80)
    values = calm[:40] + [30.0] * 4 + calm[40:41] + [30.0] * 4 + calm[41:]
    guard = make_guard("skip_spike:window=32,admit=5,on=grad_norm")
    skips = feed(guard, values[:44])
    assert spike_state(guard)["grad_norm_outliers"] == [30.0] * 4  # pending: 4 < admit
    skips += feed(guard, values[44:])
    assert skipped_at(skips) == [40, 41, 42, 43, 45, 46, 47, 48]
    calm_only = make_guard("skip_spike:window=32,admit=5,on=grad_norm")
    assert not any(feed(calm_only, calm))
    assert spike_state(guard) == spike_state(calm_only)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_nonfinite_value_ends_a_run_of_outliers(bad):
    """5 outliers, a NaN (or Inf), then more: the non-finite value is skipped, does not count,
    and the run starts again after it: admitted at the 8th outlier after it, not before."""
    values = level(50) + level(5, at=10.0, seed=1) + [bad] + level(60, at=10.0, seed=2)
    guard = make_guard("skip_spike:window=32,admit=8,on=grad_norm")
    skips = feed(guard, values[:64])
    assert skipped_at(skips) == list(range(50, 64))  # 5 + the NaN + 8
    assert spike_state(guard)["grad_norm"] == pytest.approx(values[56:64], rel=1e-6)
    assert not any(feed(guard, values[64:]))


def test_a_nonfinite_loss_ends_the_loss_run():
    values = level(50) + [20.0] * 3 + [math.nan] + level(40, at=20.0, seed=1)
    guard = make_guard("skip_spike:window=32,admit=4,on=loss")
    skips = feed(guard, values, on="loss")
    assert skipped_at(skips) == list(range(50, 58))  # 3 outliers, the NaN, 4 again
    assert guard.counters["skipped"] == 8


def test_the_two_runs_are_counted_apart():
    """on=both: the loss shifts while the norm stays; the norm's calm values do not end the
    loss's run (each value has its own), and the loss is admitted after admit=4 skips."""
    guard = make_guard("skip_spike:window=32,admit=4,on=both")
    (w,) = guard.model.parameters()
    norms, losses = level(100, seed=3), level(50) + level(50, at=10.0, seed=1)
    skips = []
    for n, loss in zip(norms, losses, strict=True):
        w.grad = torch.full((1, 1), n)
        skips.append(guard.step(loss=torch.tensor(loss)).skipped)
    assert skipped_at(skips) == [50, 51, 52, 53]
    state = spike_state(guard)
    assert state["grad_norm_outliers"] == state["loss_outliers"] == []


def test_a_pending_run_survives_a_state_round_trip():
    """Saved with 5 outliers pending, loaded into a fresh Guard: the shift is admitted at the
    same step as in the uninterrupted run. A state without the run (saved before admit existed)
    loads too, and starts the run again."""
    values = level(50) + level(50, at=10.0, seed=1)
    spec = "skip_spike:window=32,admit=8,on=grad_norm"
    whole = feed(make_guard(spec), values)
    assert skipped_at(whole) == list(range(50, 58))

    first = make_guard(spec)
    head = feed(first, values[:55])
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    (policy,) = (p for p in saved["policies"] if p["name"] == "skip_spike")
    assert policy["state"]["grad_norm_outliers"] == pytest.approx(values[50:55], rel=1e-6)
    resumed = make_guard(spec)
    resumed.load_state_dict(saved)
    assert head + feed(resumed, values[55:]) == whole

    for key in ("grad_norm_outliers", "loss_outliers"):
        del policy["state"][key]
    old = make_guard(spec)
    old.load_state_dict(saved)
    assert skipped_at(head + feed(old, values[55:])) == list(range(50, 63))


def test_admit_is_checked():
    for bad in (1, 0, -3, 2.5, True, "8"):
        with pytest.raises(SpecError, match="admit"):
            gradguard.skip_spike(admit=bad)
    with pytest.raises(SpecError, match="admit"):
        gradguard.policies.parse_spec("skip_spike:admit=1")
    assert gradguard.skip_spike(window=4, admit=16).spec().endswith("admit=16")


def test_a_run_longer_than_the_window_restarts_it_from_its_last_values():
    values = [1.0, 1.1] * 10 + [10.0, 10.5, 11.0] * 7
    guard = make_guard("skip_spike:window=4,warmup=3,admit=6,on=grad_norm")
    assert skipped_at(feed(guard, values[:26])) == list(range(20, 26))
    assert spike_state(guard)["grad_norm"] == pytest.approx(values[22:26], rel=1e-6)
    assert not any(feed(guard, values[26:]))


def test_the_guard_refuses_an_admit_it_would_stall_before():
    with pytest.raises(ConfigError, match=r"admit=20 must be below max_consecutive_skips=20"):
        make_guard("skip_spike:admit=20")
    with pytest.raises(ConfigError, match="admit=8"):
        make_guard("skip_spike", max_consecutive_skips=8)
    make_guard("skip_spike:admit=20", max_consecutive_skips=21)
    make_guard("skip_spike:admit=20", max_consecutive_skips=None)
    make_guard("skip_spike", max_consecutive_skips=9)


def test_the_rules_agree_on_host_and_torch():
    p = gradguard.skip_spike(z=2.0, window=6, admit=3)
    window = [1.0, 1.2, 0.9, 1.1]
    ring = torch.tensor([*window, 0.0, 0.0])
    for x in (1.05, 1.6, 30.0, math.nan, math.inf, -math.inf):
        want = is_outlier(HOST, p, window, x)
        assert bool(is_outlier(TORCH, p, ring, torch.tensor(x), filled=torch.tensor(4))) == want
        assert want == (math.isfinite(x) and is_spike(HOST, p, window, x))
    assert is_outlier(HOST, p, window, 30.0) and not is_outlier(HOST, p, window, math.inf)
    for outlier, run, want in [
        (True, 0, (False, 1)),
        (True, 1, (False, 2)),
        (True, 2, (True, 0)),  # the 3rd in a row: admitted
        (False, 2, (False, 0)),
        (False, 0, (False, 0)),
    ]:
        assert outlier_run(HOST, p, outlier, run) == want
        shifted, n = outlier_run(TORCH, p, torch.tensor(outlier), torch.tensor(run))
        assert (bool(shifted), int(n)) == want


# ----- against the reference rule and OLMo-core's -------------------------------------------------
def skip_spike_reference(
    values: list[float], z: float, window: int, warmup: int, admit: int = 8
) -> list[bool]:
    """OLMo-core's rule (sample std over a rolling window; checks once ``warmup`` values counting
    the current one are in), except skipped values stay out, two earlier values are needed, and
    ``admit`` finite outliers in a row replace the window (a shift of level)."""
    hist: list[float] = []
    run: list[float] = []  # the finite outliers in a row so far
    out = []
    for v in values:
        skip = outlier = False
        if not math.isfinite(v):
            skip = True
        elif len(hist) + 1 >= warmup and len(hist) >= 2:
            mean = sum(hist) / len(hist)
            std = math.sqrt(sum((h - mean) ** 2 for h in hist) / (len(hist) - 1))
            skip = outlier = v - mean > z * std
        out.append(skip)
        run = [*run, v] if outlier else []
        if len(run) == admit:
            hist, run = run[-window:], []
        elif not skip:
            hist = [*hist, v][-window:]
    return out


def _reference_run(norms: list[float], spec: str) -> list[bool]:
    model = nn.Linear(1, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    guard = gradguard.Guard(model, opt, spec, max_consecutive_skips=None)
    got = []
    for n in norms:
        model.weight.grad = torch.full((1, 1), n)
        got.append(guard.step().skipped)
    return got


def test_skip_spike_matches_reference_on_a_long_sequence():
    gen = torch.Generator().manual_seed(3)
    norms = (torch.rand(400, generator=gen) * 0.5 + 1.0).tolist()
    for i, f in [(50, 20.0), (51, 30.0), (120, 5.0), (300, 1e4), (301, float("inf"))]:
        norms[i] *= f
    got = _reference_run(norms, "skip_spike:z=4,window=32,warmup=8,on=grad_norm")
    want = skip_spike_reference(norms, 4.0, 32, 8)
    assert got == want
    assert want[50] and want[51] and want[300] and want[301] and sum(want) < 10


@pytest.mark.parametrize(("admit", "window"), [(2, 32), (3, 32), (8, 32), (8, 5)])
def test_skip_spike_matches_reference_through_shifts_of_level(admit, window):
    """Levels that move up 10x and back, bursts of every length around ``admit``, NaN and Inf
    inside runs of outliers, a run longer than the window: the same skips as the reference, step
    by step."""
    gen = torch.Generator().manual_seed(4)
    norms = (torch.rand(900, generator=gen) * 0.5 + 1.0).tolist()
    for lo, hi, f in [(100, 400, 10.0), (600, 900, 0.3)]:
        norms[lo:hi] = [v * f for v in norms[lo:hi]]
    for start, length in [(40, 1), (60, 2), (70, 3), (80, 7), (450, 8), (500, 9)]:
        for i in range(start, start + length):
            norms[i] *= 50.0
    norms[102], norms[455], norms[456] = float("nan"), float("inf"), float("nan")
    warmup = min(8, window)
    spec = f"skip_spike:z=4,window={window},warmup={warmup},on=grad_norm,admit={admit}"
    got = _reference_run(norms, spec)
    want = skip_spike_reference(norms, 4.0, window, warmup, admit)
    assert got == want
    if window == 32:  # every new level was admitted (a 5-value window is noisier than that)
        assert not any(want[420:440]) and not any(want[880:])


def test_skip_spike_on_loss():
    model = nn.Linear(1, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gradguard.Guard(model, opt, "skip_spike:on=loss,window=16")
    skipped = []
    for step in range(40):
        model.weight.grad = torch.ones(1, 1)
        loss = 100.0 if step == 30 else 1.0 + 0.01 * (step % 3)
        skipped.append(guard.step(loss=torch.tensor(loss)).skipped)
    assert skipped == [s == 30 for s in range(40)]


def calm_then_spike(n: int, at: int, seed: int = 0) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    values = (torch.rand(n, generator=gen) * 0.2 + 1.0).tolist()
    values[at] = 1e3
    return values


@pytest.mark.parametrize("window", [16, 128])
def test_skip_spike_starts_checking_when_olmo_core_does(window):
    """A spike at each step around the end of the warmup is skipped exactly when OLMo-core's
    SkipStepOptimizer would skip it (before the first skip both rules see the same values)."""
    first = max(2, window // 2) - 1  # 0-based index of the first checked step
    for at in range(first - 3, first + 4):
        values = calm_then_spike(at + 2, at)
        model = nn.Linear(1, 1, bias=False)
        guard = gradguard.Guard(
            model, torch.optim.SGD(model.parameters(), lr=0.0), f"skip_spike:window={window}"
        )
        ours = []
        for v in values:
            model.weight.grad = torch.full((1, 1), v)
            ours.append(guard.step(loss=torch.tensor(1.0)).skipped)
        theirs = olmo_skips(values, window=window)
        assert ours[: at + 1] == theirs[: at + 1], at
        assert ours[at] == (at >= first)


def test_after_a_spike_we_differ_from_olmo_core_on_purpose():
    """OLMo-core keeps the spike in its window, so a second spike right after passes; ours does
    not let the first spike widen the deviation."""
    values = calm_then_spike(40, 20)
    values[21] = 1e3
    theirs = olmo_skips(values, window=16)
    model = nn.Linear(1, 1, bias=False)
    guard = gradguard.Guard(
        model, torch.optim.SGD(model.parameters(), lr=0.0), "skip_spike:window=16,on=grad_norm"
    )
    ours = []
    for v in values:
        model.weight.grad = torch.full((1, 1), v)
        ours.append(guard.step().skipped)
    assert theirs[20] and not theirs[21]
    assert ours[20] and ours[21]
