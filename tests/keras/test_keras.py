"""gradguard.keras: the policies in keras.ops against the torch Guard, GuardedOptimizer in
model.fit and in a custom loop, the telemetry callback through `gradguard report`, the Keras bench
variant, and bad input. TensorFlow backend in this process; the torch backend in a subprocess."""

from __future__ import annotations

import inspect
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")
if keras.backend.backend() != "tensorflow":
    pytest.skip("these tests run Keras on the TensorFlow backend", allow_module_level=True)

import gradguard  # noqa: E402
from gradguard import Guard  # noqa: E402
from gradguard.diagnose import load_run  # noqa: E402
from gradguard.errors import ConfigError, SpecError  # noqa: E402
from gradguard.keras import (  # noqa: E402
    KERAS_POLICIES,
    REFUSED,
    GuardedOptimizer,
    GuardTelemetry,
)
from gradguard.keras.policies import KERAS_DEFAULT_SPEC, RuleAdapter, parse_keras_spec  # noqa: E402
from gradguard.policies import available_policies, policy_class  # noqa: E402
from gradguard.policies.rule import Decision, Field, RulePolicy, initial_host_state  # noqa: E402

from tests.helpers import slow_except  # noqa: E402

SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")


def _start_python(code: str, env: dict[str, str] | None = None, timeout: int = 120):
    """Start ``code`` in a fresh interpreter (with gradguard's sources on the path); return a
    function that waits for it and returns its stdout (failing the test if it failed)."""
    full_env = {**os.environ, "PYTHONPATH": os.path.abspath(SRC), "TF_CPP_MIN_LOG_LEVEL": "3"}
    full_env.update(env or {})
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
    )

    def result() -> str:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        assert proc.returncode == 0, err[-3000:]
        return out

    return result


def _run_python(code: str, env: dict[str, str] | None = None, timeout: int = 120) -> str:
    """Run ``code`` in a fresh interpreter (with gradguard's sources on the path); its stdout."""
    return _start_python(code, env, timeout)()


# ----- the same numbers as the torch Guard -------------------------------------------------------
class TorchNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc2(self.fc1(x)))


def keras_twin(net: TorchNet) -> keras.Model:
    """The torch net's layers as Keras Dense layers with the same weights (kernels transposed)."""
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, name="fc1"),
            keras.layers.Dense(8, name="fc2"),
            keras.layers.Dense(3, name="head"),
        ],
        name="twin",
    )
    for layer, mod in zip(model.layers, (net.fc1, net.fc2, net.head), strict=True):
        layer.set_weights([mod.weight.detach().numpy().T, mod.bias.detach().numpy()])
    return model


class GradRecorder(keras.optimizers.Optimizer):
    """An inner optimizer that keeps the gradients it is given and leaves the weights alone."""

    def __init__(self):
        super().__init__(learning_rate=1.0)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.seen = [self.add_variable_from_reference(v, "seen") for v in variables]

    def update_step(self, gradient, variable, learning_rate):
        self.seen[self._get_variable_index(variable)].assign(gradient)


NAN_STEP, SPIKE_STEP, STEPS = 4, 8, 12


def grad_sequence(net: TorchNet) -> list[list[np.ndarray]]:
    """Gradients for ``STEPS`` steps in the torch layout: noisy, a NaN in fc2's weight at
    ``NAN_STEP``, every gradient x30 at ``SPIKE_STEP``."""
    rng = np.random.default_rng(1)
    seq = []
    for t in range(STEPS):
        scale = (1.0 + 0.3 * math.sin(t)) * (30.0 if t == SPIKE_STEP else 1.0)
        grads = [
            (rng.standard_normal(p.shape) * scale).astype(np.float32) for p in net.parameters()
        ]
        if t == NAN_STEP:
            grads[2][1, 2] = np.nan
        seq.append(grads)
    return seq


def _as_keras(g: np.ndarray) -> np.ndarray:
    return g.T.copy() if g.ndim == 2 else g.copy()


EQUIVALENT_SPECS = [
    "none",
    "clip_norm:0.5",
    "clip_norm:max_norm=0.5,norm_type=inf",
    "clip_norm:max_norm=2,norm_type=1",
    "clip_value:0.05",
    "clip_layerwise:max_norm=0.3",
    "clip_layerwise:factor=1.5,warmup=3",
    "agc:0.05",
    "agc:clipping=0.05,exclude_head=false,exclude=fc2",
    "autoclip:10",
    "autoclip:percentile=50,history=4",
    "zclip:warmup=4",
    "zclip:warmup=3,clip_option=mean,max_norm=5",
    "zclip:warmup=3,skip_update_on_spike=true",
    "skip_spike:window=6,z=3",
    "skip_nonfinite+zclip:warmup=3+lr_backoff:events=1,window=3,recover=2",
    "default",
]
#: Every Keras policy the list does not name, at its defaults: a new one is compared at once.
EQUIVALENT_SPECS += [
    n for n in sorted(KERAS_POLICIES) if not any(s.split(":")[0] == n for s in EQUIVALENT_SPECS)
]


