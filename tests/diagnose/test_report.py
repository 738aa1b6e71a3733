"""``gradguard report``: the figures, report.html (self-contained, escaped) and the CLI, from
synthetic telemetry written with the real ``RecordWriter``."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from gradguard.cli import main
from gradguard.diagnose import html as report
from gradguard.diagnose import plots
from gradguard.diagnose.records import FILENAME, RecordWriter, load_run
from gradguard.diagnose.rules import Finding

from tests.helpers import slow_except

HOSTILE = "<script>alert(1)</script>"
LAYERS = ["head", "embed", "block0.attn", "block0.mlp", "block1.attn", "block1.mlp"]
FORWARD = [1, 2, 3, 4, 5, 0]  # the record order is not the forward order: head is listed first
NAN_STEP = 390


def write_run(
    run_dir: Path,
    *,
    healthy: bool = False,
    hostile: bool = False,
    diverge: bool = False,
    n_events: int | None = None,
) -> Path:
    """A realistic run: 200 step records (every 2nd of 400 steps). Unless ``healthy``, the
    gradient norm grows from step 250 (led by ``block1.mlp``), clipping engages, step 390 is
    non-finite (skipped, then a rollback), and there are spike events and a localization.
    ``diverge`` makes the last losses non-finite; ``n_events`` replaces the events by that many
    grad spikes."""
    rng = np.random.default_rng(0)
    layers = list(LAYERS)
    if hostile:
        layers[3] = HOSTILE
    lead = layers.index("block1.mlp")
    w = RecordWriter(run_dir)
    w.write(
        {
            "type": "meta",
            "version": 1,
            "created": "2025-01-02T03:04:05",
            "gradguard": "0.1.0",
            "torch": "2.13.0",
            "policy": "skip_nonfinite+zclip:z_thresh=2.5+rollback" if not hostile else HOSTILE,
            "layers": layers,
            "layer_types": ["Linear"] * len(layers),
            "layer_params": [1000, 5000, 4000, 8000, 4000, 8000],
            "forward_order": FORWARD,
            "normalization": True,
            "recurrent": [],
            "amp": False,
            "sampling": {"every": 2},
        }
    )
    share = np.array([0.3, 0.2, 0.4, 0.5, 0.6, 1.0])
    counters = {"steps": 400, "clipped": 0, "skipped": 0, "rolled_back": 0}
    for k, step in enumerate(range(0, 400, 2)):
        growth = 1.0 if healthy else math.exp(max(0, step - 250) / 30)
        norm = float(1.5 * growth * rng.lognormal(0, 0.15))
        threshold = 3.0 + 0.002 * step
        loss = float(2.3 * math.exp(-step / 250) + 0.05 * rng.random() + 0.02 * (growth - 1))
        lr = 0.1 if step < 392 or healthy else 0.05
        clipped = not healthy and norm > threshold
        layer_norms = list(norm * share / np.linalg.norm(share))
        layer_norms[lead] *= growth**0.3
        if step < 20:
            layer_norms[1] = 0.0  # a frozen embedding at the start: zero gradient
        rec = {
            "type": "step",
            "step": step,
            "loss": loss,
            "lr": lr,
            "grad_norm": norm,
            "grad_norm_after": min(norm, threshold),
            "clipped": clipped,
            "skipped": False,
            "skip_reason": None,
            "rolled_back": False,
            "actions": ["zclip"] if clipped else [],
            "layer_norms": layer_norms,
            "layer_norms_after": None,
            "weight_norms": None,
            "update_ratio": None,
            "nonfinite_layers": [],
            "input": {"mean": 0.0, "std": 1.0, "absmax": 3.0},
            "amp_scale": None,
            "radius": None,
            "metrics": {"zclip.threshold": threshold, "zclip.z": 0.5},
        }
        if k % 10 == 0:  # sampled steps
            rec["weight_norms"] = [10.0] * len(layers)
            rec["update_ratio"] = list(1e-3 * growth * share * rng.lognormal(0, 0.3, len(layers)))
        if not healthy and step == NAN_STEP:
            rec.update(
                loss=math.nan,
                grad_norm=math.inf,
                grad_norm_after=0.0,
                clipped=False,
                skipped=True,
                skip_reason="nonfinite_grad",
                actions=["skip_nonfinite"],
                nonfinite_layers=[lead],
            )
            rec["layer_norms"][lead] = math.nan
        if not healthy and step == NAN_STEP + 2:
            rec.update(skipped=True, rolled_back=True, skip_reason="rollback", grad_norm_after=0.0)
        if diverge and step >= 394:
            rec.update(loss=math.nan, grad_norm=math.nan)
        counters["clipped"] += rec["clipped"]
        counters["skipped"] += rec["skipped"]
        counters["rolled_back"] += rec["rolled_back"]
        w.write(rec)

    events: list[dict] = []
    if n_events is not None:
        events = [
            {"step": 2 * i, "kind": "grad_spike", "layers": [layers[lead]], "action": "clipped"}
            for i in range(n_events)
        ]
    elif not healthy:
        for step in (300, 330, 360):
            events.append(
                {
                    "step": step,
                    "kind": "grad_spike",
                    "layers": [layers[lead], layers[4]],
                    "action": "clipped",
                    "detail": {"z": 4.25, "norm": 12.5, "share": 0.61},
                }
            )
        events.append(
            {
                "step": 340,
                "kind": "layer_spike",
                "layers": [layers[3]],
                "action": "none",
                "detail": {"z": 5.5, "share": 0.4},
            }
        )
        events.append(
            {
                "step": NAN_STEP,
                "kind": "nonfinite_grad",
                "layers": [layers[lead], layers[4], layers[3], layers[2]],
                "action": "skipped",
                "detail": {"nonfinite_layers": 1, "value": math.inf},
            }
        )
    for e in events:
        w.write({"type": "event", "detail": {}, **e})
    if not healthy and n_events is None:
        w.write(
            {
                "type": "localization",
                "step": NAN_STEP,
                "origin": layers[lead],
                "phase": "backward",
                "path": [layers[lead], layers[4], layers[3]],
                "method": "replay",
                "detail": {},
            }
        )
    kinds: dict[str, int] = {}
    for e in events:
        kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
    w.write({"type": "end", "step": 400, "counters": counters, "events": kinds})
    w.close()
    return run_dir


FINDINGS = [
    Finding(
        cause="lr_too_high",
        title="The learning rate is too high for block1.mlp",
        summary="Update ratios reach 40x the healthy 1e-3 before the spikes.",
        evidence=["update ratio 0.04 at step 380", f"largest share in {HOSTILE}"],
        advice=["Lower the LR by 3-10x", "Add warmup"],
        severity="high",
        step=300,
        layers=["block1.mlp"],
    ),
    Finding(
        cause="init_depth",
        title="Deep layers start large",
        summary="The head's gradient is 3x the input's.",
        severity="info",
    ),
]


@pytest.fixture(scope="module")
def exploding(tmp_path_factory) -> tuple[Path, Path, str]:
    """The exploding run with a hostile layer name, reported once with fixed findings."""
    run_dir = write_run(tmp_path_factory.mktemp("exploding"), hostile=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report, "diagnose", lambda run: FINDINGS)
        path = report.write_report(run_dir)
    return run_dir, path, path.read_text(encoding="utf-8")


def assert_nonblank_png(path: Path) -> None:
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] >= 300 and img.shape[1] >= 800, img.shape
    rgb = img[..., :3].reshape(-1, 3)
    assert rgb.std() > 0.05  # not a flat image
    assert (rgb.min(axis=1) < 0.9).mean() > 0.02  # a meaningful share of ink, not only white
    q = (rgb * 15).round().astype(int)  # 16 levels a channel, one int a color
    colors = np.unique(q[:, 0] * 256 + q[:, 1] * 16 + q[:, 2])
    assert len(colors) >= 8  # lines/cells in several colors, not just black text on white


@pytest.mark.parametrize("name", [name for name, _ in plots.FIGURES])
def test_each_figure_is_a_nonblank_png(exploding, name):
    run_dir, _, _ = exploding
    path = run_dir / f"{name}.png"
    assert path.exists()
    assert_nonblank_png(path)


def test_heatmap_rows_follow_forward_order_and_mark_nonfinite(tmp_path):
    run = load_run(write_run(tmp_path))
    steps, values, names = plots.layer_matrix(run, "layer_norms")
    assert names == [LAYERS[i] for i in FORWARD] and names[0] == "embed" and names[-1] == "head"
    assert values.shape == (6, 200) and list(steps[:3]) == [0, 2, 4]
    j = list(steps).index(NAN_STEP)
    row = names.index("block1.mlp")
    assert np.isinf(values[row, j])  # NaN in the record -> a non-finite cell
    assert np.isfinite(np.delete(values[:, j], row)).all()
    assert (values[names.index("embed"), :10] == 0).all()  # zeros stay zeros (drawn "under")
    _, ratios, _ = plots.layer_matrix(run, "update_ratio")
    assert ratios.shape == (6, 20)  # only the sampled steps


def test_figures_are_skipped_without_data(tmp_path):
    w = RecordWriter(tmp_path)
    w.write({"type": "meta", "version": 1, "layers": ["a", "b"], "forward_order": []})
    w.close()
    run = load_run(tmp_path)
    assert plots.write_all(run, tmp_path) == {}
    path = report.write_report(tmp_path)
    text = path.read_text()
    assert "No step records to plot" in text and "<img" not in text


def test_update_ratio_is_none_when_never_sampled(tmp_path):
    run = load_run(write_run(tmp_path, healthy=True))
    for s in run.steps:
        s["update_ratio"] = None
    assert plots.update_ratio(run, tmp_path) is None
    assert plots.norm_timeline(run, tmp_path) is not None


def test_report_shows_findings_events_localization_and_counters(exploding):
    _, path, text = exploding
    assert path.name == "report.html"
    for f in FINDINGS:
        assert report.html.escape(f.title) in text
        assert report.html.escape(f.summary) in text
    assert "Lower the LR by 3-10x" in text and "update ratio 0.04 at step 380" in text
    assert 'class="badge high"' in text and 'class="badge info"' in text
    rows = re.findall(r'<tr class="event"><td class="num">([\d–]+)</td>', text)
    # The three grad spikes (300, 330, 360: each within 50 steps of the last) are one row.
    assert rows == ["300–360", "340", "390"]
    assert "<summary>3 events</summary>" in text
    assert "z=4.25, norm=12.5, share=0.61" in text and "value=Inf" in text
    assert "+1 more" in text  # the non-finite event names 4 layers; 3 are shown
    assert "block1.mlp → block1.attn →" in text  # the localization path
    assert "replay" in text and "backward" in text
    assert "<td>rolled_back</td>" in text  # a counter from the end record
    assert "5 events: grad_spike 3, layer_spike 1, nonfinite_grad 1." in text
    assert "2025-01-02T03:04:05" in text and "torch 2.13.0" in text


def test_report_embeds_every_figure_and_loads_nothing_from_the_network(exploding):
    run_dir, _, text = exploding
    pngs = sorted(run_dir.glob("*.png"))
    assert len(pngs) == len(plots.FIGURES)
    assert text.count('<img src="data:image/png;base64,') == len(pngs)
    assert len(re.findall(r"<img\b", text)) == len(pngs)
    assert not re.search(r"""(src|href|action)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert not re.search(r"url\(|@import|https?://", text, re.I)
    assert "<script" not in text.lower() and "<link" not in text.lower()


