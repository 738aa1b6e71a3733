"""skip_spike's level shift (``admit``): a sustained move to a new level is admitted after ``admit``
finite outliers in a row (the window restarts from them), where a spike, a shorter burst or a run
broken by a NaN is skipped and kept out of the window. Before ``admit``, every skipped value stayed
out of the window for good, so a shift was skipped until the Guard stopped the run."""

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
