"""Guard.load_state_dict validates the whole state before anything changes (issue 13, item 7).

A state from another model, a NaN or negative statistic, a wrong type, a wrong shape or a missing
key is refused with a ConfigError that names the policy and the key, and leaves the Guard exactly
as it was (its state_dict before == after), whichever policy's part is bad.
"""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch

import gradguard
from gradguard import ConfigError, GuardedOptimizer

from tests.helpers import MODEL_FOR, TinyNet, data, set_grads, train_step


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def trained(spec: str, steps: int = 12, model: TinyNet | None = None):
    torch.manual_seed(0)
    model = model or MODEL_FOR.get(spec.split(":")[0], TinyNet)()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = gradguard.Guard(model, opt, spec)
    for step in range(steps):
        guard.step(loss=train_step(model, opt, *data(step)))
    return model, opt, guard


def policy_state(state: dict, name: str) -> dict:
    return next(p["state"] for p in state["policies"] if p["name"] == name)


def assert_refused(guard, state, *match: str) -> ConfigError:
    before = guard.state_dict()
    with pytest.raises(ConfigError) as e:
        guard.load_state_dict(state)
    for m in match:
        assert m in str(e.value), (m, str(e.value))
    assert same(before, guard.state_dict()), "a refused state changed the Guard"
    return e.value


# ----- the model fingerprint ----------------------------------------------------------------------
def test_state_records_a_fingerprint_of_the_parameters():
    _, _, guard = trained("zclip", steps=1)
    fp = guard.state_dict()["fingerprint"]
    assert fp["names"] == guard.layout.names
    assert fp["shapes"] == [list(p.shape) for p in guard.layout.params]


def test_a_state_from_another_model_is_refused_before_anything_changes():
    _, _, saved = trained("zclip:warmup=3+clip_layerwise:factor=3", model=TinyNet(width=8))
    state = saved.state_dict()
    _, _, guard = trained("zclip:warmup=3+clip_layerwise:factor=3", model=TinyNet(width=10))
    err = assert_refused(guard, state, "another model", "fc1.weight")
    assert "(8, 6)" in str(err) and "(10, 6)" in str(err)


def test_a_state_of_a_model_with_fewer_parameters_is_refused():
    _, _, saved = trained("zclip", model=TinyNet())
    state = saved.state_dict()
    state["fingerprint"] = {
        "names": state["fingerprint"]["names"][:-1],
        "shapes": state["fingerprint"]["shapes"][:-1],
    }
    _, _, guard = trained("zclip")
    assert_refused(guard, state, "5 parameters where this one guards 6", "head.bias")


def test_an_old_state_without_a_fingerprint_is_accepted():
    _, _, saved = trained("zclip:warmup=3")
    state = saved.state_dict()
    del state["fingerprint"]
    _, _, guard = trained("zclip:warmup=3", steps=1)
    guard.load_state_dict(state)
    assert same(policy_state(guard.state_dict(), "zclip"), policy_state(state, "zclip"))


# ----- every policy with state: NaN, negative, inf, wrong type, wrong shape, missing key -----------
def _set(name, key, value):
    def f(st):
        st[key] = value(st[key]) if callable(value) else value

    f.__name__ = f"{name}.{key}"
    return f


def _drop(key):
    def f(st):
        del st[key]

    return f


def _item(key, i, value):
    def f(st):
        v = st[key]
        if isinstance(v, torch.Tensor):
            v = v.clone()
            v.reshape(-1)[i] = value
        else:
            v = list(v)
            v[i] = value
        st[key] = v

    return f


NAN, INF = math.nan, math.inf


def _spike_run(key, run, words, admit=8):
    """A skip_spike state whose pending run of ``key`` outliers is ``run``."""
    return (f"skip_spike:admit={admit}", "skip_spike", _set("s", f"{key}_outliers", run), words)