def test_run_text_is_escaped(exploding):
    _, _, text = exploding
    assert HOSTILE not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    # It is in the policy, the event layers and a finding's evidence: each place is escaped.
    assert text.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 3


def test_healthy_run_says_healthy(tmp_path):
    path = report.write_report(write_run(tmp_path, healthy=True))
    text = path.read_text()
    assert "Healthy: no events were recorded." in text and 'class="verdict healthy"' in text
    assert "No events." in text and "No likely cause found: nothing to diagnose." in text
    assert text.count('<img src="data:image/png;base64,') == len(plots.FIGURES)


def test_diverged_run_says_diverged(tmp_path):
    run = load_run(write_run(tmp_path, diverge=True))
    state, sentence = report.verdict(run)
    assert state == "diverged" and "loss is not finite" in sentence


def test_event_table_is_capped(tmp_path):
    run = load_run(write_run(tmp_path, n_events=report.MAX_EVENT_ROWS + 37))
    # Spread the spikes beyond one episode's gap, so that each keeps its own row.
    for i, e in enumerate(run.events):
        e["step"] = i * (report.EPISODE_GAP + 1)
    text = report.report_html(run, [], {})
    assert text.count('<tr class="event">') == report.MAX_EVENT_ROWS
    assert f"37 more event(s) in 37 row(s) omitted ({report.MAX_EVENT_ROWS + 37} in total)" in text
    hidden = report.MAX_EVENT_ROWS - report.EVENT_ROWS_SHOWN
    assert f"Show {hidden} more row(s) ({hidden} event(s))" in text
    # Unspread, the same spikes (2 steps apart) are one expandable row listing the first ones.
    text = report.report_html(load_run(tmp_path), [], {})
    assert text.count('<tr class="event">') == 1
    assert f"<summary>{report.MAX_EVENT_ROWS + 37} events</summary>" in text
    assert f"+{report.MAX_EVENT_ROWS + 37 - report.MAX_EPISODE_ITEMS} more" in text