#: The fast suite's specs: one of each policy (those at their defaults above included), and every
#: option that takes a path of its own in the Keras classes (clip_norm's inf and p norms, agc's
#: exclude by layer name, autoclip's window); the options of the shared rules (clip_layerwise's
#: max_norm, zclip's) only in the full suite.
FAST_SPECS = {s for s in EQUIVALENT_SPECS if s in KERAS_POLICIES} | {
    "none",
    "clip_norm:0.5",
    "clip_norm:max_norm=0.5,norm_type=inf",
    "clip_norm:max_norm=2,norm_type=1",
    "clip_value:0.05",
    "clip_layerwise:factor=1.5,warmup=3",
    "agc:0.05",
    "agc:clipping=0.05,exclude_head=false,exclude=fc2",
    "autoclip:10",
    "autoclip:percentile=50,history=4",
    "zclip:warmup=4",
    "skip_spike:window=6,z=3",
    "skip_nonfinite+zclip:warmup=3+lr_backoff:events=1,window=3,recover=2",
    "default",
}


def test_keras_default_is_the_torch_default_without_update_clip():
    torch_default = [p.name for p in gradguard.policies.parse_spec("default")]
    keras_default = [p.name for p in parse_keras_spec("default")]
    assert keras_default == [n for n in torch_default if n != "update_clip"]
    assert "update_clip" in torch_default
    with pytest.raises(ConfigError, match=r"update_clip.*not available in Keras"):
        parse_keras_spec("update_clip")


def test_the_keras_ring_trend_is_the_hosts():
    """An array op no Keras rule reaches yet (lr_backoff's loss test never runs without a
    loss), checked against the host's so that a rule using it is right on Keras too."""
    from gradguard.keras.xp import KERAS
    from gradguard.policies.xp import HOST

    rng = np.random.default_rng(1)
    for size, count in [(8, 1), (8, 5), (8, 8), (8, 19), (32, 40)]:
        ring = rng.normal(2.0, 0.3, size).tolist()
        want = HOST.ring_trend(ring, count)
        got = KERAS.ring_trend(keras.ops.convert_to_tensor(ring, "float32"), count)
        got = tuple(float(keras.ops.convert_to_numpy(v)) for v in got)
        if math.isinf(want[0]):
            assert all(math.isinf(v) for v in got)
        else:
            assert got == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_lr_backoff_loss_test_is_refused_in_keras_saying_why():
    with pytest.raises(
        ConfigError,
        match=r"lr_backoff: not available in Keras.*never sees the loss: loss_z=2.*loss_z=0",
    ):
        parse_keras_spec("skip_nonfinite+lr_backoff:loss_z=2")
    assert parse_keras_spec("lr_backoff:loss_z=0")[0].loss_z == 0


def test_qk_clip_is_refused_in_keras_saying_why():
    with pytest.raises(ConfigError, match=r"qk_clip.*not available in Keras.*attention"):
        parse_keras_spec("skip_nonfinite+qk_clip:tau=50")


@pytest.mark.parametrize(
    ("spec", "graph"),
    # Fast: FAST_SPECS eager, and the default compiled; slow: the other options of clip_layerwise
    # and zclip, and two more compiled.
    slow_except(
        [
            *[(s, False) for s in EQUIVALENT_SPECS],
            ("default", True),
            ("autoclip:percentile=50,history=4", True),
            ("clip_layerwise:factor=1.5,warmup=3", True),
        ],
        *[(s, False) for s in FAST_SPECS],
        ("default", True),
    ),
)
def test_keras_policies_give_the_torch_guards_gradients(spec, graph):
    """Every step of a sequence with a NaN and a spike: the same skips, the same mitigated
    gradients (to 1e-6 relative), the same LR scale, eager and inside a tf.function."""
    net = TorchNet()
    check_finite = spec != "none"
    # Keras's default is the torch default without update_clip (no Keras twin): its torch twin.
    torch_spec = KERAS_DEFAULT_SPEC if spec == "default" else spec
    guard = Guard(
        net, torch.optim.SGD(net.parameters(), lr=1.0), torch_spec, check_finite=check_finite
    )
    with torch.no_grad():  # one forward: the torch Guard learns the forward order (AGC's head)
        net(torch.zeros(1, 6))
    model = keras_twin(net)
    recorder = GradRecorder()
    opt = GuardedOptimizer(recorder, spec, check_finite=check_finite)
    assert opt.spec == guard.spec or spec == "none"
    variables = model.trainable_variables
    opt.build(variables)
    apply = tf.function(lambda gs: opt.apply(gs, variables)) if graph else opt.apply
    for t, grads in enumerate(grad_sequence(net)):
        for p, g in zip(net.parameters(), grads, strict=True):
            p.grad = torch.from_numpy(g.copy())
        pending = guard.before_step()
        expected = [None if p.grad is None else p.grad.numpy().copy() for p in net.parameters()]
        report = guard.after_step(pending)
        iterations = int(recorder.iterations.numpy())
        keras_grads = [tf.constant(_as_keras(g)) for g in grads]
        if graph:
            apply(keras_grads)
        else:
            apply(keras_grads, variables)
        info = opt.last_step()
        assert info["skipped"] == report.skipped, f"step {t}"
        assert info["skip_reason"] == report.skip_reason, f"step {t}"
        assert info["lr_scale"] == pytest.approx(report.lr_scale, rel=1e-6), f"step {t}"
        assert info["grad_norm"] == pytest.approx(report.grad_norm, rel=1e-6, nan_ok=True)
        if report.skipped:
            assert int(recorder.iterations.numpy()) == iterations, f"step {t}: not skipped"
            continue
        assert int(recorder.iterations.numpy()) == iterations + 1
        for k, (seen, want) in enumerate(zip(recorder.seen, expected, strict=True)):
            got = seen.numpy()
            got = got.T if got.ndim == 2 else got
            np.testing.assert_allclose(
                got,
                want,
                rtol=1e-6,
                atol=1e-7 * np.nanmax(np.abs(want)),
                err_msg=f"step {t}, var {k}",
            )
    counters = guard.counters
    mine = opt.counters
    for key in ("steps", "skipped", "clipped"):
        assert mine[key] == counters[key], key


