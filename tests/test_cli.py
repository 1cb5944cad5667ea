"""The ``lfp`` console script: installed by ``pip install -e .`` (./lfp setup), one subcommand per
entry point, each subcommand's exit status passed through."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from lfp_core import cli

SUBCOMMANDS = {
    "precompute": "lfp_core.precompute",
    "report": "lfp_core.report",
    "sweep": "lfp_core.sweep",
    "bench": "bench.__main__",
}


def _console_script() -> Path:
    eps = metadata.entry_points(group="console_scripts", name="lfp")
    assert eps, "the lfp console script is not installed: run ./lfp setup (pip install --no-deps -e .)"
    (ep,) = eps
    assert ep.value == "lfp_core.cli:main"
    script = Path(sys.executable).parent / "lfp"
    assert script.is_file(), f"no {script}: run ./lfp setup (pip install --no-deps -e .)"
    return script


def test_usage_lists_every_subcommand(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in [*SUBCOMMANDS, "serve"]:
        assert f"  {name} " in out
    assert cli.main([]) == 2
    assert cli.main(["nope"]) == 2
    assert "unknown subcommand 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_each_subcommand_delegates_to_its_module_and_passes_its_exit_status_through(name, monkeypatch):
    seen = []

    def fake(module):
        assert module == SUBCOMMANDS[name]

        def main(argv):
            seen.append(argv)
            if argv == ["--bad"]:
                raise SystemExit(2)  # what argparse does on a usage error
            return 7

        return main

    monkeypatch.setattr(cli, "_delegate", fake)
    assert cli.main([name, "a", "--b", "c"]) == 7
    assert cli.main([name, "--bad"]) == 2
    assert seen == [["a", "--b", "c"], ["--bad"]]


def test_serve_runs_the_dashboard_as_the_lfp_script_does(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(cli, "_exec", lambda cmd, cwd: calls.append((cmd, cwd)) or 3)
    assert cli.main(["serve", "--run", str(tmp_path), "--port", "8642"]) == 3
    ((cmd, cwd),) = calls
    entry = Path(cmd[4])  # lfp_serve.py: app.py behind the Host/Origin check (lfp_core/hostguard.py)
    assert cmd[1:4] == ["-m", "streamlit", "run"] and entry.name == "lfp_serve.py" and entry.is_file()
    assert (cwd / "app.py").is_file() and entry.parent == cwd and (cwd / "views" / "overview.py").is_file()
    flags = cmd[5:]
    for key, value in (
        ("--server.address", "127.0.0.1"),
        ("--server.port", "8642"),
        ("--server.headless", "true"),
        ("--browser.gatherUsageStats", "false"),
    ):
        assert flags[flags.index(key) + 1] == value
    assert flags[-3:] == ["--", "--run", str(tmp_path.resolve())]
    assert cli.main(["serve", "--port", "x"]) == 2  # argparse usage error


def test_installed_script_passes_precompute_bad_input_exit_status_through(tmp_path):
    """The real console script, the real precompute: --out naming a file is bad input, exit 2 with
    one line, nothing computed."""
    afile = tmp_path / "not-a-dir"
    afile.write_text("x")
    p = subprocess.run(
        [str(_console_script()), "precompute", "--preset", "quick", "--out", str(afile)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2, p.stderr
    assert f"--out {afile} is a file" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run(
        [str(_console_script()), "precompute", "--preset", "no-such-preset", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2 and "invalid choice" in p.stderr