def test_truncated_last_line_is_tolerated(tmp_path):
    write_run(tmp_path)
    with open(tmp_path / FILENAME, "a") as f:
        f.write('{"type":"step","step":400,"loss":0.5,"layer_no')  # killed mid-write
    assert main(["report", str(tmp_path)]) == 0
    text = (tmp_path / "report.html").read_text()
    assert "1 unreadable line(s) skipped" in text


#: Values a hand-edited or foreign telemetry file may hold where the writer puts others.
WRONG = [None, "x", [], {}, 1e308, float("nan"), True, [1, "a"], {"a": 1}, 10**400, -5]


@pytest.mark.parametrize("seed", slow_except(list(range(8)), 0))
def test_values_of_the_wrong_type_are_skipped_with_a_note(tmp_path, seed):
    """Random fields of random records (steps, events, localizations, meta, end) replaced by
    values of another type, deleted, or list entries spoiled: the report is written, the terminal
    summary printed, and both say what was skipped."""
    rng = np.random.default_rng(seed)
    write_run(tmp_path)
    path = tmp_path / FILENAME
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    spoiled = 0
    for _ in range(12):
        rec = recs[int(rng.integers(len(recs)))]
        key = str(rng.choice([k for k in rec if k != "type"]))
        value = rec[key]
        bad = WRONG[int(rng.integers(len(WRONG)))]
        if isinstance(value, list) and value and rng.random() < 0.5:
            value[int(rng.integers(len(value)))] = bad
        elif rng.random() < 0.2 and key != "step":
            del rec[key]
            continue
        else:
            rec[key] = bad
        spoiled += 1
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert main(["report", str(tmp_path)]) == 0
    run = load_run(tmp_path)
    if spoiled:
        assert run.notes  # something was said about it
    text = (tmp_path / "report.html").read_text()
    assert all(report.html.escape(n) in text for n in run.notes)
    summary = report.terminal_summary(run, [])
    assert all(f"note: {n}" in summary for n in run.notes)