#: (spec, policy, mutation, words the message must hold)
BAD_STATES = [
    # ZClip: a NaN mean makes every z-score NaN: no spike is ever clipped again.
    ("zclip:warmup=3", "zclip", _set("zclip", "mean", NAN), ["zclip", "mean=nan", "finite"]),
    ("zclip:warmup=3", "zclip", _set("zclip", "mean", INF), ["zclip", "mean=inf"]),
    ("zclip:warmup=3", "zclip", _set("zclip", "var", -1.0), ["zclip", "var=-1.0", ">= 0"]),
    ("zclip:warmup=3", "zclip", _set("zclip", "var", "0.1"), ["zclip", "var='0.1'", "number"]),
    ("zclip:warmup=3", "zclip", _set("zclip", "initialized", 1), ["zclip", "initialized"]),
    ("zclip:warmup=3", "zclip", _set("zclip", "buffer", [1.0]), ["zclip", "buffer", "empty"]),
    ("zclip:warmup=30", "zclip", _set("zclip", "buffer", [1.0, NAN]), ["zclip", "buffer", "nan"]),
    ("zclip:warmup=30", "zclip", _set("zclip", "buffer", [1.0] * 30), ["zclip", "buffer", "29"]),
    ("zclip:warmup=3", "zclip", _drop("var"), ["zclip", "no var"]),
    # AutoClip's sorted history and its ring.
    ("autoclip", "autoclip", _item("sorted", 0, NAN), ["autoclip", "sorted", "nan"]),
    ("autoclip", "autoclip", _item("ring", 0, -1.0), ["autoclip", "ring", ">= 0"]),
    ("autoclip", "autoclip", _item("ring", 0, -INF), ["autoclip", "ring"]),
    ("autoclip", "autoclip", _item("ring", 0, 1e7), ["autoclip", "sorted", "ascending"]),
    ("autoclip", "autoclip", _set("a", "ring", lambda t: t[:-1]), ["autoclip", "sorted"]),
    ("autoclip:history=8", "autoclip", _set("a", "ring", lambda t: t[:4]), ["autoclip", "ring"]),
    ("autoclip", "autoclip", _set("a", "n_valid", lambda t: t + 1), ["autoclip", "n_valid"]),
    ("autoclip", "autoclip", _set("a", "n_valid", 3.0), ["autoclip", "n_valid", "tensor"]),
    ("autoclip", "autoclip", _set("a", "count", -1), ["autoclip", "count=-1"]),
    ("autoclip", "autoclip", _set("a", "size", 3), ["autoclip", "size=3"]),
    ("autoclip", "autoclip", _drop("ring"), ["autoclip", "no ring"]),
    # skip_spike's windows.
    ("skip_spike", "skip_spike", _item("grad_norm", 0, NAN), ["skip_spike", "grad_norm", "nan"]),
    ("skip_spike", "skip_spike", _item("grad_norm", 0, -2.0), ["skip_spike", ">= 0"]),
    ("skip_spike", "skip_spike", _item("loss", 0, INF), ["skip_spike", "loss", "inf"]),
    ("skip_spike", "skip_spike", _set("s", "loss", "1.0"), ["skip_spike", "loss", "list"]),
    ("skip_spike:window=4", "skip_spike", _set("s", "loss", [1.0] * 5), ["skip_spike", "loss"]),
    ("skip_spike", "skip_spike", _drop("loss"), ["skip_spike", "no loss"]),
    # skip_spike's runs of outliers: fewer than admit finite values (admit restart the window).
    _spike_run("grad_norm", [2.0, NAN], ["skip_spike", "grad_norm_outliers", "nan"]),
    _spike_run("grad_norm", [-3.0], ["skip_spike", "grad_norm_outliers", ">= 0"]),
    _spike_run("loss", [5.0, INF], ["skip_spike", "loss_outliers", "inf"]),
    _spike_run("loss", "5.0", ["skip_spike", "loss_outliers", "list"]),
    _spike_run("loss", [5.0] * 3, ["skip_spike", "loss_outliers", "more than the 2 kept"], 3),
    _spike_run("grad_norm", [5.0] * 8, ["skip_spike", "grad_norm_outliers", "7 kept"]),
    # reset_moments' per-parameter statistics.
    ("reset_moments", "reset_moments", _item("mean", 1, NAN), ["reset_moments", "mean", "nan"]),
    ("reset_moments", "reset_moments", _item("var", 0, -1.0), ["reset_moments", "var", ">= 0"]),
    ("reset_moments", "reset_moments", _item("count", 0, 2.5), ["reset_moments", "count"]),
    ("reset_moments", "reset_moments", _set("r", "mean", [0.0] * 4), ["reset_moments", "6"]),
    ("reset_moments", "reset_moments", _set("r", "resets", -1), ["reset_moments", "resets"]),
    ("reset_moments", "reset_moments", _drop("count"), ["reset_moments", "no count"]),
    # clip_layerwise's per-layer EMA.
    ("clip_layerwise:factor=3", "clip_layerwise", _item("ema", 0, NAN), ["clip_layerwise", "ema"]),
    ("clip_layerwise:factor=3", "clip_layerwise", _item("count", 0, -1.0), ["count", ">= 0"]),
    (
        "clip_layerwise:factor=3",
        "clip_layerwise",
        _set("c", "ema", lambda t: t[:2]),
        ["clip_layerwise", "ema", "(3,)"],
    ),
    ("clip_layerwise:factor=3", "clip_layerwise", _set("c", "ema", [1.0, 1.0, 1.0]), ["tensor"]),
    ("clip_layerwise:factor=3", "clip_layerwise", _drop("count"), ["clip_layerwise", "no count"]),
    # lr_backoff.
    ("lr_backoff", "lr_backoff", _set("l", "scale", NAN), ["lr_backoff", "scale=nan"]),
    ("lr_backoff", "lr_backoff", _set("l", "scale", 2.0), ["lr_backoff", "(0, 1]"]),
    ("lr_backoff", "lr_backoff", _set("l", "scale", -0.5), ["lr_backoff", "scale"]),
    ("lr_backoff", "lr_backoff", _set("l", "recent", [1.5]), ["lr_backoff", "recent"]),
    ("lr_backoff", "lr_backoff", _set("l", "cuts", -1), ["lr_backoff", "cuts=-1"]),
    ("lr_backoff", "lr_backoff", _set("l", "last_event", "3"), ["lr_backoff", "last_event"]),
    ("lr_backoff", "lr_backoff", _drop("scale"), ["lr_backoff", "no scale"]),
    # rollback's counters and its in-memory snapshot.
    ("rollback", "rollback", _set("r", "consecutive", -1), ["rollback", "consecutive=-1"]),
    ("rollback", "rollback", _set("r", "snapshot_step", NAN), ["rollback", "snapshot_step"]),
    ("rollback", "rollback", _set("r", "rollbacks", "2"), ["rollback", "rollbacks"]),
    ("rollback", "rollback", _set("r", "run_id", 7), ["rollback", "run_id"]),
    ("rollback", "rollback", _drop("since_snapshot"), ["rollback", "no since_snapshot"]),
    # adaptive_clip's ring of log-norms.
    ("adaptive_clip", "adaptive_clip", _item("buffer", 0, NAN), ["adaptive_clip", "buffer", "nan"]),
    ("adaptive_clip", "adaptive_clip", _set("a", "buffer", lambda t: t[:3]), ["buffer", "64"]),
    ("adaptive_clip", "adaptive_clip", _set("a", "pos", 64), ["adaptive_clip", "pos"]),
    ("adaptive_clip", "adaptive_clip", _set("a", "n", -1), ["adaptive_clip", "n=-1"]),
    ("adaptive_clip", "adaptive_clip", _drop("pos"), ["adaptive_clip", "no pos"]),
    # update_clip's per-layer history of update ratios.
    ("update_clip", "update_clip", _set("u", "history", lambda t: t[:1]), ["one row per layer"]),
    (
        "update_clip",
        "update_clip",
        _set("u", "history", lambda t: [[INF] * len(t[0]), *t[1:]]),
        ["update_clip", "history", "finite"],
    ),
    ("update_clip", "update_clip", _set("u", "pos", 99), ["update_clip", "pos"]),
    ("update_clip", "update_clip", _set("u", "hold", -1), ["update_clip", "hold=-1"]),
    ("update_clip", "update_clip", _set("u", "lrs", [NAN]), ["update_clip", "lrs", "nan"]),
    ("update_clip", "update_clip", _drop("lrs"), ["update_clip", "no lrs"]),
    # rollback's runaway trigger, LR cut, skipped ranges and snapshot records.
    ("rollback", "rollback", _item("losses", 0, NAN), ["rollback", "losses", "nan"]),
    ("rollback:window=8", "rollback", _set("r", "losses", [1.0] * 9), ["rollback", "the 8 kept"]),
    ("rollback", "rollback", _set("r", "high", -1), ["rollback", "high=-1"]),
    ("rollback", "rollback", _set("r", "high_since", "3"), ["rollback", "high_since"]),
    ("rollback", "rollback", _set("r", "runaways", -1), ["rollback", "runaways=-1"]),
    ("rollback", "rollback", _set("r", "retries", 1.5), ["rollback", "retries=1.5"]),
    ("rollback", "rollback", _set("r", "lr_scale", 2.0), ["rollback", "lr_scale", "(0, 1]"]),
    ("rollback", "rollback", _set("r", "lr_scale", NAN), ["rollback", "lr_scale=nan"]),
    ("rollback", "rollback", _set("r", "skipped", [[5, 3]]), ["rollback", "skipped[0]", "<="]),
    ("rollback", "rollback", _set("r", "skipped", [[1.5, 3]]), ["rollback", "skipped[0]"]),
    ("rollback", "rollback", _set("r", "skipped", "0-3"), ["rollback", "skipped", "list"]),
    ("rollback", "rollback", _set("r", "slots", lambda s: s * 3), ["rollback", "at most 2"]),
    (
        "rollback",
        "rollback",
        _set("r", "slots", lambda s: s * 2),
        ["rollback", "describes 2 snapshots where the state holds 1"],
    ),
    (
        "rollback",
        "rollback",
        _set("r", "slots", lambda s: [dict(s[0], begin=-1)]),
        ["rollback", "slots[0].begin=-1"],
    ),
    ("rollback", "rollback", _set("r", "slots", [{"step": 0}]), ["slots[0]", "no begin"]),
    # adagc's per-parameter EMA of clipped norms.
    ("adagc:warmup_steps=3", "adagc", _item("gamma", 0, NAN), ["adagc", "gamma", "nan"]),
    ("adagc:warmup_steps=3", "adagc", _item("gamma", 1, -1.0), ["adagc", "gamma", ">= 0"]),
    ("adagc:warmup_steps=3", "adagc", _set("a", "gamma", lambda t: t[:2]), ["adagc", "(6,)"]),
    ("adagc:warmup_steps=3", "adagc", _set("a", "seen", lambda t: t.float()), ["adagc", "seen"]),
    ("adagc:warmup_steps=3", "adagc", _set("a", "step", -1), ["adagc", "step=-1"]),
    ("adagc:warmup_steps=3", "adagc", _drop("gamma"), ["adagc", "no gamma"]),
    # qk_clip's per-head max logits and clip counts (AttnNet: 2 heads).
    ("qk_clip:tau=0.5", "qk_clip", _item("max_logits", 1, NAN), ["qk_clip", "max_logits", "nan"]),
    ("qk_clip:tau=0.5", "qk_clip", _item("clipped", 0, -1), ["qk_clip", "clipped", ">= 0"]),
    ("qk_clip:tau=0.5", "qk_clip", _set("q", "max_logits", lambda t: t[:1]), ["qk_clip", "(2,)"]),
    (
        "qk_clip:tau=0.5",
        "qk_clip",
        _set("q", "clipped", lambda t: t.float()),
        ["qk_clip", "integer"],
    ),
    ("qk_clip:tau=0.5", "qk_clip", _set("q", "steps", -1), ["qk_clip", "steps=-1"]),
    ("qk_clip:tau=0.5", "qk_clip", _drop("max_logits"), ["qk_clip", "no max_logits"]),
    # Policies without state take none.
    ("clip_norm", "clip_norm", _set("c", "extra", 1.0), ["clip_norm", "extra"]),
]