def test_the_sequence_exercises_every_policy():
    """The comparison above is only as good as its data: the spike is clipped or skipped, the
    NaN step skipped, and each stateful policy acted at least once."""
    net = TorchNet()
    seq = grad_sequence(net)
    for spec, key in (
        ("zclip:warmup=4", "acted.zclip"),
        ("autoclip:10", "acted.autoclip"),
        ("skip_spike:window=6,z=3", "acted.skip_spike"),
        ("clip_layerwise:factor=1.5,warmup=3", "acted.clip_layerwise"),
        ("agc:0.05", "acted.agc"),
        (
            "skip_nonfinite+zclip:warmup=3+lr_backoff:events=1,window=3,recover=2",
            "acted.lr_backoff",
        ),
    ):
        opt = GuardedOptimizer(GradRecorder(), spec)
        model = keras_twin(net)
        for grads in seq:
            opt.apply([tf.constant(_as_keras(g)) for g in grads], model.trainable_variables)
        assert opt.counters[key] >= 1, spec
        assert opt.counters["skipped"] >= 1, spec


@pytest.mark.parametrize("spec", ["skip_spike:window=6,z=3", "skip_spike:window=6,z=3,warmup=4"])
def test_skip_spike_warms_up_as_the_torch_guard(spec):
    """A spike as soon as the window is ready: ``warmup`` counts the current value in both (the
    Keras copy once compared the window alone, one step later, and let this spike through)."""
    norms = [1.0, 1.1, 50.0, 1.05, 0.95, 1.0, 80.0, 1.0]
    torch.manual_seed(0)
    lin = nn.Linear(3, 1, bias=False)
    guard = Guard(lin, torch.optim.SGD(lin.parameters(), lr=0.0), spec, check_finite=False)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, use_bias=False)])
    opt = GuardedOptimizer(keras.optimizers.SGD(0.0), spec, check_finite=False)
    torch_skips, keras_skips = [], []
    for x in norms:
        lin.weight.grad = torch.tensor([[x, 0.0, 0.0]])
        torch_skips.append(guard.step().skipped)
        opt.apply([tf.constant([[x], [0.0], [0.0]])], model.trainable_variables)
        keras_skips.append(opt.last_step()["skipped"])
    assert keras_skips == torch_skips
    assert torch_skips[6] and torch_skips[2] == (spec == "skip_spike:window=6,z=3")


def _spike_stream() -> list[float]:
    """Calm norms, a burst of 3 (below admit=4), calm, 2 outliers, a NaN, then a 10x level."""
    rng = np.random.default_rng(5)
    calm = (1.0 + 0.2 * rng.random(60)).tolist()
    high = (10.0 + 2.0 * rng.random(40)).tolist()
    return calm[:30] + [40.0] * 3 + calm[30:35] + high[:2] + [math.nan] + high[2:]


def _torch_and_keras_skips(spec: str, norms: list[float], graph: bool):
    torch.manual_seed(0)
    lin = nn.Linear(3, 1, bias=False)
    guard = Guard(lin, torch.optim.SGD(lin.parameters(), lr=0.0), spec, check_finite=False)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, use_bias=False)])
    opt = GuardedOptimizer(keras.optimizers.SGD(0.0), spec, check_finite=False)
    variables = model.trainable_variables
    opt.build(variables)
    apply = tf.function(lambda gs: opt.apply(gs, variables)) if graph else opt.apply
    torch_skips, keras_skips = [], []
    for x in norms:
        lin.weight.grad = torch.tensor([[x, 0.0, 0.0]])
        torch_skips.append(guard.step().skipped)
        grads = [tf.constant([[x], [0.0], [0.0]])]
        apply(grads) if graph else apply(grads, variables)
        keras_skips.append(opt.last_step()["skipped"])
    return torch_skips, keras_skips, guard, opt


def test_rule_policies_have_no_keras_code():
    """Every registered rule policy runs in Keras through the generic adapter (adding one touches
    nothing in the Keras package); skip_spike, a rule, keeps no state for the loss Keras never
    gives (its Keras state is the gradient norm's ring, count and run of outliers only)."""
    from gradguard.policies import policy_class
    from gradguard.policies.rule import RulePolicy

    rules = [n for n in KERAS_POLICIES if issubclass(policy_class(n), RulePolicy)]
    assert {"skip_spike", "zclip", "adaptive_clip", "clip_layerwise"} <= set(rules)
    for name in rules:
        assert issubclass(KERAS_POLICIES[name], RuleAdapter), name
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    opt = GuardedOptimizer(
        keras.optimizers.SGD(0.1), "skip_spike:on=both,window=8", check_finite=False
    )
    opt.build(model.trainable_variables)
    assert set(opt.policies[0].state_vars) == {"values", "count", "outliers", "run"}


