"""The CLI's setup flags: ``train`` trains the bench's default setup, ``train`` and ``bench`` take
``--model-option`` / ``--task-option`` like ``advise``, ``tasks`` and ``models`` list what exists."""

from __future__ import annotations

import dataclasses

import pytest

from gradguard import cli
from gradguard.bench.config import suite
from gradguard.bench.models import model_infos
from gradguard.bench.tasks import task_infos


@pytest.fixture
def trained(monkeypatch):
    """The config ``gradguard train`` would train, captured instead of trained."""
    got = []
    monkeypatch.setattr(cli, "_train_one", lambda cfg, out: got.append(cfg) or 0)
    return got


def test_train_defaults_are_the_quick_suites_run(trained):
    assert cli.main(["train"]) == 0
    (cfg,) = trained
    # The same run the bench makes at LR 0.1 with the default Guard, seed 0.
    assert cfg in suite("quick")
    assert (cfg.optimizer, cfg.lr, cfg.mitigation, cfg.seed) == ("momentum", 0.1, "default", 0)
    assert dict(cfg.model_options) == {"depth": 12, "width": 64}


def test_train_model_options_replace_the_defaults_and_go_with_the_default_model_only(trained):
    assert cli.main(["train", "--model-option", "depth=3", "--task-option", "seed=2"]) == 0
    assert cli.main(["train", "--model", "cnn"]) == 0
    assert cli.main(["train", "--model", "cnn", "--model-option", "width=8"]) == 0
    mlp, cnn, cnn8 = trained
    assert dict(mlp.model_options) == {"depth": 3, "width": 64}
    assert dict(mlp.task_options) == {"seed": 2}
    assert dict(cnn.model_options) == {}  # the mlp's depth/width are not forced on a CNN
    assert dict(cnn8.model_options) == {"width": 8}


def test_train_refuses_an_unknown_option_before_training(trained, capsys):
    assert cli.main(["train", "--model-option", "depht=3"]) == 2
    assert "depht" in capsys.readouterr().err and not trained


def test_train_with_a_model_option_trains_end_to_end(capsys):
    argv = ["train", "--steps", "5", "--mitigation", "none", "--model-option", "depth=2"]
    assert cli.main(argv) == 0
    assert "test_metric" in capsys.readouterr().out


def _bench_configs(*argv):
    return cli._bench_configs(cli.build_parser().parse_args(["bench", *argv]))


def test_bench_options_are_merged_into_each_grids_own():
    configs = _bench_configs("--model-option", "depth=3", "--lr", "0.1", "--mitigation", "none")
    assert configs and all(dict(c.model_options) == {"depth": 3, "width": 64} for c in configs)
    plain = _bench_configs("--lr", "0.1", "--mitigation", "none")
    assert [dataclasses.replace(c, model_options={"depth": 3, "width": 64}) for c in plain] == [
        c for c in configs
    ]
    rnn = _bench_configs("--suite", "rnn", "--task-option", "T=20", "--seeds", "1")
    assert rnn and all(dict(c.task_options)["T"] == 20 for c in rnn)


def test_bench_refuses_options_with_a_grid_file_and_unknown_options(tmp_path, capsys):
    grid = tmp_path / "g.toml"
    grid.write_text("[grid]\nlr = [0.1]\n")
    assert cli.main(["bench", "--grid", str(grid), "--model-option", "depth=3"]) == 2
    assert cli.main(["bench", "--model-option", "nope=1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--grid" in err and "nope" in err
    assert not (tmp_path / "o").exists()  # refused before any work


def _sections(out: str) -> dict[str, list[str]]:
    """The listing as {entry name: its indented lines}."""
    sections: dict[str, list[str]] = {}
    for line in out.splitlines():
        if line and not line.startswith(" "):
            sections[line.split()[0]] = current = []
        else:
            current.append(line)
    return sections


@pytest.mark.parametrize(("command", "infos"), [("tasks", task_infos), ("models", model_infos)])
def test_tasks_and_models_list_every_entry_with_its_options(command, infos, capsys):
    assert cli.main([command]) == 0
    sections = _sections(capsys.readouterr().out)
    assert list(sections) == list(infos())
    for name, info in infos().items():
        assert sections[name][0].strip() == info.summary
        assert [line.split("=")[0].strip() for line in sections[name][1:]] == [
            o.name for o in info.options
        ]
        for o in info.options:
            assert f"    {o.name}={o.default!r}  " in "\n".join(sections[name])
