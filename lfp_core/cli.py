"""The ``lfp`` console script (installed by ``pip install -e .``): one command over the entry points.

    lfp precompute ARGS   the resumable precompute (python -m lfp_core.precompute ARGS)
    lfp report ARGS       a run's headline figures (python -m lfp_core.report ARGS)
    lfp sweep ARGS        the L1 sweep curve (python -m lfp_core.sweep ARGS)
    lfp serve [--run DIR] [--port N]
                          the dashboard on 127.0.0.1 (streamlit run lfp_serve.py: app.py behind a
                          Host/Origin check, lfp_core/hostguard.py; as ./lfp demo serves it)
    lfp bench ARGS        benchmarks (python -m bench ARGS)

Each subcommand's own ``--help`` lists its arguments; its exit status is lfp's. Nothing heavy is
imported here: a subcommand imports its module only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

# subcommand -> (module whose main(argv) -> int it runs, one-line help)
DELEGATES: dict[str, tuple[str, str]] = {
    "precompute": ("lfp_core.precompute", "run the pipeline's stages into a run directory, resumably"),
    "report": ("lfp_core.report", "print a run's headline figures (text or --json)"),
    "sweep": ("lfp_core.sweep", "train SAEs over L1 coefficients and store the sweep curve"),
    "bench": ("bench.__main__", "benchmarks: stages | throughput | scaling | dashboard | live"),
}
SERVE_HELP = "serve the dashboard (streamlit run lfp_serve.py: app.py with a Host/Origin check) on 127.0.0.1"


def _usage() -> str:
    lines = ["usage: lfp {precompute,report,sweep,serve,bench} ...", "", "subcommands:"]
    for name, (module, text) in DELEGATES.items():
        lines.append(f"  {name:11s} {text} (python -m {module.removesuffix('.__main__')})")
    lines.append(f"  {'serve':11s} {SERVE_HELP}")
    lines.append("")
    lines.append("`lfp SUBCOMMAND --help` lists a subcommand's arguments.")
    return "\n".join(lines)


def app_path() -> Path:
    """app.py, the Streamlit entry point: it ships beside the views package (the repository root
    in a checkout or an editable install, site-packages in a wheel install)."""
    spec = importlib.util.find_spec("views")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the views package (the dashboard's pages) is not importable")
    return Path(next(iter(spec.submodule_search_locations))).parent / "app.py"


def serve_command(app: Path, run: str | None, port: int, address: str = "127.0.0.1") -> list[str]:
    """The streamlit command line ./lfp demo runs, for ``lfp serve``: lfp_serve.py beside ``app``
    (app.py wrapped in an ``st.App`` with :class:`lfp_core.hostguard.HostGuard`)."""
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(app.with_name("lfp_serve.py")),
        "--server.address",
        address,
        "--server.port",
        str(port),
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
    ]
    if run is not None:
        cmd += ["--", "--run", str(Path(run).resolve())]
    return cmd


def serve(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(prog="lfp serve", description=SERVE_HELP + ".")
    ap.add_argument("--run", default=None, help="run directory to open first (default: pick one in the sidebar)")
    ap.add_argument(
        "--port", type=int, default=int(os.environ.get("LFP_PORT", "8501")), help="port (default: $LFP_PORT or 8501)"
    )
    args = ap.parse_args(list(argv))
    try:
        app = app_path()
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for entry in (app, app.with_name("lfp_serve.py")):
        if not entry.is_file():
            print(f"error: no dashboard entry point at {entry}", file=sys.stderr)
            return 2
    cmd = serve_command(app, args.run, args.port)
    print(f"[lfp] serving the dashboard on http://127.0.0.1:{args.port}", file=sys.stderr)
    # from app.py's directory, so that streamlit reads the project's .streamlit/config.toml
    return _exec(cmd, app.parent)


def _exec(cmd: list[str], cwd: Path) -> int:
    """Run ``cmd`` in ``cwd`` in place of this process where the OS allows (as ./lfp's ``exec``:
    Ctrl-C and SIGTERM reach streamlit itself, its exit status is lfp's), else as a child."""
    if os.name == "posix":
        sys.stdout.flush()
        sys.stderr.flush()
        os.chdir(cwd)
        os.execv(cmd[0], cmd)
    return subprocess.call(cmd, cwd=cwd)


def _delegate(module: str) -> Callable[[list[str]], int]:
    return importlib.import_module(module).main


def main(argv: Sequence[str] | None = None) -> int:
    from lfp_core.runtime import apply_thread_policy

    apply_thread_policy()  # before a subcommand imports torch (lfp_core/runtime.py); serve's streamlit inherits it
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(_usage(), file=sys.stderr)
        return 2
    if args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    cmd, rest = args[0], args[1:]
    if cmd != "serve" and cmd not in DELEGATES:
        print(f"lfp: unknown subcommand {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    code: int | None
    try:
        code = serve(rest) if cmd == "serve" else _delegate(DELEGATES[cmd][0])(rest)
    except SystemExit as exc:  # argparse's --help (0) and usage errors (2)
        if isinstance(exc.code, str):  # sys.exit("message"): Python prints it and exits 1
            print(exc.code, file=sys.stderr)
            return 1
        code = exc.code
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