@pytest.mark.parametrize(
    ("window", "graph"),
    # Eager with the full window and compiled with the short one in the fast suite.
    [
        (16, False),
        pytest.param(16, True, marks=pytest.mark.slow),
        (3, True),
        pytest.param(3, False, marks=pytest.mark.slow),
    ],
)
def test_skip_spike_admits_a_shift_as_the_torch_guard(window, graph):
    """A burst shorter than ``admit`` skipped and kept out, a NaN ending a run of outliers, then a
    shift admitted after ``admit`` outliers (window=3: a run longer than the window): the same
    skips step by step, eager and compiled, and the same window and run afterwards."""
    norms = _spike_stream()
    spec = f"skip_spike:window={window},warmup=3,z=3,admit=4"
    torch_skips, keras_skips, guard, opt = _torch_and_keras_skips(spec, norms, graph)
    assert keras_skips == torch_skips
    skipped = [i for i, s in enumerate(torch_skips) if s]
    expected = [30, 31, 32, 38, 39, 40, 41, 42, 43, 44]
    if window == 3:  # three values are a noisy window: a few more false alarms
        assert set(expected) <= set(skipped) and not any(torch_skips[45:48])
    else:
        assert skipped == expected
    torch_state = guard.policies[0].state_dict()
    policy = opt.policies[0]
    count = int(policy.count.numpy())
    ring = policy.values.numpy()[: min(count, window)]
    order = [(count - len(ring) + i) % window for i in range(len(ring))]  # oldest first
    np.testing.assert_allclose(ring[order], torch_state["grad_norm"], rtol=1e-6)
    assert int(policy.run.numpy()) == len(torch_state["grad_norm_outliers"]) == 0


def test_skip_spike_keeps_a_pending_run_through_save_and_load(tmp_path):
    """Saved with 2 outliers pending (admit=4), loaded: the run is there, and the shift is admitted
    when the uninterrupted optimizer admits it."""
    norms = [1.0 + 0.02 * (i % 7) for i in range(30)] + [10.0 + 0.1 * i for i in range(20)]
    spec = "skip_spike:window=16,z=3,admit=4"

    def build():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, use_bias=False)])
        opt = GuardedOptimizer(keras.optimizers.SGD(0.0), spec, check_finite=False)
        model.compile(optimizer=opt, loss="mse")
        opt.build(model.trainable_variables)
        return model, opt

    def feed(model, opt, values):
        out = []
        for x in values:
            opt.apply([tf.constant([[x], [0.0], [0.0]])], model.trainable_variables)
            out.append(opt.last_step()["skipped"])
        return out

    model, opt = build()
    whole = feed(model, opt, norms)
    assert [i for i, s in enumerate(whole) if s] == [30, 31, 32, 33]
    model, opt = build()
    head = feed(model, opt, norms[:32])
    assert int(opt.policies[0].run.numpy()) == 2
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    restored = loaded.optimizer.policies[0]
    assert int(restored.run.numpy()) == 2
    np.testing.assert_allclose(restored.outliers.numpy()[:2], norms[30:32], rtol=1e-6)
    assert head + feed(loaded, loaded.optimizer, norms[32:]) == whole


class _capped(RulePolicy):
    """A toy policy written once, as a new policy would be: clip the global norm to ``limit``,
    count the clips, report the count."""

    name = "capped"
    metrics = ("capped.clips",)

    def __init__(self, limit: float = 1.0):
        super().__init__()
        self.limit = float(limit)
        self.state = initial_host_state(self.fields(0))

    def fields(self, n_layers):
        return {"clips": Field(kind="int")}

    def decide(self, xp, state, inputs):
        coef = xp.minimum(self.limit / (inputs.norm + 1e-6), 1.0)
        clips = state["clips"] + xp.as_int(coef < 1.0)
        return {"clips": clips}, Decision(
            scale=coef, acted=coef < 1.0, metrics={"capped.clips": xp.as_float(clips)}
        )


def test_a_rule_policy_runs_in_keras_with_nothing_written_for_keras():
    """The generic adapter: a RulePolicy's own decide on keras.ops, its state in variables."""
    keras_capped = type("capped", (RuleAdapter,), {"reference": _capped})
    net = TorchNet()
    policy = _capped(limit=2.0)
    guard = Guard(net, torch.optim.SGD(net.parameters(), lr=1.0), [policy], check_finite=False)
    recorder = GradRecorder()
    opt = GuardedOptimizer(recorder, [keras_capped(limit=2.0)], check_finite=False)
    model = keras_twin(net)
    variables = model.trainable_variables
    for grads in grad_sequence(net)[:NAN_STEP]:
        for p, g in zip(net.parameters(), grads, strict=True):
            p.grad = torch.from_numpy(g.copy())
        pending = guard.before_step()
        expected = [p.grad.numpy().copy() for p in net.parameters()]
        report = guard.after_step(pending)
        opt.apply([tf.constant(_as_keras(g)) for g in grads], variables)
        for seen, want in zip(recorder.seen, expected, strict=True):
            got = seen.numpy()
            np.testing.assert_allclose(got.T if got.ndim == 2 else got, want, rtol=1e-6)
        assert opt.last_step()["metrics"]["capped.clips"] == report.metrics["capped.clips"]
    assert int(opt.policies[0].clips.numpy()) == int(policy.state["clips"]) >= 1


