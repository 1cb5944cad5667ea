"""One exception root, and what the entry points make of it: bad input is one line and exit status 2,
anything else (a bug inside a stage) is a logged traceback, a stage marked failed and exit status 1."""

from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil

import pytest

import lfp_core
from lfp_core import precompute, report, sweep
from lfp_core.errors import BadInputError, LFPError, MissingInputError
from lfp_core.models import LoadedModel
from lfp_core.store import RunReader


def _project_exceptions() -> dict[str, type]:
    out = {}
    for info in pkgutil.walk_packages(lfp_core.__path__, "lfp_core."):
        mod = importlib.import_module(info.name)
        for name, obj in vars(mod).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == mod.__name__:
                out[f"{mod.__name__}.{name}"] = obj
    return out


def test_every_exception_the_project_defines_derives_from_the_root():
    found = _project_exceptions()
    assert len(found) >= 20
    assert [n for n, c in found.items() if not issubclass(c, LFPError)] == []


@pytest.mark.parametrize(
    "name, bad_input, also",
    [
        ("models.ModelLoadError", True, ValueError),
        ("corpora.DataFormatError", True, ValueError),
        ("saes.SAEMismatchError", True, ValueError),
        ("saes.CorpusTooSmallError", True, ValueError),
        ("pipeline.labels.LabelBudgetError", True, ValueError),
        ("rlhf.RewardError", True, ValueError),
        ("probes.ProbeDataError", True, ValueError),
        ("live.LiveInputError", True, ValueError),
        ("activations.LayerRangeError", True, ValueError),
        ("store.StoreError", True, RuntimeError),
        ("store.RunNotFoundError", True, RuntimeError),
        ("store.SchemaVersionError", True, RuntimeError),
        ("store.CorruptStoreError", True, RuntimeError),
        ("store.StoreBusyError", True, RuntimeError),
        ("autointerp.LLMConfigError", True, RuntimeError),
        ("autointerp.LLMAuthError", True, RuntimeError),
        ("autointerp.LLMNotFoundError", True, RuntimeError),
        ("autointerp.LLMUnavailableError", False, RuntimeError),
        ("activations.NonFiniteActivationError", False, RuntimeError),
        ("store.errors.SummaryError", False, TypeError),
        ("errors.MissingInputError", True, FileNotFoundError),
    ],
)
def test_bad_input_or_failure_and_the_old_bases_kept(name, bad_input, also):
    """Bad input derives from BadInputError; every class keeps the base older ``except`` clauses name."""
    mod, _, cls = name.rpartition(".")
    c = getattr(importlib.import_module(f"lfp_core.{mod}"), cls)
    assert issubclass(c, BadInputError) == bad_input and issubclass(c, also) and issubclass(c, LFPError)


def test_a_missing_input_is_still_a_file_not_found_error():
    with pytest.raises(FileNotFoundError, match="^no such thing$"):
        raise MissingInputError("no such thing")


# --- precompute --------------------------------------------------------------------------------------


def _stages(run) -> dict:
    return {s.name: s for s in RunReader(run).stages()}


def _tracebacks(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]


def test_a_bug_inside_a_stage_exits_1_with_the_traceback_logged_and_the_stage_failed(
    tmp_path, monkeypatch, caplog, capsys
):
    def bug(self):
        raise ValueError("simulated bug in a stage")

    monkeypatch.setattr(LoadedModel, "hooked", bug)  # the model stage's first call on the loaded model
    run = tmp_path / "r"
    assert precompute.main(["--preset", "quick", "--out", str(run), "--until", "model"]) == 1
    assert "error:" not in capsys.readouterr().err  # not dressed up as bad input
    assert len(_tracebacks(caplog)) == 1
    assert "Traceback" in caplog.text and "ValueError: simulated bug in a stage" in caplog.text
    model = _stages(run)["model"]
    assert model.status == "failed" and "ValueError: simulated bug in a stage" in (model.error or "")


def test_bad_input_inside_a_stage_exits_2_with_one_line(tmp_path, monkeypatch, caplog, capsys):
    def refuse(self):
        raise BadInputError("the model cannot be used: say why here")

    monkeypatch.setattr(LoadedModel, "hooked", refuse)
    run = tmp_path / "r"
    assert precompute.main(["--preset", "quick", "--out", str(run), "--until", "model"]) == 2
    err = capsys.readouterr().err
    assert "error: the model cannot be used: say why here" in err and "Traceback" not in err
    assert not _tracebacks(caplog)
    assert _stages(run)["model"].status == "failed"


@pytest.mark.parametrize(
    "args, says",
    [
        (["--set", "rl_steps=0"], "rl"),
        (["--set", "no_such_field=1"], "no_such_field"),
        (["--set", "rl_steps=many"], "many"),
        (["--set", "sae_variants=bogus"], "bogus"),
        (["--data-dir", "/no/such/folder"], "--data-dir /no/such/folder does not exist"),
    ],
)
def test_bad_settings_on_the_command_line_exit_2_before_anything_is_written(tmp_path, caplog, capsys, args, says):
    run = tmp_path / "r"
    assert precompute.main(["--preset", "quick", "--out", str(run), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and err.count("\n") == 1
    assert not _tracebacks(caplog) and not run.exists()


def test_argparse_errors_exit_2(tmp_path):
    with pytest.raises(SystemExit) as e:
        precompute.main(["--preset", "no-such-preset", "--out", str(tmp_path / "r")])
    assert e.value.code == 2


# --- report and sweep --------------------------------------------------------------------------------


def test_report_bad_input_2_failure_1(tmp_path, monkeypatch, caplog, capsys):
    assert report.main([str(tmp_path / "missing")]) == 2
    assert "error: " in capsys.readouterr().err and not _tracebacks(caplog)

    def bug(run_dir):
        raise KeyError("simulated bug in the report")

    monkeypatch.setattr(report, "build_report", bug)
    assert report.main([str(tmp_path)]) == 1
    assert "error:" not in capsys.readouterr().err
    assert _tracebacks(caplog) and "simulated bug in the report" in caplog.text


def test_sweep_bad_input_2_failure_1(tmp_path, monkeypatch, caplog, capsys):
    assert sweep.main(["--run", str(tmp_path / "missing"), "--l1", "1"]) == 2
    assert sweep.main(["--run", str(tmp_path), "--l1", "one,two"]) == 2
    err = capsys.readouterr().err
    assert "needs one or more positive numbers" in err and not _tracebacks(caplog)

    def bug(*args, **kwargs):
        raise ValueError("simulated bug in the sweep")

    monkeypatch.setattr(sweep, "run_sweep", bug)
    assert sweep.main(["--run", str(tmp_path), "--l1", "1"]) == 1
    assert "error:" not in capsys.readouterr().err
    assert _tracebacks(caplog) and "simulated bug in the sweep" in caplog.text