def test_a_wrong_value_becomes_not_recorded_and_is_counted(tmp_path):
    write_run(tmp_path)
    path = tmp_path / FILENAME
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    steps = [r for r in recs if r["type"] == "step"]
    steps[3]["loss"], steps[4]["layer_norms"][0], steps[5]["step"] = "high", "x", "five"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    run = load_run(tmp_path)
    by_step = {s["step"]: s for s in run.steps}
    assert by_step[steps[3]["step"]]["loss"] is None
    assert by_step[steps[4]["step"]]["layer_norms"][0] is None
    assert len(run.steps) == len(steps) - 1  # the record without a step is dropped
    assert run.repaired == {"step.loss": 1, "step.layer_norms": 1, "step.step": 1}
    assert run.dropped_lines == 1


def test_terminal_summary(exploding):
    run_dir, path, _ = exploding
    run = load_run(run_dir)
    text = report.terminal_summary(run, FINDINGS, path)
    lines = text.splitlines()
    assert len(lines) <= 15
    assert "steps: 400 (200 recorded), layers: 6" in text
    assert "5 events: grad_spike 3, layer_spike 1, nonfinite_grad 1." in text
    assert "first event: step 300 grad_spike in block1.mlp, block1.attn" in text
    assert "started in: block1.mlp (backward, step 390)" in text
    assert "[high] The learning rate is too high for block1.mlp" in text
    assert FINDINGS[0].summary in text
    assert lines[-1] == f"report: {path}"
    run.events[0]["layers"] = ["evil\x1b[2J"]  # a terminal escape in a layer name
    assert "evil?[2J" in report.terminal_summary(run, [])