def test_autoclip_past_max_history_keeps_a_consistent_bounded_sample():
    """Beyond ``max_history`` the history is a reservoir sample (a different hash than torch's,
    so not compared above): it stays bounded, sorted, made of norms actually seen, and the
    threshold is its percentile."""
    net = TorchNet()
    model = keras_twin(net)
    opt = GuardedOptimizer(
        GradRecorder(), "autoclip:percentile=50,max_history=4", check_finite=False
    )
    policy = opt.policies[0]
    rng = np.random.default_rng(3)
    seen = []
    for _ in range(40):
        grads = [
            rng.standard_normal(v.shape).astype(np.float32) * rng.uniform(0.5, 5)
            for v in model.trainable_variables
        ]
        opt.apply([tf.constant(g) for g in grads], model.trainable_variables)
        seen.append(opt.last_step()["grad_norm"])
        ring, buf = policy.ring.numpy(), policy.sorted.numpy()
        n = int(policy.n_valid.numpy())
        assert n == min(len(seen), 4)
        np.testing.assert_array_equal(np.sort(ring[np.isfinite(ring)]), buf[:n])
        assert np.all(np.isinf(buf[n:]))
        assert all(np.isclose(seen, r, rtol=1e-6).any() for r in buf[:n])
        threshold = opt.last_step()["metrics"]["autoclip.threshold"]
        assert threshold == pytest.approx(np.percentile(buf[:n], 50), rel=1e-6)
    assert int(policy.count.numpy()) == 40
    kept = {round(float(r), 4) for r in policy.ring.numpy()}
    assert kept - {round(v, 4) for v in seen[:4]}  # the sample moved on past the first norms


def test_mixed_float16_wraps_the_guarded_optimizer_in_the_loss_scaler(tmp_path):
    x, y = _digits_like()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = _mlp()
        opt = GuardedOptimizer(keras.optimizers.SGD(0.1, momentum=0.9), "default")
        model.compile(
            optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        )
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        model.fit(
            x,
            y,
            batch_size=BATCH,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=[GuardTelemetry(tmp_path)],
        )
    finally:
        keras.mixed_precision.set_global_policy("float32")
    # The loss scaler skips the NaN batch itself (an overflow to it) and the Guard never sees it.
    assert opt.counters["steps"] == N_BATCHES - 1 and opt.counters["skipped"] == 0
    assert all(np.isfinite(w).all() for w in model.get_weights())
    assert len(load_run(tmp_path).steps) == N_BATCHES - 1


def test_a_new_policy_needs_nothing_in_the_keras_package(monkeypatch):
    """A policy registered later: a non-rule one is refused with the generic reason, one that
    gives its own ``keras_refusal`` with that reason, without any edit here."""
    from gradguard.keras import policies as kpol
    from gradguard.policies import Policy, registry

    class acts_itself(Policy):
        """A policy that is not a rule, registered after the Keras package was imported."""

        name = "acts_itself"

        def apply(self, ctx):
            pass

    class says_why(acts_itself):
        """The same, with its own reason."""

        name = "says_why"
        keras_refusal = "it reads the torch optimizer's buffers"

    for cls in (acts_itself, says_why):
        monkeypatch.setitem(registry._REGISTRY, cls.name, cls)
    with pytest.raises(
        gradguard.ConfigError, match=r"'acts_itself' is not available in Keras: it acts"
    ):
        kpol.parse_keras_spec("acts_itself")
    with pytest.raises(
        gradguard.ConfigError, match=r"says_why.*reads the torch optimizer's buffers"
    ):
        kpol.parse_keras_spec("says_why")


def test_every_policy_is_ported_with_the_same_parameters_or_refused_with_a_reason():
    """Registry-driven: a new torch policy fails here until it is ported or refused."""
    for name in available_policies():
        if name in REFUSED:
            assert name not in KERAS_POLICIES
            continue
        assert name in KERAS_POLICIES, f"{name}: port it to gradguard.keras or add it to REFUSED"
        torch_sig = inspect.signature(policy_class(name).__init__)
        mine = inspect.signature(KERAS_POLICIES[name])
        assert [(p.name, p.default) for p in list(torch_sig.parameters.values())[1:]] == [
            (p.name, p.default) for p in mine.parameters.values()
        ]
        try:
            reference = policy_class(name)()
        except SpecError:  # no usable defaults (clip_layerwise): both refuse alike
            with pytest.raises(ConfigError):
                KERAS_POLICIES[name]()
            continue
        assert KERAS_POLICIES[name]().spec() == reference.spec()


# ----- model.fit -----------------------------------------------------------------------------------
BATCH, N_BATCHES, BAD_BATCH = 8, 8, 3


def _digits_like(bad_batch: int | None = BAD_BATCH) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH * N_BATCHES, 8)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int32)
    if bad_batch is not None:
        x[bad_batch * BATCH : (bad_batch + 1) * BATCH] = np.nan  # NaN activations -> NaN grads
    return x, y


def _mlp() -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="tanh", name="fc1"),
            keras.layers.Dropout(0.1, name="drop"),
            keras.layers.Dense(2, name="head"),
        ],
        name="mlp",
    )


