"""The Guard on a CUDA device: the same numbers as torch, the sync budget counted by CUDA itself
(``torch.cuda.set_sync_debug_mode``), fp16 autocast with a real ``GradScaler`` overflow, fused
optimizers, bf16, rollback, and parameters split across CPU and GPU. Skipped without a GPU (CI has
none); run with ``python -m pytest tests/test_cuda.py`` on a machine that has one."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import gradguard

from tests.helpers import assert_same, snapshot

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEV = "cuda"


def net(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    ).to(DEV, dtype)


def batch(step: int, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(64, 32, generator=gen).to(DEV, dtype)
    y = torch.randint(0, 10, (64,), generator=gen).to(DEV)
    return x, y


def backward(model: nn.Module, step: int, scale: float = 1.0) -> torch.Tensor:
    for p in model.parameters():
        p.grad = None
    x, y = batch(step, next(model.parameters()).dtype)
    loss = nn.functional.cross_entropy(model(x).float(), y)
    (loss * scale).backward()
    return loss


def test_clip_norm_gives_torchs_clip_grad_norm_bit_for_bit():
    ref, ours = net(), net()
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, foreach=True)
    opt = torch.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9, foreach=True)
    guard = gradguard.Guard(ours, opt, "clip_norm:0.5")
    for step in range(8):
        backward(ref, step, scale=10.0)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5, foreach=True)
        opt_ref.step()
        backward(ours, step, scale=10.0)
        r = guard.step()
        assert r.clipped
    for a, b in zip(ref.parameters(), ours.parameters(), strict=True):
        assert torch.equal(a, b)


def _steady_state_syncs(
    spec: str, opt_kw: dict | None = None, nan_at: int | None = None, **guard_kw
) -> tuple[list[int], set[str]]:
    """Synchronizing CUDA calls inside each ``guard.step()`` after warmup, as CUDA reports them
    (``set_sync_debug_mode("warn")``), and the lines of Python that made them. ``opt_kw``: the
    SGD's options (default momentum 0.9, foreach); ``nan_at``: a step whose gradient gets a NaN."""
    model = net()
    opt_kw = opt_kw or {"momentum": 0.9, "foreach": True}
    opt = torch.optim.SGD(model.parameters(), lr=0.01, **opt_kw)
    guard = gradguard.Guard(model, opt, spec, **guard_kw)
    # Toggle the debug mode once first: its first use warns that it is a prototype feature.
    torch.cuda.set_sync_debug_mode("warn")
    torch.cuda.set_sync_debug_mode("default")
    counts, sites = [], set()
    for step in range(50):
        loss = backward(model, step)
        if step == 45:
            model[0].weight.grad.mul_(1e3)  # a spike, so the adaptive clippers engage
        if step == nan_at:
            model[0].weight.grad[0, 0] = float("nan")
        torch.cuda.synchronize()
        if step < 40:
            guard.step(loss=loss)
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                guard.step(loss=loss)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        where = [
            f"{w.filename}:{w.lineno}"
            for w in caught
            if "called a synchronizing CUDA operation" in str(w.message)
        ]
        counts.append(len(where))
        sites.update(where)
    return counts, sites


def test_a_clipping_only_chain_never_synchronizes():
    spec = (
        "clip_norm:0.5+zclip:warmup=10+autoclip:10+clip_layerwise:factor=2,warmup=10"
        "+agc:0.05+clip_value:1"
    )
    counts, sites = _steady_state_syncs(spec, check_finite=False)
    assert counts == [0] * 10, sorted(sites)


def test_a_chain_that_can_skip_synchronizes_once_per_step():
    for spec in ("default", "skip_spike+reset_moments", "rollback:every=1000+lr_backoff"):
        counts, sites = _steady_state_syncs(spec, check_weights=False)
        assert counts == [1] * 10, (spec, sorted(sites))