def test_cli_report_writes_into_out(tmp_path, capsys):
    run_dir = write_run(tmp_path / "run")
    out = tmp_path / "out"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.html'}" in printed and "first event: step 300" in printed
    assert (out / "report.html").exists() and (out / "layer_heatmap.png").exists()
    assert not (run_dir / "report.html").exists()


@pytest.mark.parametrize("case", ["missing", "empty", "not_telemetry", "out_is_a_file"])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case):
    args = ["report", str(tmp_path / "nope")]
    if case == "empty":
        args = ["report", str(tmp_path)]
    elif case == "not_telemetry":
        (tmp_path / FILENAME).write_text("epoch,loss\n0,2.3\n")
        args = ["report", str(tmp_path)]
    elif case == "out_is_a_file":
        write_run(tmp_path / "run")
        (tmp_path / "file").write_text("x")
        args = ["report", str(tmp_path / "run"), "--out", str(tmp_path / "file")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("gradguard: error: ") and err.count("\n") == 1, err


def test_sparse_and_odd_records_still_render(tmp_path):
    """Steps with only some fields, short or odd per-layer lists, events without a step or
    detail: the report renders what there is and crashes on none of it."""
    w = RecordWriter(tmp_path)
    w.write({"type": "meta", "version": 1, "layers": ["a", "b", "c"], "policy": {"x": [1, 2]}})
    for step in range(0, 40, 4):
        w.write({"type": "step", "step": step, "grad_norm": None if step == 8 else 1.0 + step})
    w.write({"type": "step", "step": 40, "layer_norms": [1.0, "x", None], "loss": math.inf})
    w.write({"type": "step", "step": 44, "layer_norms": [0.0, 2.0], "nonfinite_layers": ["b"]})
    w.write({"type": "event", "kind": "mystery", "layers": None, "detail": [1, 2]})
    w.write({"type": "event", "step": 12, "kind": "grad_spike", "layers": "a"})
    w.close()
    run = load_run(tmp_path)
    steps, values, _ = plots.layer_matrix(run)
    assert list(steps) == [40, 44]
    assert np.isnan(values[1, 0]) and np.isnan(values[2, 1])  # not recorded
    assert np.isinf(values[1, 1]) and values[0, 1] == 0  # flagged by name; zero stays zero
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report, "diagnose", lambda run: [{"title": "as a dict", "severity": "odd"}])
        text = report.write_report(tmp_path).read_text()
    assert "as a dict" in text and "mystery" in text and "{&quot;x&quot;: [1, 2]}" in text
    figures = plots.write_all(run, tmp_path)
    assert set(figures) == {"norm_timeline", "layer_heatmap", "loss_curve"}  # no clip flags
    for path in figures.values():
        assert imread(path).shape[0] >= 300


def _vanishing_run(tmp_path: Path, layers: int = 24, episodes: tuple[int, ...] = (100,)) -> Path:
    """A run where ``layers`` layers vanish, one event per layer, in each episode."""
    names = [f"blocks.{i}.fc" for i in range(layers)]
    w = RecordWriter(tmp_path)
    w.write({"type": "meta", "version": 1, "layers": names, "forward_order": []})
    for step in range(192):
        w.write({"type": "step", "step": step, "loss": 1.0, "layer_norms": [1e-6] * layers})
    for start in episodes:
        for i, name in enumerate(names):
            w.write(
                {
                    "type": "event",
                    "step": start + i // 4,
                    "kind": "vanishing",
                    "layers": [name],
                    "action": "none",
                    "detail": {"norm": 1e-6, "reference": 0.1, "steps": 20},
                }
            )
    w.close()
    return tmp_path