class _Snapshots(keras.callbacks.Callback):
    """Weights, the inner optimizer's variables and its iteration count after every batch."""

    def __init__(self):
        super().__init__()
        self.weights, self.slots, self.iterations = [], [], []

    def on_train_batch_end(self, batch, logs=None):
        opt = self.model.optimizer
        self.weights.append([w.copy() for w in self.model.get_weights()])
        self.slots.append([v.numpy().copy() for v in opt.inner_optimizer.variables])
        self.iterations.append(int(opt.iterations.numpy()))


@pytest.mark.parametrize("jit_compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_fit_skips_the_nan_batch_and_leaves_the_inner_optimizer_alone(jit_compile):
    x, y = _digits_like()
    model = _mlp()
    opt = GuardedOptimizer(keras.optimizers.SGD(0.1, momentum=0.9), policy="default")
    model.compile(
        optimizer=opt,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    snaps = _Snapshots()
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[snaps])
    assert opt.counters["skipped"] == 1
    assert opt.counters["steps"] == N_BATCHES
    assert all(np.isfinite(w).all() for w in model.get_weights())
    # The bad batch: no weight, no momentum, no iteration moved; every other batch stepped.
    assert snaps.iterations == [b + 1 if b < BAD_BATCH else b for b in range(N_BATCHES)]
    before, after = BAD_BATCH - 1, BAD_BATCH
    for a, b in zip(snaps.weights[before], snaps.weights[after], strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(snaps.slots[before], snaps.slots[after], strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(snaps.weights[after], snaps.weights[after + 1], strict=True)
    )
    # Unguarded, the same NaN batch poisons the weights: the test data does what it claims.
    bare = _mlp()
    bare.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    bare.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    assert not all(np.isfinite(w).all() for w in bare.get_weights())


def test_custom_loop_and_save_load_keep_the_policy_state(tmp_path):
    """optimizer.apply in a tf.function custom loop; the state (counters, ZClip's EMA) is saved
    with the model and comes back on load."""
    x, y = _digits_like()
    model = _mlp()
    opt = GuardedOptimizer(keras.optimizers.Adam(1e-2), policy="skip_nonfinite+zclip:warmup=3")
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply(grads, model.trainable_variables)
        return loss

    for b in range(N_BATCHES):
        step(x[b * BATCH : (b + 1) * BATCH], y[b * BATCH : (b + 1) * BATCH])
    assert opt.counters["skipped"] == 1
    assert int(opt.iterations.numpy()) == N_BATCHES - 1
    assert all(np.isfinite(w).all() for w in model.get_weights())
    zclip = opt.policies[1]
    assert int(zclip.initialized.numpy()) == 1 and float(zclip.mean.numpy()) > 0

    model.compile(optimizer=opt, loss=loss_fn)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    restored = loaded.optimizer
    assert isinstance(restored, GuardedOptimizer)
    assert restored.spec == opt.spec
    assert restored.counters == opt.counters
    assert float(restored.policies[1].mean.numpy()) == float(zclip.mean.numpy())


# ----- telemetry -> report -------------------------------------------------------------------------
@pytest.mark.slow  # a `gradguard report` process
def test_telemetry_callback_feeds_gradguard_report(tmp_path):
    x, y = _digits_like()
    model = _mlp()
    opt = GuardedOptimizer(keras.optimizers.SGD(0.1, momentum=0.9), policy="default")
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    run = tmp_path / "run"
    running: list[float] = []  # fit's running mean of the loss after each batch
    keep = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda b, logs: running.append(logs["loss"])
    )
    model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[GuardTelemetry(run, update_every=2), keep],
    )
    log = load_run(run)
    assert log.layers == ["fc1", "head"]
    assert log.meta["layer_types"] == ["Dense", "Dense"]
    assert log.meta["layer_params"] == [8 * 16 + 16, 16 * 2 + 2]
    assert [s["step"] for s in log.steps] == list(range(2 * N_BATCHES))
    bad = [s for s in log.steps if s["skipped"]]
    assert [s["step"] for s in bad] == [BAD_BATCH, N_BATCHES + BAD_BATCH]
    assert bad[0]["skip_reason"] == "nonfinite_grad" and bad[0]["nonfinite_layers"] == [0, 1]
    # Each batch's own loss, recovered from the running mean; unknown after a NaN batch until
    # the epoch ends (the running mean stays NaN).
    losses = [s["loss"] for s in log.steps]
    assert sum(losses[:BAD_BATCH]) / BAD_BATCH == pytest.approx(running[BAD_BATCH - 1], rel=1e-5)
    assert all(math.isfinite(v) for v in losses[:BAD_BATCH])
    assert math.isnan(losses[BAD_BATCH]) and losses[BAD_BATCH + 1 : N_BATCHES] == [None] * 4
    assert losses[N_BATCHES] == pytest.approx(running[N_BATCHES], rel=1e-5)
    ok = log.steps[0]
    assert ok["grad_norm"] == pytest.approx(math.hypot(*ok["layer_norms"]), rel=1e-5)
    assert any(s["update_ratio"] is not None for s in log.steps)
    kinds = {(e["kind"], e["step"], e["action"]) for e in log.events}
    assert ("nonfinite_grad", BAD_BATCH, "skipped") in kinds
    assert log.end is not None and log.end["counters"]["skipped"] == 2

    out = subprocess.run(
        [sys.executable, "-m", "gradguard", "report", str(run)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.path.abspath(SRC)},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    html = (run / "report.html").read_text(encoding="utf-8")
    assert "nonfinite_grad" in html and "fc1" in html and "head" in html
    assert f"step {BAD_BATCH}" in html or f">{BAD_BATCH}<" in html


# ----- the bench variant ---------------------------------------------------------------------------
@pytest.mark.slow  # a fresh worker process starts TensorFlow
def test_keras_bench_variant_runs_end_to_end_into_the_results_database(tmp_path):
    from gradguard.bench.config import RunConfig, expand_grid
    from gradguard.bench.runner import run_grid, telemetry_dir

    (cfg,) = expand_grid(
        # The seed document's TensorFlow scenario, small: an MLP with Dropout, SGD + momentum.
        {
            "steps": 30,
            "batch_size": 32,
            "eval_every": 10,
            "model_options": {"depth": 2, "width": 64, "dropout": 0.1},
        },
        {
            "task": ["digits"],
            "model": ["keras_mlp"],
            "optimizer": ["momentum"],
            "lr": [0.05],
            "mitigation": ["default"],
            "faults": ["nan:at=5"],
        },
    )
    assert isinstance(cfg, RunConfig)
    (row,) = run_grid([cfg], tmp_path, workers=1, progress=False, telemetry=True)
    result = row["result"]
    assert result["steps_run"] == 30 and not result["diverged"]
    assert result["faults"] == {"nan": 1}
    assert result["interventions"]["skipped"] == 1
    assert 0.5 < result["test_metric"] <= 1.0  # 30 steps of the digits MLP learn a lot
    import sqlite3

    with sqlite3.connect(tmp_path / "results.db") as db:
        rows = db.execute("SELECT step, metrics FROM steps ORDER BY step").fetchall()
    steps = [{"step": k, **json.loads(m)} for k, m in rows]
    assert len(steps) == 30 and [s["step"] for s in steps if s["skipped"]] == [5]
    log = load_run(telemetry_dir(tmp_path, row["key"], row["config"]))
    assert log.layers == ["fc0", "fc1", "head"]
    assert [e["step"] for e in log.events if e["kind"] == "nonfinite_grad"] == [5]


@pytest.mark.slow  # three processes start TensorFlow
def test_keras_bench_runs_train_with_their_threads_even_where_tensorflow_already_runs(tmp_path):
    """TensorFlow fixes its intra-op pool when its runtime starts. A process where it already runs
    with 2 threads refuses to train a threads=1 run itself, and its bench trains the run in a
    fresh worker instead; the figures are those of a fresh process that pinned TF to 1 thread."""
    cfg = {
        "task": "digits",
        "model": "keras_mlp",
        "optimizer": "momentum",
        "lr": 0.05,
        "steps": 20,
        "batch_size": 128,  # big enough that TF splits its matmuls: 2 threads give other losses
        "eval_every": 10,
        "model_options": {"depth": 2, "width": 512},
        "mitigation": "zclip",
    }
    timing = ("wall_seconds", "guard_seconds", "guard_share", "seconds_to_target")
    figures = f"""
        def figures(result, steps):
            from gradguard.bench.store import canonical_json
            drop = {timing!r}
            return canonical_json([{{k: v for k, v in result.items() if k not in drop}}, steps])
        """
    # The reference, from a fresh process, trains meanwhile (the figures do not depend on it).
    fresh = _start_python(
        figures
        + f"""
        from gradguard.bench.config import RunConfig
        from gradguard.bench.train import train_run
        print(figures(*train_run(RunConfig.from_dict({cfg!r}))))
        """
    )
    started = _run_python(
        figures
        + f"""
        import tensorflow as tf
        from gradguard.bench.config import RunConfig
        from gradguard.bench.runner import run_grid
        from gradguard.bench.store import ResultStore
        from gradguard.bench.train import train_run
        from gradguard.errors import ConfigError
        tf.config.threading.set_intra_op_parallelism_threads(2)
        float(tf.reduce_sum(tf.ones(3)))  # the runtime starts, with 2 intra-op threads
        cfg = RunConfig.from_dict({cfg!r})
        try:
            train_run(cfg)
        except ConfigError as e:
            assert "TensorFlow already runs in this process with 2" in str(e), e
        else:
            raise AssertionError("trained with TensorFlow's 2 threads")
        (row,) = run_grid([cfg], {str(tmp_path)!r}, workers=1, progress=False)
        with ResultStore({str(tmp_path / "results.db")!r}) as store:
            print(figures(row["result"], store.steps(row["key"])))
        """,
        timeout=300,
    )
    assert started.strip().splitlines()[-1] == fresh().strip().splitlines()[-1]


def test_the_keras_suite_is_the_seed_scenario_and_validates():
    from gradguard.bench.config import suite

    runs = suite("keras")
    assert {(c.task, c.model, c.optimizer) for c in runs} == {("digits", "keras_mlp", "momentum")}
    assert all(c.model_options["dropout"] == 0.1 for c in runs)
    assert "none" in {c.mitigation for c in runs} and "default" in {c.mitigation for c in runs}


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ({"mitigation": "rollback"}, "not available in Keras"),
        ({"mitigation": "skip_nonfinite+reset_moments"}, "not available in Keras"),
        ({"faults": "fp16_overflow:at=3"}, "cannot inject fp16_overflow"),
        ({"mitigation": "qk_layernorm"}, "unknown option(s) qk_layernorm"),
        ({"model_options": {"depth": "two"}}, "not an integer"),
    ],
)
def test_keras_bench_configs_are_checked_before_any_run(override, fragment):
    from gradguard.bench.config import RunConfig, resolve

    cfg = RunConfig(**{"task": "digits", "model": "keras_mlp", **override})
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        resolve(cfg)