@pytest.mark.parametrize(
    ("spec", "name", "mutate", "words"),
    BAD_STATES,
    ids=[f"{s[0]}-{i}" for i, s in enumerate(BAD_STATES)],
)
def test_a_bad_policy_state_is_refused_and_changes_nothing(spec, name, mutate, words):
    _, _, saved = trained(spec)
    state = copy.deepcopy(saved.state_dict())
    mutate(policy_state(state, name))
    _, _, guard = trained(spec, steps=5)
    assert_refused(guard, state, *words)


def test_every_stateful_policy_is_covered():
    covered = {name for _, name, _, _ in BAD_STATES}
    for name in gradguard.available_policies():
        cls = gradguard.policies.policy_class(name)
        kwargs = {"factor": 3.0} if name == "clip_layerwise" else {}
        if cls(**kwargs).state:
            assert name in covered, name


def test_a_good_state_round_trips_for_every_policy():
    for name in gradguard.available_policies():
        spec = "clip_layerwise:factor=3" if name == "clip_layerwise" else name
        _, _, saved = trained(spec)
        buf = io.BytesIO()
        torch.save(saved.state_dict(), buf)
        buf.seek(0)
        state = torch.load(buf, weights_only=True)
        _, _, guard = trained(spec, steps=3)
        guard.load_state_dict(state)  # nothing refused


