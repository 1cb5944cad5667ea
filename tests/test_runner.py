"""The precompute runner on a registry of tiny stages (no model, seconds): a stage is recomputed exactly
when a setting in its settings object, or an upstream stage, changes; a stage receives only its settings
object; a bug inside a stage is a failure (exit 1, stage marked failed), bad input exits 2."""

from __future__ import annotations

import logging

import pytest

from lfp_core import precompute
from lfp_core.errors import BadInputError
from lfp_core.settings import (
    DivergenceStageSettings,
    FeaturesStageSettings,
    ModelStageSettings,
    RLStageSettings,
    preset_config,
)
from lfp_core.stages import StageSpec
from lfp_core.store import RunReader

CALLS: list[tuple[str, object]] = []
_HERE = "tests.test_runner:"


def stage_root(ctx, s: ModelStageSettings, config_hash: str) -> None:
    CALLS.append(("root", s))
    ctx.commit(lambda con: None, {})


def stage_rl(ctx, s: RLStageSettings, config_hash: str) -> None:
    CALLS.append(("rl", s))
    ctx.commit(lambda con: None, {})


def stage_div(ctx, s: DivergenceStageSettings, config_hash: str) -> None:
    CALLS.append(("div", s))
    ctx.commit(lambda con: None, {})


def stage_feat(ctx, s: FeaturesStageSettings, config_hash: str) -> None:
    CALLS.append(("feat", s))
    if s.features.top_k == 99:
        raise ValueError("a bug inside the stage")  # not bad input: a failure
    if s.features.top_k == 98:
        raise BadInputError("the corpus has no lexicon words")
    ctx.commit(lambda con: None, {})


TINY = [
    StageSpec("root", ModelStageSettings, (), _HERE + "stage_root"),
    StageSpec("rl", RLStageSettings, ("root",), _HERE + "stage_rl"),
    StageSpec("div", DivergenceStageSettings, ("rl",), _HERE + "stage_div"),
    StageSpec("feat", FeaturesStageSettings, ("root",), _HERE + "stage_feat"),
]


@pytest.fixture
def tiny_registry(monkeypatch):
    monkeypatch.setattr(precompute, "stages_for", lambda task="vader": list(TINY))
    monkeypatch.setattr(precompute, "STAGES", list(TINY))
    CALLS.clear()
    return TINY


def _ran() -> list[str]:
    return [name for name, _ in CALLS]


def test_each_stage_gets_its_settings_object_and_reruns_only_when_it_changes(tiny_registry, tmp_path):
    run = tmp_path / "run"
    cfg = preset_config("quick")
    assert precompute.run_pipeline(cfg, run) == {k: "done" for k in ("root", "rl", "div", "feat")}
    got = dict(CALLS)
    assert got["rl"] == RLStageSettings(
        run=cfg.run, reward=cfg.reward, rl=cfg.rl, completions=cfg.completions, tuned=cfg.tuned
    )
    assert type(got["feat"]) is FeaturesStageSettings and not hasattr(got["feat"], "rl")

    CALLS.clear()
    assert set(precompute.run_pipeline(cfg, run).values()) == {"skipped"} and CALLS == []

    CALLS.clear()  # rl.steps: rl and what reads it (div), nothing else
    out = precompute.run_pipeline(cfg.with_values({"rl.steps": 61}), run)
    assert out == {"root": "skipped", "rl": "done", "div": "done", "feat": "skipped"} and _ran() == ["rl", "div"]

    CALLS.clear()  # a setting no stage of this registry reads: nothing recomputed
    assert set(precompute.run_pipeline(cfg.with_values({"rl.steps": 61, "atp.top_k": 3}), run).values()) == {"skipped"}

    CALLS.clear()  # the run group is in every stage's settings
    out = precompute.run_pipeline(cfg.with_values({"rl.steps": 61, "seed": 5}), run)
    assert set(out.values()) == {"done"}


def test_a_bug_in_a_stage_exits_1_and_marks_it_failed(tiny_registry, tmp_path, caplog):
    run = tmp_path / "run"
    with caplog.at_level(logging.ERROR):
        code = precompute.main(["--preset", "quick", "--out", str(run), "--set", "feature_top_k=99"])
    assert code == 1
    assert "a bug inside the stage" in caplog.text and "Traceback" in caplog.text
    status = {s.name: s.status for s in RunReader(run).stages()}
    assert status["feat"] == "failed" and status["rl"] == "done"


def test_bad_input_inside_a_stage_exits_2(tiny_registry, tmp_path, capsys):
    run = tmp_path / "run"
    assert precompute.main(["--preset", "quick", "--out", str(run), "--set", "feature_top_k=98"]) == 2
    assert "error: the corpus has no lexicon words" in capsys.readouterr().err
