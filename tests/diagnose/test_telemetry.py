"""Telemetry written by ``Guard(log_dir=...)``: the numbers match references computed here, the
sampling keeps what it promises (exact context around events), the file is usable mid-run, the
TensorBoard files hold the same series, and bad settings fail clearly."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import gradguard
from gradguard.diagnose import load_run
from gradguard.diagnose.telemetry import Telemetry, _keep_auto, spectral_radius

from tests.helpers import TinyNet


def sampled(step: int, every: int) -> bool:
    """The steps the telemetry samples the update ratio (and dead units, attention) on: every
    ``every``-th, and each of the first ``every``."""
    return step < every or step % every == 0


def batch(step):
    gen = torch.Generator().manual_seed(step)
    return torch.randn(32, 6, generator=gen), torch.randint(0, 3, (32,), generator=gen)


def backward(model, step, x_scale=1.0):
    model.zero_grad(set_to_none=True)
    x, y = batch(step)
    loss = nn.functional.cross_entropy(model(x * x_scale), y)
    loss.backward()
    return loss


def layer_norm_ref(model):
    return {
        name: math.sqrt(sum(float(p.grad.double().square().sum()) for p in m.parameters()))
        for name, m in (("fc1", model.fc1), ("fc2", model.fc2), ("head", model.head))
    }


def test_recorded_norms_and_update_ratios_match_references(tmp_path):
    torch.manual_seed(0)
    model = TinyNet(width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    tel = Telemetry(tmp_path, update_every=3, tensorboard=False)
    guard = gradguard.Guard(model, opt, "clip_norm:0.3", telemetry=tel)
    expected = {}
    for step in range(12):
        loss = backward(model, step)
        ref = layer_norm_ref(model)
        total = math.sqrt(sum(v * v for v in ref.values()))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        guard.step(loss=loss)
        layers = {}
        for name in ("fc1", "fc2", "head"):
            d = sum(
                float((p.detach() - before[f"{name}.{k}"]).double().square().sum())
                for k, p in getattr(model, name).named_parameters()
            )
            w = sum(
                float(before[f"{name}.{k}"].double().square().sum()) for k in ("weight", "bias")
            )
            layers[name] = (ref[name], math.sqrt(d) / math.sqrt(w))
        expected[step] = (float(loss.detach()), total, layers)
    guard.close()
    run = load_run(tmp_path)
    assert run.layers == ["fc1", "fc2", "head"] and run.meta["forward_order"] == [0, 1, 2]
    assert [s["step"] for s in run.steps] == list(range(12))
    for s in run.steps:
        loss, total, layers = expected[s["step"]]
        assert s["loss"] == pytest.approx(loss, rel=1e-6)
        assert s["grad_norm"] == pytest.approx(total, rel=1e-5)
        assert s["grad_norm_after"] == pytest.approx(min(total, 0.3), rel=1e-4)
        assert s["clipped"] == (total > 0.3) and s["actions"] == (
            ["clip_norm"] if total > 0.3 else []
        )
        assert s["lr"] == 0.1
        for i, name in enumerate(run.layers):
            assert s["layer_norms"][i] == pytest.approx(layers[name][0], rel=1e-5)
            if s["clipped"]:
                factor = s["grad_norm_after"] / s["grad_norm"]
                assert s["layer_norms_after"][i] == pytest.approx(
                    layers[name][0] * factor, rel=1e-4
                )
        if sampled(s["step"], 3):
            ratios = [layers[n][1] for n in run.layers]
            assert s["update_ratio"] == pytest.approx(ratios, rel=1e-4)
        else:
            assert s["update_ratio"] is None
        assert s["input"]["std"] == pytest.approx(float(batch(s["step"])[0].std()), rel=1e-5)
    assert run.end["counters"]["steps"] == 12


def test_sampling_keeps_exact_context_around_an_event(tmp_path):
    torch.manual_seed(0)
    model = TinyNet(width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tel = Telemetry(tmp_path, every=10, context=4, tensorboard=False)
    with gradguard.Guard(model, opt, "default", telemetry=tel) as guard:
        for step in range(100):
            loss = backward(model, step, x_scale=300.0 if step == 63 else 1.0)
            guard.step(loss=loss)
    run = load_run(tmp_path)
    kept = [s["step"] for s in run.steps]
    around = list(range(59, 68))  # 4 before, the event, 4 after
    assert set(range(0, 100, 10)) <= set(kept)
    assert set(around) <= set(kept)
    assert set(kept) == set(range(0, 100, 10)) | set(around) | set(range(96, 100))
    spikes = [e for e in run.events if e["kind"] == "grad_spike"]
    assert [e["step"] for e in spikes] == [63] and spikes[0]["action"] == "clipped"
    # The outlier batch shows in the input statistics of that step.
    assert run.step_at(63)["input"]["absmax"] > 100 * run.step_at(62)["input"]["absmax"]


def test_auto_sampling_grows_with_log_steps():
    kept = [s for s in range(200_000) if _keep_auto(s)]
    assert kept[:1000] == list(range(1000))
    assert len(kept) == 1000 + 900 + 900 + 100  # then by 10 to 9999, by 100 to 99 999, by 1000


def test_events_are_on_disk_before_close(tmp_path):
    torch.manual_seed(0)
    model = TinyNet(width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = gradguard.Guard(model, opt, "default", log_dir=tmp_path)
    for step in range(40):
        backward(model, step)
        if step == 30:
            model.fc2.weight.grad[0, 0] = float("nan")
        guard.step()
    lines = [json.loads(x) for x in (tmp_path / "telemetry.jsonl").read_text().splitlines()]
    events = [x for x in lines if x["type"] == "event"]
    assert [(e["kind"], e["step"], e["action"]) for e in events] == [
        ("nonfinite_grad", 30, "skipped")
    ]
    assert events[0]["layers"] == ["fc2"]  # set after backward: it could not spread
    loc = [x for x in lines if x["type"] == "localization"]
    assert loc and loc[0]["origin"] == "fc2" and loc[0]["method"] == "static"
    guard.close()
    guard.close()  # idempotent
    assert load_run(tmp_path).end is not None


def test_replay_localizes_a_backward_nan_to_its_module(tmp_path):
    class NanGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * float("nan")

    torch.manual_seed(0)
    model = TinyNet(width=16)
    poison = {"on": False}
    model.fc2.register_forward_hook(lambda m, i, o: NanGrad.apply(o) if poison["on"] else o)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradguard.Guard(model, opt, "default", log_dir=tmp_path) as guard:
        for step in range(25):
            poison["on"] = step == 20
            x, y = batch(step)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            r = guard.step(
                loss=loss, replay=lambda x=x, y=y: nn.functional.cross_entropy(model(x), y)
            )
            if step == 20:
                assert r.skipped and r.localization is not None
                assert r.localization["origin"] == "fc2" and r.localization["phase"] == "backward"
    run = load_run(tmp_path)
    assert [lc["method"] for lc in run.localizations] == ["replay"]


def _clipped_tiny_run(log_dir, steps: int) -> None:
    torch.manual_seed(0)
    model = TinyNet(width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradguard.Guard(model, opt, "clip_norm:0.5", log_dir=log_dir) as guard:
        for step in range(steps):
            guard.step(loss=backward(model, step))


def test_tensorboard_files_hold_the_kept_steps(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _clipped_tiny_run(tmp_path, 15)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {
        "grad_norm/pre_clip",
        "grad_norm/post_clip",
        "loss",
        "lr",
        "layer_grad_norm/fc1",
        "logits/absmax",
        "logits/logz",
        "logits/mean",
        "dead_units/fc1",
    } <= set(tags)
    pre = acc.Scalars("grad_norm/pre_clip")
    run = load_run(tmp_path)
    assert [e.step for e in pre] == [s["step"] for s in run.steps]
    assert [e.value for e in pre] == pytest.approx([s["grad_norm"] for s in run.steps], rel=1e-6)
    logz = acc.Scalars("logits/logz")
    assert [e.step for e in logz] == [0, 10]  # with the per-layer series
    assert [e.value for e in logz] == pytest.approx(
        [run.step_at(e.step)["logits"]["logz"] for e in logz], rel=1e-6
    )


def test_a_kept_steps_scalars_travel_in_one_tensorboard_event(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    _clipped_tiny_run(tmp_path, 12)
    (path,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    scalar_events: dict[int, list[set[str]]] = {}
    for event in EventFileLoader(str(path)).Load():
        # (the loader reads scalars as TensorBoard does: as 0-d tensors)
        tags = {v.tag for v in event.summary.value if not v.tensor.tensor_shape.dim}
        tags.discard("events")
        if tags:
            scalar_events.setdefault(event.step, []).append(tags)
    assert sorted(scalar_events) == list(range(12))
    # One event a step, holding all of its scalars (a per-layer series on the 10th steps too).
    assert all(len(events) == 1 for events in scalar_events.values())
    assert {"grad_norm/pre_clip", "loss", "lr"} <= scalar_events[3][0]
    assert "layer_grad_norm/fc1" in scalar_events[10][0] - scalar_events[3][0]


class _Seq(nn.Module):
    """An RNN of hidden size 8 and a linear head on its last step."""

    def __init__(self, rnn: nn.RNNBase):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def test_spectral_radius_of_recurrent_weights_is_recorded(tmp_path):
    torch.manual_seed(0)
    rnn = nn.RNN(3, 8, batch_first=True)
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(torch.eye(8) * 1.5)
    assert spectral_radius(rnn) == pytest.approx(1.5)
    lstm = nn.LSTM(3, 8)
    with torch.no_grad():
        lstm.weight_hh_l0.zero_()
        lstm.weight_hh_l0[16:24].copy_(torch.eye(8) * 2.0)  # the cell gate's block
    assert spectral_radius(lstm) == pytest.approx(2.0)

    model = _Seq(rnn)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    tel = Telemetry(tmp_path, radius_every=5, tensorboard=False)
    with gradguard.Guard(model, opt, "clip_norm:1", telemetry=tel) as guard:
        for _ in range(6):
            opt.zero_grad()
            model(torch.randn(4, 5, 3)).pow(2).mean().backward()
            guard.step()
    run = load_run(tmp_path)
    assert run.meta["recurrent"] == ["rnn"]
    assert run.step_at(0)["radius"]["rnn"] == pytest.approx(1.5, rel=1e-3)
    assert run.step_at(1)["radius"] is None and run.step_at(5)["radius"] is not None


@pytest.mark.parametrize("radius_every", [5, 3])  # on the sampled steps, and off them
def test_the_recurrent_radius_is_the_one_the_steps_gradient_went_through(tmp_path, radius_every):
    # Measured before the update: a first update too large for the weights sets any radius
    # (a GRU at SGD LR 20: 0.6 at init, 2.96 after step 0), which is the LR's doing.
    torch.manual_seed(0)
    rnn = nn.RNN(3, 8, batch_first=True)
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(torch.eye(8) * 0.5)

    model = _Seq(rnn)
    opt = torch.optim.SGD(model.parameters(), lr=50.0)
    tel = Telemetry(tmp_path, radius_every=radius_every, update_every=4, tensorboard=False)
    before = {}
    with gradguard.Guard(model, opt, "none", check_finite=False, telemetry=tel) as guard:
        for step in range(radius_every + 1):
            before[step] = spectral_radius(rnn)
            opt.zero_grad()
            model(torch.randn(4, 5, 3)).pow(2).mean().backward()
            guard.step()
    run = load_run(tmp_path)
    assert run.step_at(0)["radius"]["rnn"] == pytest.approx(0.5, rel=1e-4)
    assert spectral_radius(rnn) != pytest.approx(0.5, rel=1e-2)  # the updates moved it
    later = run.step_at(radius_every)["radius"]["rnn"]
    assert later == pytest.approx(before[radius_every], rel=1e-4)


def test_bad_settings_fail_clearly(tmp_path):
    model = TinyNet(width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(gradguard.ConfigError, match="not a folder"):
        gradguard.Guard(model, opt, log_dir=f)
    with pytest.raises(gradguard.ConfigError, match="not both"):
        gradguard.Guard(model, opt, log_dir=tmp_path, telemetry=Telemetry(tmp_path / "b"))
    with pytest.raises(ValueError, match="every"):
        Telemetry(tmp_path, every=0)
    with pytest.raises(ValueError, match="dead_window must be a positive int"):
        Telemetry(tmp_path, dead_window=0)
    with pytest.raises(gradguard.ConfigError, match="no telemetry"):
        load_run(tmp_path / "nothing")


@pytest.mark.parametrize("layer", ["fc1", "fc2", "head"])
def test_a_spike_injected_into_a_layer_is_ranked_first(tmp_path, layer):
    torch.manual_seed(0)
    model = TinyNet(width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradguard.Guard(model, opt, "clip_norm:10", log_dir=tmp_path) as guard:
        for step in range(60):
            backward(model, step)
            if step == 50:
                for p in getattr(model, layer).parameters():
                    p.grad.mul_(1e3)
            guard.step()
    run = load_run(tmp_path)
    spikes = [e for e in run.events if e["kind"] == "grad_spike"]
    assert [e["step"] for e in spikes] == [50]
    assert spikes[0]["layers"][0] == layer
    top = spikes[0]["detail"]["ranked"][0]
    assert top["name"] == layer and top["share"] > 0.99


def test_bench_runs_record_telemetry_that_the_report_reads(tmp_path):
    from gradguard.bench.config import RunConfig
    from gradguard.bench.runner import run_grid, telemetry_dir
    from gradguard.bench.store import run_key
    from gradguard.cli import main

    cfg = RunConfig(
        task="digits",
        model="mlp",
        optimizer="momentum",
        lr=0.05,
        mitigation="default",
        steps=30,
        eval_every=30,
        model_options={"depth": 3, "width": 16},
    )
    key = run_key(cfg.as_dict())
    stale = telemetry_dir(tmp_path, key, cfg.as_dict())
    stale.mkdir(parents=True)
    (stale / "telemetry.jsonl").write_text('{"type":"step","step":999}\n')  # a crashed attempt
    (runs,) = [run_grid([cfg], tmp_path, workers=1, progress=False, telemetry=True)]
    assert [r["key"] for r in runs] == [key]
    log = load_run(stale)
    assert [s["step"] for s in log.steps] == list(range(30))  # the crashed attempt is gone
    assert log.end["counters"]["steps"] == 30
    assert main(["report", str(stale)]) == 0 and (stale / "report.html").exists()
    with pytest.raises(gradguard.ConfigError, match="local executor"):
        run_grid([cfg], tmp_path / "r", executor="ray", telemetry=True)


@pytest.mark.slow  # a fresh process (the fast suite's TensorBoard files: the test above)
def test_tensorboard_files_without_importing_tensorflow(tmp_path):
    """Where TensorFlow is installed, torch's TensorBoard writer would import all of it (seconds
    and a page of logs in every bench worker); the Guard's writer uses TensorBoard's stub."""
    code = f"""