@pytest.mark.parametrize(("layers", "episodes"), [(24, (100,)), (5, (20, 150)), (1, (40,))])
def test_vanishing_events_are_one_row_per_episode(tmp_path, layers, episodes):
    run = load_run(_vanishing_run(tmp_path, layers, episodes))
    text = report.report_html(run, [], {})
    assert text.count('<tr class="event">') == len(episodes)
    assert f"Events ({layers * len(episodes)})" in text
    last = (layers - 1) // 4
    span = f"{episodes[0]}–{episodes[0] + last}" if last else str(episodes[0])
    assert f'<td class="num">{span}</td>' in text
    assert f"{layers} layer{'s' if layers != 1 else ''}: blocks.0.fc" in text
    if layers > report.MAX_LAYERS_SHOWN:
        assert f"+{layers - report.MAX_LAYERS_SHOWN} more" in text


def test_events_are_grouped_by_kind_and_step_range(tmp_path):
    run = load_run(_vanishing_run(tmp_path, 2, (100,)))
    run.events = [
        {"type": "event", "step": s, "kind": k, "layers": [f"l{s}"]}
        for s, k in [(10, "a"), (20, "b"), (40, "a"), (70, "b"), (90, "a"), (141, "a"), (300, "b")]
    ]
    rows = report.event_rows(run.events)
    # One kind's events at most EPISODE_GAP (50) apart are one row, placed at its first step.
    assert [[e["step"] for e in r] for r in rows] == [[10, 40, 90], [20, 70], [141], [300]]


def test_other_events_keep_their_own_rows_among_vanishing_ones(tmp_path):
    run = load_run(_vanishing_run(tmp_path, 8, (100,)))
    run.events.append({"type": "event", "step": 101, "kind": "grad_spike", "layers": ["x"]})
    rows = report.event_rows(run.events)
    assert [len(r) for r in rows] == [8, 1]  # steps 100-101: the spike at 101 sorts after
    assert sum(len(r) for r in rows) == 9


def test_started_in_says_when_the_replay_did_not_reproduce(tmp_path):
    run = load_run(write_run(tmp_path))
    run.localizations = [
        {
            "type": "localization",
            "step": 3,
            "origin": "",
            "phase": "none",
            "path": [],
            "method": "replay",
            "detail": {},
        }
    ]
    text = report.terminal_summary(run, [])
    assert "started in: not found: the replay of step 3 did not reproduce" in text
    assert "None" not in text and "(none" not in text
    page = report.report_html(run, [], {})
    assert "(not reproduced)" in page and "did not reproduce the NaN/Inf" in page


#: Labels matplotlib would misread: mathtext pairs, an odd dollar, backslashes (alone, doubled,
#: before a dollar), a trailing backslash.
ODD_LABELS = ["$x^{$", "cost $5", "a$b$c", "C:\\runs\\x", "a\\\\b", "a\\$b$", "end\\"]


@pytest.mark.parametrize("text", ODD_LABELS)
def test_a_label_is_shown_as_the_run_wrote_it(text):
    """What matplotlib draws for the escaped label (its own reading: no mathtext, escapes
    resolved) is the text itself."""
    from matplotlib.text import Text

    shown, is_math = Text()._preprocess_math(plots._label(text))
    assert (shown, is_math) == (text, False)


@pytest.mark.parametrize("odd", slow_except(["$x^{$", "$\\frac{a}{$", "cost $5", "a$b$c"], "$x^{$"))
def test_dollar_signs_in_event_kinds_and_layer_names_do_not_break_the_plots(tmp_path, odd):
    run = load_run(write_run(tmp_path))
    run.meta["layers"] = [odd + n for n in run.meta["layers"]]
    for e in run.events:
        e["kind"] = odd + str(e["kind"])
        e["layers"] = [odd + str(x) for x in e.get("layers") or []]
    (tmp_path / "out").mkdir()
    figures = plots.write_all(run, tmp_path / "out")
    assert set(figures) == {name for name, _ in plots.FIGURES}
    for path in figures.values():
        assert_nonblank_png(path)