def test_policies_are_all_checked_before_any_is_loaded():
    """The old code loaded zclip, then failed on autoclip's state: a half-loaded Guard."""
    spec = "zclip:warmup=3+autoclip"
    _, _, saved = trained(spec, steps=20)
    state = copy.deepcopy(saved.state_dict())
    del policy_state(state, "autoclip")["ring"]
    _, _, guard = trained(spec, steps=5)
    zclip_before = guard.policies[1].state_dict()
    assert_refused(guard, state, "autoclip", "ring")
    assert same(zclip_before, guard.policies[1].state_dict())


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("step", -1, "step=-1"),
        ("step", "30", "step='30'"),
        ("step", 3.0, "step=3.0"),
        ("counters", {"steps": -2}, "counters['steps']=-2"),
        ("counters", [1, 2], "counters must be a dict"),
        ("skip_streak", {"nonfinite_grad": 1.5}, "skip_streak['nonfinite_grad']=1.5"),
    ],
)
def test_bad_guard_fields_are_refused(key, value, words):
    _, _, saved = trained("zclip")
    state = saved.state_dict()
    state[key] = value
    _, _, guard = trained("zclip", steps=3)
    assert_refused(guard, state, words)


def test_malformed_policy_entries_are_refused():
    _, _, saved = trained("zclip")
    state = saved.state_dict()
    state["policies"][1] = ("zclip", {})
    _, _, guard = trained("zclip", steps=3)
    assert_refused(guard, state, "policies[1]")