import sys, torch, gradguard
m = torch.nn.Linear(3, 2)
opt = torch.optim.SGD(m.parameters(), lr=0.1)
with gradguard.Guard(m, opt, log_dir={str(tmp_path)!r}) as g:
    for _ in range(3):
        m(torch.randn(4, 3)).sum().backward()
        g.step()
print("tensorflow" in sys.modules)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "False"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert any(len(acc.Scalars(tag)) == 3 for tag in acc.Tags()["scalars"])


# ----- output logits, attention logits, dead units ----------------------------------------------------
class Wrapped(nn.Module):
    """TinyNet whose output comes as a tensor, a tuple, an object with ``.logits`` (a Hugging
    Face ModelOutput's attribute) or a dict; ``regression``: one output per row."""

    def __init__(self, kind, regression=False):
        super().__init__()
        self.net = TinyNet(width=16, d_out=1 if regression else 3)
        self.kind = kind

    def forward(self, x):
        y = self.net(x)
        if self.kind == "tuple":
            return (torch.arange(3), y, y * 2)  # the first floating tensor is the output
        if self.kind == "attr":
            return SimpleNamespace(loss=None, logits=y)
        if self.kind == "dict":
            return {"loss": y.sum(), "logits": y}
        return y


def logits_of(out):
    if isinstance(out, tuple):
        return out[1]
    return out["logits"] if isinstance(out, dict) else getattr(out, "logits", out)


