"""Bench run folders are named for what they are (task, model, mitigation, LR, seed, a short hash),
safe on any filesystem and bounded in length; a results folder an older gradguard wrote, with its
runs under their bare keys, still resumes and its telemetry is still found."""

from __future__ import annotations

import re

from gradguard.bench.config import RunConfig
from gradguard.bench.runner import (
    NAME_HASH,
    run_dir_name,
    run_grid,
    telemetry_dir,
    train_stored,
)
from gradguard.bench.store import run_key
from gradguard.diagnose import load_run

SAFE = re.compile(r"[A-Za-z0-9._-]+")


def _name(**fields) -> tuple[str, str]:
    cfg = RunConfig(**fields).as_dict()
    key = run_key(cfg)
    return run_dir_name(cfg, key), key


def test_a_name_says_what_the_run_is_and_ends_with_its_hash():
    name, key = _name(task="digits", model="mlp", mitigation="zclip", lr=0.01, seed=3)
    assert name == f"digits-mlp-zclip-lr0.01-seed3-{key[:NAME_HASH]}"


def test_specs_become_safe_words_and_long_ones_are_cut():
    spec = "skip_nonfinite+zclip:z_thresh=2.0,alpha=0.97+clip_norm:max_norm=1.0+lr_backoff"
    name, key = _name(mitigation=spec, lr=1e-5, faults="nan:p=0.01+spike:scale=1e4,p=0.02")
    assert SAFE.fullmatch(name) and len(name) <= 200
    task, model, optimizer_default_left_out, *_ = name.split("-")
    assert (task, model) == ("digits", "mlp")
    assert optimizer_default_left_out.startswith("skip_nonfinite_zclip_z_thresh_2.0")
    assert "nan_p_0.01_spike_scale_1e4_p_0.02" in name  # faults, not the default: named
    assert "-lr1e_05-" in name and name.endswith(f"-seed0-{key[:NAME_HASH]}")
    assert max(len(p) for p in name.split("-")) <= 40


def test_defaults_are_left_out_and_the_rest_named():
    plain, _ = _name(optimizer="sgd", faults="none")
    assert plain.split("-")[:3] == ["digits", "mlp", "none"]
    adam, _ = _name(optimizer="adam")
    assert adam.split("-")[:4] == ["digits", "mlp", "adam", "none"]


def test_runs_that_read_alike_get_apart_by_the_hash():
    a, _ = _name(batch_size=32)
    b, _ = _name(batch_size=64)
    assert a != b and a.rsplit("-", 1)[0] == b.rsplit("-", 1)[0]


def test_an_entry_point_run_is_named_by_its_function():
    from gradguard.advice.runs import EntryRun

    cfg = EntryRun("examples.advise_entry:setup", "d1", 0.1, "zclip", 1, 50).as_dict()
    key = run_key(cfg)
    assert run_dir_name(cfg, key) == f"setup-zclip-lr0.1-seed1-{key[:NAME_HASH]}"


def test_an_entry_run_stored_under_the_old_package_name_still_trains(monkeypatch):
    """gradguard 0.1.0 stored its entry-point runs' trainer as ``gradguard.advise.runs:...``; the
    package is ``gradguard.advice`` now (``gradguard.advise`` is a function)."""
    from gradguard.advice import runs

    monkeypatch.setattr(runs, "train_entry", lambda cfg, log_dir=None: (cfg, [log_dir]))
    old = {"trainer": "gradguard.advise.runs:train_entry", "entry": "examples.advise_entry:build"}
    assert train_stored(old, log_dir="d") == (old, ["d"])


CFG = RunConfig(
    optimizer="momentum",
    lr=0.05,
    mitigation="clip_norm:1.0",
    steps=20,
    eval_every=20,
    model_options={"depth": 3, "width": 16},
)


def test_telemetry_goes_to_the_named_folder_and_an_old_attempt_is_dropped(tmp_path):
    cfg = CFG.as_dict()
    key = run_key(cfg)
    old = tmp_path / "runs" / key  # where an older gradguard began this run, then crashed
    old.mkdir(parents=True)
    (old / "telemetry.jsonl").write_text('{"type":"step","step":999}\n')
    run_grid([CFG], tmp_path, workers=1, progress=False, telemetry=True)
    named = tmp_path / "runs" / run_dir_name(cfg, key)
    assert telemetry_dir(tmp_path, key, cfg) == named and not old.exists()
    assert [s["step"] for s in load_run(named).steps] == list(range(20))


def test_an_out_folder_from_the_old_names_resumes_and_its_telemetry_is_found(tmp_path, monkeypatch):
    from gradguard.bench import runner

    cfg = CFG.as_dict()
    key = run_key(cfg)
    run_grid([CFG], tmp_path, workers=1, progress=False, telemetry=True)
    named = tmp_path / "runs" / run_dir_name(cfg, key)
    named.rename(tmp_path / "runs" / key)  # as the old code named it
    calls = []
    monkeypatch.setattr(runner, "train_stored", lambda *a, **k: calls.append(a))
    (done,) = run_grid([CFG], tmp_path, workers=1, progress=False, telemetry=True)
    assert done["key"] == key and calls == []  # finished: not redone
    found = telemetry_dir(tmp_path, key, cfg)
    assert found == tmp_path / "runs" / key and load_run(found).end["counters"]["steps"] == 20