# ----- the 1e7 spike -----------------------------------------------------------------------------
def test_a_zclip_with_a_nan_mean_is_refused_and_the_spike_is_still_clipped():
    """With the old code a NaN mean loaded silently; every z-score was then NaN, so a 1e7 spike
    passed unclipped (and every later one)."""
    model, _, guard = trained("zclip:warmup=3", steps=10)
    state = guard.state_dict()
    policy_state(state, "zclip")["mean"] = math.nan
    with pytest.raises(ConfigError, match=r"zclip: .*mean=nan"):
        guard.load_state_dict(state)
    set_grads(model, seed=99, scale=1e7)
    report = guard.step()
    assert "zclip" in report.actions
    assert report.grad_norm > 1e7 and report.grad_norm_after < 1e3
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ----- the optimizer wrapper ----------------------------------------------------------------------
def test_guarded_optimizer_checks_the_guard_state_before_loading_the_optimizer():
    torch.manual_seed(0)
    model = TinyNet()
    opt = GuardedOptimizer(
        torch.optim.Adam(model.parameters(), lr=1e-2), model=model, policy="zclip:warmup=3"
    )
    for step in range(6):
        opt.zero_grad()
        train_step(model, opt, *data(step))
        opt.step()
    state = opt.state_dict()
    policy_state(state["gradguard"], "zclip")["var"] = -4.0
    for g in state["param_groups"]:
        g["lr"] = 123.0
    with pytest.raises(ConfigError, match=r"var=-4\.0"):
        opt.load_state_dict(state)
    assert all(g["lr"] == 1e-2 for g in opt.param_groups)  # the optimizer was not loaded either


# ----- close() ------------------------------------------------------------------------------------
def test_close_calls_every_policys_close_once_per_call():
    closed = []

    class Tracked(gradguard.clip_norm):
        def close(self):
            closed.append(self.name)

    model = TinyNet()
    guard = gradguard.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), [Tracked()])
    guard.close()
    assert closed == ["clip_norm"]
    with guard:
        pass
    assert closed == ["clip_norm", "clip_norm"]