@pytest.mark.parametrize("kind", ["tensor", "tuple", "attr", "dict", "regression"])
def test_logits_are_the_training_forwards_absmax_and_logz(tmp_path, kind):
    torch.manual_seed(0)
    model = Wrapped("tensor" if kind == "regression" else kind, regression=kind == "regression")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = {}
    with gradguard.Guard(
        model, opt, "clip_norm:1", telemetry=Telemetry(tmp_path, tensorboard=False)
    ) as guard:
        for step in range(5):
            opt.zero_grad()
            logits = logits_of(model(batch(step)[0] * (step + 1)))
            loss = logits.square().mean() if kind == "regression" else logits.logsumexp(-1).mean()
            loss.backward()
            with torch.no_grad():  # an evaluation between the forward and the step: not counted
                model(torch.randn(4, 6) * 100)
            x = logits.detach()
            logz = None if kind == "regression" else float(torch.logsumexp(x, -1).mean())
            mean = None if kind == "regression" else float(x.mean())
            expected[step] = (float(x.abs().max()), logz, mean)
            guard.step()
            with torch.no_grad():
                model(torch.randn(4, 6) * 100)
    run = load_run(tmp_path)
    assert [s["step"] for s in run.steps] == list(range(5))
    for s in run.steps:
        absmax, logz, mean = expected[s["step"]]
        assert s["logits"]["absmax"] == pytest.approx(absmax, rel=1e-6)
        if logz is None:
            assert s["logits"]["logz"] is None and s["logits"]["mean"] is None
        else:
            assert s["logits"]["logz"] == pytest.approx(logz, rel=1e-6)
            assert s["logits"]["mean"] == pytest.approx(mean, rel=1e-5, abs=1e-6)