def test_a_sync_free_guard_never_synchronizes_even_when_it_skips():
    for spec in ("skip_nonfinite+clip_norm:1.0", "skip_nonfinite+zclip"):
        counts, sites = _steady_state_syncs(
            spec, opt_kw={"momentum": 0.9, "fused": True}, nan_at=47, sync_free=True
        )
        assert counts == [0] * 10, (spec, sorted(sites))


def test_the_weight_check_is_one_more_sync_per_step():
    counts, sites = _steady_state_syncs("default")
    assert counts == [2] * 10, sorted(sites)


def test_telemetry_adds_no_sync_once_its_copies_have_landed(tmp_path):
    # The step's numbers travel in one non-blocking copy, read a step later (here the harness
    # synchronizes between steps, as a later step's work would have: the copy has landed).
    counts, sites = _steady_state_syncs("default", log_dir=tmp_path, check_weights=False)
    assert counts == [1] * 10, sorted(sites)


def test_fp16_autocast_overflows_are_the_scalers_skips_and_match_the_plain_loop():
    ref, ours = net(), net()
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    opt = torch.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9)
    # A scale of 2**40 overflows fp16 on the first steps: the scaler halves it until it fits.
    scaler_ref = torch.amp.GradScaler("cuda", init_scale=2.0**40)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**40)
    guard = gradguard.Guard(ours, opt, "skip_nonfinite+zclip", scaler=scaler)
    overflows = 0
    for step in range(30):
        for model, sc in ((ref, scaler_ref), (ours, scaler)):
            for p in model.parameters():
                p.grad = None
            x, y = batch(step)
            with torch.autocast("cuda", dtype=torch.float16):
                loss = nn.functional.cross_entropy(model(x), y)
            sc.scale(loss).backward()
        scaler_ref.step(opt_ref)
        scaler_ref.update()
        r = guard.step()
        overflows += r.skip_reason == "amp_overflow"
        assert scaler.get_scale() == scaler_ref.get_scale()
    assert overflows >= 5  # 2**40 -> below 2**16 takes many halvings
    c = guard.counters
    assert c["amp_overflow"] == overflows and c["skipped"] == 0
    for a, b in zip(ref.parameters(), ours.parameters(), strict=True):
        assert torch.isfinite(b).all()
        assert torch.equal(a, b)


@pytest.mark.parametrize("fused", [False, True])
def test_a_nan_never_reaches_weights_or_fused_adam_state(fused):
    model = net()
    opt = torch.optim.Adam(
        model.parameters(), lr=1e-3, fused=fused, foreach=None if fused else True
    )
    guard = gradguard.Guard(model, opt, "default")
    for step in range(12):
        backward(model, step)
        if step == 8:
            before = snapshot(model, opt)
            model[2].weight.grad[3, 5] = float("nan")
        r = guard.step()
        if step == 8:
            assert r.skipped and r.layers["skip_nonfinite"] == ("2",)
            assert_same(before, snapshot(model, opt))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bf16_gradients_are_measured_in_fp32():
    model = net(dtype=torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gradguard.Guard(model, opt, "clip_norm:1e9")
    backward(model, 0, scale=1e3)
    expected = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad.double()) for p in model.parameters()])
    ).item()
    assert guard.step().grad_norm == pytest.approx(expected, rel=1e-5)