# ----- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda: GuardedOptimizer("sgd"), "needs a keras.optimizers.Optimizer"),
        (
            lambda: GuardedOptimizer(torch.optim.SGD([nn.Parameter(torch.zeros(1))], 0.1)),
            "needs a keras",
        ),
        (lambda: GuardedOptimizer(keras.optimizers.SGD(0.1), "zclp"), "unknown policy 'zclp'"),
        (lambda: GuardedOptimizer(keras.optimizers.SGD(0.1), "rollback"), "not available in Keras"),
        (lambda: GuardedOptimizer(keras.optimizers.SGD(0.1), "zclip:alpha=2"), "alpha must be in"),
        (lambda: GuardedOptimizer(keras.optimizers.SGD(0.1), "zclip+zclip"), "appears twice"),
        (
            lambda: GuardedOptimizer(keras.optimizers.SGD(0.1), "skip_spike:on=loss"),
            "never sees the loss",
        ),
        (lambda: GuardedOptimizer(keras.optimizers.SGD(0.1), 3), "not int"),
        (lambda: GuardedOptimizer(keras.optimizers.SGD(0.1), clipnorm=1.0), "inner optimizer"),
        (
            lambda: GuardedOptimizer(
                keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
            ),
            "wrap the other way round",
        ),
        (lambda: GuardTelemetry("/tmp/x", optimizer=keras.optimizers.SGD(0.1)), "GuardedOptimizer"),
    ],
)
def test_bad_input_raises_a_clear_config_error(make, fragment):
    with pytest.raises(ConfigError, match=fragment):
        make()