def mha_max_by_hand(attn, h):
    """nn.MultiheadAttention (batch_first, self-attention, no mask): the max of q.k / sqrt(d)."""
    e, heads = attn.embed_dim, attn.num_heads
    w, b = attn.in_proj_weight.detach().double(), attn.in_proj_bias.detach().double()
    q = (h.double() @ w[:e].T + b[:e]).unflatten(-1, (heads, e // heads)).transpose(1, 2)
    k = (h.double() @ w[e : 2 * e].T + b[e : 2 * e]).unflatten(-1, (heads, e // heads))
    return float((q @ k.transpose(1, 2).transpose(-1, -2)).max() / math.sqrt(e // heads))


def gpt_max_by_hand(attn, x):
    """The bench GPT's causal attention (fused q|k|v Linear, SDPA): max of q.k / sqrt(d)."""
    b, t, d = x.shape
    z = x.double() @ attn.qkv.weight.detach().double().T + attn.qkv.bias.detach().double()
    q, k = (u.view(b, t, attn.n_heads, attn.head_dim).transpose(1, 2) for u in z.split(d, -1)[:2])
    s = (q @ k.transpose(-1, -2)) / math.sqrt(attn.head_dim)
    allowed = torch.ones(t, t, dtype=torch.bool).tril()
    return float(s.masked_fill(~allowed, -math.inf).max())


def attention_model(name):
    from gradguard.bench.models import build_model

    from tests.helpers import AttnNet

    torch.manual_seed(0)
    if name == "mha":
        model = AttnNet(width=8)
        sites = {"attn": (model.attn, mha_max_by_hand)}

        def data(step):
            x, y = batch(step)
            return x * 3, lambda out: nn.functional.cross_entropy(out, y)

    else:
        model = build_model("gpt", (8,), 11, d_model=16, n_layers=2, n_heads=2)
        sites = {f"blocks.{i}.attn": (b.attn, gpt_max_by_hand) for i, b in enumerate(model.blocks)}

        def data(step):
            idx = torch.randint(0, 11, (4, 8), generator=torch.Generator().manual_seed(step))
            return idx, lambda out: nn.functional.cross_entropy(out.flatten(0, 1), idx.flatten())

    return model, sites, data


@pytest.mark.parametrize("name", ["mha", "gpt"])
def test_attention_logits_match_q_dot_k_by_hand_on_sampled_steps(tmp_path, name):
    model, sites, data = attention_model(name)
    seen = {}
    for site, (module, _) in sites.items():
        module.register_forward_pre_hook(
            lambda m, args, site=site: seen.__setitem__(site, args[0].detach().clone())
        )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tel = Telemetry(tmp_path, update_every=3, tensorboard=False)
    expected = {}
    with gradguard.Guard(model, opt, "clip_norm:1", telemetry=tel) as guard:
        for step in range(8):
            opt.zero_grad()
            x, loss_fn = data(step)
            loss_fn(model(x)).backward()
            # The gate: only the forwards feeding a sampled step are measured.
            assert all((s.max_logit is not None) == sampled(step, 3) for s in tel._meter.sites)
            expected[step] = {n: by_hand(m, seen[n]) for n, (m, by_hand) in sites.items()}
            guard.step()
    run = load_run(tmp_path)
    assert run.meta["attention"] == list(sites)
    for s in run.steps:
        if sampled(s["step"], 3):
            assert s["attn_logit"] == pytest.approx(expected[s["step"]], rel=1e-5)
        else:
            assert s["attn_logit"] is None


def test_attention_logits_beside_qk_clip(tmp_path):
    """qk_clip measures every forward, the telemetry only the sampled ones: each sees its own."""
    from tests.helpers import AttnNet

    torch.manual_seed(0)
    model = AttnNet(width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tel = Telemetry(tmp_path, update_every=2, tensorboard=False)
    with gradguard.Guard(model, opt, "qk_clip:tau=0.05", telemetry=tel) as guard:
        for step in range(6):
            opt.zero_grad()
            x, y = batch(step)
            nn.functional.cross_entropy(model(x * 3), y).backward()
            guard.step()
    run = load_run(tmp_path)
    assert run.step_at(0)["metrics"]["qk_clip.clipped"] == 2  # both heads
    for s in run.steps:
        measured = s["metrics"]["qk_clip.max_logit"]  # on every step: the gate is not qk_clip's
        if sampled(s["step"], 2):
            assert s["attn_logit"] == {"attn": pytest.approx(measured, rel=1e-6)}
        else:
            assert s["attn_logit"] is None


def test_attention_the_telemetry_cannot_measure_leaves_the_field_null(tmp_path, monkeypatch):
    class WrongHeads(nn.Module):
        """Found with 2 heads (its ``n_heads``), computes 4: qk_clip would raise; telemetry not."""

        n_heads = 2

        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 24)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            q, k, v = (u.unflatten(-1, (4, 2)).transpose(1, 2) for u in self.qkv(x).split(8, -1))
            y = nn.functional.scaled_dot_product_attention(q, k, v)
            return self.head(y.transpose(1, 2).flatten(-2)).mean(1)

    for case in ("wrong_heads", "find_raises"):
        if case == "find_raises":
            monkeypatch.setattr(
                "gradguard.attention.find_attention", lambda m: (_ for _ in ()).throw(RuntimeError)
            )
        model = WrongHeads()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with gradguard.Guard(model, opt, log_dir=tmp_path / case) as guard:
            for _ in range(2):
                opt.zero_grad()
                model(torch.randn(3, 5, 8)).sum().backward()
                guard.step()
        run = load_run(tmp_path / case)
        assert run.meta["attention"] == ([] if case == "find_raises" else ["(root)"])
        assert [s["attn_logit"] for s in run.steps] == [None, None]


def test_logit_meter_gate():
    from gradguard.attention import LogitMeter, find_attention

    from tests.helpers import AttnNet

    model = AttnNet(width=8)
    gate = {"on": False}
    meter = LogitMeter(find_attention(model), when=lambda: gate["on"])
    (site,) = meter.sites
    model(torch.randn(4, 6))
    assert site.max_logit is None and not site.ran
    gate["on"] = True
    with torch.no_grad():
        model(torch.randn(4, 6))
    assert site.max_logit is None  # under no_grad: not a training forward
    model(torch.randn(4, 6))
    assert site.ran and site.max_logit is not None and site.max_logit.shape == (2,)
    meter.close()


class DeadNet(nn.Module):
    """An embedding, a Linear+ReLU whose first ``dead`` units never fire, a LayerNorm, a head."""

    def __init__(self, dead):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)
        with torch.no_grad():
            self.fc.bias[:dead] = -1e3
            self.fc.bias[dead:] = 1.0  # the others fire on every input

    def forward(self, idx):
        return self.head(self.norm(torch.relu(self.fc(self.emb(idx).mean(1)))))


def zero_rows_by_hand(module) -> torch.Tensor:
    """Per unit row of ``module``'s weights (2-D or more): is its gradient all zero?"""
    rows = [p.grad for p in module.parameters() if p.dim() >= 2]
    return torch.cat([(g.flatten(1) == 0).all(1) for g in rows])


def windows(sampled_steps: list[int], length: int) -> dict[int, list[int]]:
    """Each sampled step's window: the last ``length`` steps since the previous sampled one,
    itself included."""
    out, prev = {}, -1
    for s in sampled_steps:
        out[s], prev = list(range(max(prev + 1, s + 1 - length), s + 1)), s
    return out


def dead_share(zero: dict[int, torch.Tensor], steps: list[int]) -> float:
    """The share of rows whose gradient was zero on every one of ``steps``."""
    both = torch.stack([zero[s] for s in steps]).all(0)
    return int(both.sum()) / both.numel()


@pytest.mark.parametrize(("every", "window"), [(2, 5), (4, 2)])
def test_dead_units_are_the_share_of_all_zero_gradient_rows(tmp_path, every, window):
    torch.manual_seed(0)
    model = DeadNet(dead=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tel = Telemetry(tmp_path, update_every=every, dead_window=window, tensorboard=False)
    zero = {}
    steps = 11
    # clip_norm scales the gradients the optimizer sees (and keeps their zeros).
    with gradguard.Guard(model, opt, "clip_norm:0.01", telemetry=tel) as guard:
        for step in range(steps):
            opt.zero_grad()
            idx = torch.randint(0, 10, (32, 4), generator=torch.Generator().manual_seed(step))
            y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(step))
            nn.functional.cross_entropy(model(idx), y).backward()
            zero[step] = (zero_rows_by_hand(model.fc), zero_rows_by_hand(model.head))
            guard.step()
    run = load_run(tmp_path)
    assert run.layers == ["emb", "fc", "norm", "head"]
    assert run.meta["sampling"]["dead_window"] == min(every, window)
    assert dead_share({0: zero[0][0]}, [0]) == 5 / 16
    win = windows([s for s in range(steps) if sampled(s, every)], window)
    assert win[4] == ([3, 4] if every == 2 else [4])
    if every == 4:
        assert win[8] == [7, 8]
    for s in run.steps:
        assert s["clipped"]
        if not sampled(s["step"], every):
            assert s["dead_units"] is None
        else:
            steps = win[s["step"]]
            fc = dead_share({k: zero[k][0] for k in steps}, steps)
            head = dead_share({k: zero[k][1] for k in steps}, steps)
            assert s["dead_units"] == [None, fc, None, head]


class SometimesNet(nn.Module):
    """One input through a Linear+ReLU of 4 units: unit 0 fires only on positive inputs, unit 1
    never, units 2 and 3 always; then a head."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(1, 4)
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0], [0.0], [0.0], [0.0]]))
            self.fc.bias.copy_(torch.tensor([0.0, -1e3, 10.0, 10.0]))

    def forward(self, x):
        return self.head(torch.relu(self.fc(x)))


@pytest.mark.parametrize("window", [2, 1])
def test_a_unit_silent_on_one_batch_but_active_on_another_in_the_window_is_not_dead(
    tmp_path, window
):
    """Batches alternate between inputs that leave unit 0 silent and inputs that fire it. Read
    batch by batch (a window of 1), half the layer looks dead on every even step; over a window
    of two steps only unit 1 is."""
    model = SometimesNet()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    tel = Telemetry(tmp_path, update_every=2, dead_window=window, tensorboard=False)
    per_batch = {}
    with gradguard.Guard(model, opt, "none", telemetry=tel) as guard:
        for step in range(9):
            opt.zero_grad()
            sign = 1.0 if step % 2 else -1.0
            x = sign * (1.0 + torch.rand(16, 1, generator=torch.Generator().manual_seed(step)))
            y = torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(step))
            nn.functional.cross_entropy(model(x), y).backward()
            per_batch[step] = float(zero_rows_by_hand(model.fc).float().mean())
            guard.step()
    dead = {s["step"]: s["dead_units"] for s in load_run(tmp_path).steps if s["dead_units"]}
    assert sorted(dead) == [0, 1, 2, 4, 6, 8]
    # the first steps, each read alone, and step 2 (its window is itself): batch by batch
    assert [dead[s][0] for s in (0, 1, 2)] == [0.5, 0.25, 0.5]
    assert per_batch[4] == per_batch[6] == per_batch[8] == 0.5
    for s in (4, 6, 8):  # windows of an odd (firing) and an even (silent) batch, or the even one
        assert dead[s][0] == (0.25 if window == 2 else 0.5)


def test_new_fields_of_the_wrong_kind_are_read_as_not_recorded(tmp_path):
    torch.manual_seed(0)
    model = TinyNet(width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tel = Telemetry(tmp_path, update_every=10, tensorboard=False)
    with gradguard.Guard(model, opt, telemetry=tel) as guard:
        for step in range(12):
            guard.step(loss=backward(model, step))
    path = tmp_path / "telemetry.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    meta, steps = recs[0], {r["step"]: r for r in recs if r["type"] == "step"}
    assert meta["attention"] == [] and steps[0]["attn_logit"] is None
    assert steps[0]["dead_units"] is not None and steps[11]["dead_units"] is None
    meta["attention"] = "attn"
    steps[1]["logits"], steps[2]["logits"] = "big", {"absmax": "x", "logz": 1.5}
    steps[1]["attn_logit"], steps[2]["attn_logit"] = ["a", "b"], {"attn": "x"}
    steps[1]["dead_units"], steps[2]["dead_units"] = "x", ["a", 0.5, 2.0]
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    run = load_run(tmp_path)
    s1, s2 = run.step_at(1), run.step_at(2)
    assert run.meta["attention"] == []
    assert s1["logits"] is None and s1["attn_logit"] is None and s1["dead_units"] is None
    assert s2["logits"] == {"absmax": None, "logz": 1.5} and s2["attn_logit"] == {"attn": None}
    assert s2["dead_units"] == [None, 0.5, None]
    assert run.repaired == {
        "meta.attention": 1,
        "step.logits": 2,
        "step.attn_logit": 2,
        "step.dead_units": 2,
    }
    assert run.notes and "step.logits x2" in run.notes[-1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logz_of_large_logits_is_measured_a_block_of_rows_at_a_time(monkeypatch, dtype):
    from gradguard.diagnose.telemetry import collect

    x = (torch.randn(5, 7, 11) * 30).to(dtype)
    whole = collect.output_stats(x)
    monkeypatch.setattr(collect, "_LOGZ_BLOCK", 30)  # 2 rows of 11 a block: 18 blocks
    blocked = collect.output_stats(x)
    ref = [
        float(x.float().abs().max()),
        float(torch.logsumexp(x.float(), -1).mean()),
        float(x.float().mean()),
    ]
    assert whole.dtype == blocked.dtype == torch.float32
    assert whole.tolist() == pytest.approx(ref, rel=1e-6)
    assert blocked.tolist() == pytest.approx(ref, rel=1e-6)