def test_zclip_device_path_matches_the_host_path():
    runs = []
    for check_finite in (True, False):
        model = net()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        guard = gradguard.Guard(model, opt, "zclip:warmup=10", check_finite=check_finite)
        clipped = 0
        for step in range(40):
            backward(model, step, scale=300.0 if step in (25, 31, 32) else 1.0)
            clipped += bool(guard.step().clipped)
        runs.append(([p.detach().clone() for p in model.parameters()], clipped))
    (host, n_host), (device, n_device) = runs
    assert n_host == n_device >= 2
    for a, b in zip(host, device, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("to", ["memory", "disk"])
def test_rollback_restores_gpu_weights_and_fused_state(to, tmp_path):
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    spec = "rollback:every=5,to=disk,path=" + str(tmp_path) if to == "disk" else "rollback:every=5"
    guard = gradguard.Guard(model, opt, spec)
    for step in range(10):
        guard.step(loss=backward(model, step))
    good = snapshot(model, opt)  # the snapshot after the 10th applied step
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")  # a bad update got through: the next loss is NaN
    r = guard.step(loss=backward(model, 10))
    assert r.rolled_back
    assert_same(good, snapshot(model, opt))
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert all(
        v.device == p.device
        for p in model.parameters()
        for k, v in opt.state[p].items()
        if k != "step" and isinstance(v, torch.Tensor)
    )
    for step in range(11, 15):
        assert not guard.step(loss=backward(model, step)).skipped


def test_parameters_split_across_cpu_and_gpu():
    torch.manual_seed(0)
    cpu_layer, gpu_layer = nn.Linear(8, 8), nn.Linear(8, 8).to(DEV)
    model = nn.ModuleDict({"host": cpu_layer, "device": gpu_layer})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gradguard.Guard(model, opt, "skip_nonfinite+clip_norm:1")
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=gen) * 5).to(p.device)
    expected = torch.linalg.vector_norm(
        torch.stack([p.grad.cpu().norm() for p in model.parameters()])
    )
    r = guard.step()
    assert r.grad_norm == pytest.approx(expected.item(), rel=1e-6) and r.clipped
    after = torch.linalg.vector_norm(torch.stack([p.grad.cpu().norm() for p in model.parameters()]))
    assert after.item() == pytest.approx(1.0, rel=1e-5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    gpu_layer.bias.grad[0] = float("inf")
    assert guard.step().skipped


def test_telemetry_on_cuda_matches_the_reports_and_names_the_layer(tmp_path):
    from gradguard.diagnose import load_run

    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    norms = {}
    with gradguard.Guard(model, opt, "default", log_dir=tmp_path) as guard:
        for step in range(40):
            loss = backward(model, step)
            if step == 30:
                model[2].weight.grad[1, 1] = float("nan")
            r = guard.step(loss=loss)
            norms[step] = r.grad_norm
    run = load_run(tmp_path)
    assert [s["step"] for s in run.steps] == list(range(40))
    for s in run.steps:
        if s["step"] != 30:
            assert s["grad_norm"] == pytest.approx(norms[s["step"]], rel=1e-6)
        assert (s["update_ratio"] is not None) == (s["step"] % 10 == 0 and s["step"] != 30)
    (event,) = [e for e in run.events if e["kind"] == "nonfinite_grad"]
    assert event["step"] == 30 and event["layers"] == ["2"] and event["action"] == "skipped"
    assert run.localizations[0]["origin"] == "2"


def test_a_bench_run_on_the_gpu_trains_as_on_the_cpu_and_repeats_exactly(tmp_path):
    from gradguard.bench.config import RunConfig
    from gradguard.bench.train import train_run

    base = {
        "task": "digits",
        "model": "cnn",
        "optimizer": "momentum",
        "lr": 0.05,
        "steps": 60,
        "batch_size": 32,
        "eval_every": 30,
        "mitigation": "default",
    }
    cpu, cpu_steps = train_run(RunConfig(**base))
    gpu, steps = train_run(RunConfig(**base, device=DEV), log_dir=tmp_path)
    again, steps_again = train_run(RunConfig(**base, device=DEV))
    assert gpu["outcome"] == cpu["outcome"] == "trained"
    # Another order of sums, not another run: the losses agree to float error at first.
    assert abs(steps[0]["loss"] - cpu_steps[0]["loss"]) < 1e-4
    assert abs(gpu["test_metric"] - cpu["test_metric"]) < 0.05
    # Deterministic cuDNN: the same GPU run twice is the same run.
    assert [s["loss"] for s in steps] == [s["loss"] for s in steps_again]
    assert again["test_metric"] == gpu["test_metric"]
    assert any(tmp_path.iterdir())  # the telemetry of a GPU run was written