def test_telemetry_needs_a_guarded_optimizer(tmp_path):
    x, y = _digits_like(bad_batch=None)
    model = _mlp()
    model.compile(
        optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    with pytest.raises(ConfigError, match="compile the model with optimizer=GuardedOptimizer"):
        model.fit(x, y, verbose=0, callbacks=[GuardTelemetry(tmp_path / "run")])


def test_config_round_trip():
    opt = GuardedOptimizer(keras.optimizers.Adam(3e-4), "zclip+clip_norm:2", check_finite=False)
    again = GuardedOptimizer.from_config(opt.get_config())
    assert again.spec == opt.spec and not again.check_finite
    assert isinstance(again.inner_optimizer, keras.optimizers.Adam)


# ----- imports and the other backend -------------------------------------------------------------
def test_gradguard_imports_no_keras_and_a_missing_keras_says_what_to_install():
    out = _run_python(
        """
        import sys
        import gradguard, gradguard.bench.config, gradguard.bench.train
        print("keras" in sys.modules, "tensorflow" in sys.modules)
        sys.modules["keras"] = None  # as if not installed
        try:
            import gradguard.keras
        except ImportError as e:
            print(e)
        """
    )
    first, message = out.splitlines()[0], "\n".join(out.splitlines()[1:])
    assert first == "False False"
    assert "pip install gradguard[keras]" in message


@pytest.mark.slow  # a process starts Keras on torch
def test_torch_backend_fit_and_stateless_apply():
    out = _run_python(
        """
        import json
        import numpy as np, keras
        from keras import ops
        from gradguard.keras import GuardedOptimizer
        assert keras.backend.backend() == "torch"
        rng = np.random.default_rng(0)
        x = rng.standard_normal((64, 8)).astype("float32"); y = (x[:, 0] > 0).astype("int32")
        x[24:32] = np.nan
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh",
                                  name="fc1"), keras.layers.Dense(2, name="head")])
        opt = GuardedOptimizer(keras.optimizers.SGD(0.1, momentum=0.9), "default")
        model.compile(optimizer=opt,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        finite = all(bool(np.isfinite(w).all()) for w in model.get_weights())
        # The functional step (what JAX's trainer calls): a NaN step returns the old values.
        tv = [ops.copy(v.value) for v in model.trainable_variables]
        ov = [ops.copy(v.value) for v in opt.variables]
        g = [ops.ones_like(t) * float("nan") for t in tv]
        new_tv, new_ov = opt.stateless_apply(ov, g, tv)
        same = all(bool(np.array_equal(ops.convert_to_numpy(a), ops.convert_to_numpy(b)))
                   for a, b in zip(new_tv, tv))
        names = [v.path for v in opt.variables]
        after = dict(zip(names, (ops.convert_to_numpy(v) for v in new_ov)))
        print(json.dumps({"counters": opt.counters, "iterations": int(opt.iterations),
                          "finite": finite, "same": same,
                          "stateless_skipped": int(after[opt.guard_skipped.path])}))
        """,
        env={"KERAS_BACKEND": "torch"},
    )
    res = json.loads(out.strip().splitlines()[-1])
    assert res["counters"]["skipped"] == 1 and res["counters"]["steps"] == 8
    assert res["iterations"] == 7 and res["finite"]
    assert res["same"] and res["stateless_skipped"] == 2
