"""Telemetry written by ``Guard(log_dir=...)``: the numbers match references computed here, the
sampling keeps what it promises (exact context around events), the file is usable mid-run, the
TensorBoard files hold the same series, and bad settings fail clearly."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

import gradguard
from gradguard.diagnose import load_run
from gradguard.diagnose.telemetry import Telemetry, _keep_auto, spectral_radius

from tests.helpers import TinyNet


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
        if s["step"] % 3 == 0:
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


def test_tensorboard_files_hold_the_kept_steps(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    model = TinyNet(width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradguard.Guard(model, opt, "clip_norm:0.5", log_dir=tmp_path) as guard:
        for step in range(15):
            guard.step(loss=backward(model, step))
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {
        "grad_norm/pre_clip",
        "grad_norm/post_clip",
        "loss",
        "lr",
        "layer_grad_norm/fc1",
    } <= set(tags)
    pre = acc.Scalars("grad_norm/pre_clip")
    run = load_run(tmp_path)
    assert [e.step for e in pre] == [s["step"] for s in run.steps]
    assert [e.value for e in pre] == pytest.approx([s["grad_norm"] for s in run.steps], rel=1e-6)


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

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = rnn
            self.head = nn.Linear(8, 1)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    model = Seq()
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
