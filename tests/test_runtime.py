"""The thread policy (lfp_core.runtime) is in the environment before torch loads, at every entry point,
and never overrides what the user set."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lfp_core.config import REPO_ROOT
from lfp_core.runtime import POLICY_ENV, SWITCH, apply_thread_policy

# Run in a fresh interpreter: record the policy variables at the moment torch is first imported
# (an import hook), run the entry point as ``python -m``/a script would, then import torch ourselves
# (so an entry point that never imports torch is still checked: the policy must be set by then).
_PROBE = r"""
import importlib.abc, json, os, runpy, sys
KEYS = json.loads(sys.argv[1])
seen = {}
class Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.update({k: os.environ.get(k) for k in KEYS}, first_by="the entry point")
        return None
sys.meta_path.insert(0, Hook())
kind, target, *argv = sys.argv[2:]
sys.argv = [target, *argv]
try:
    if kind == "module":
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        import importlib
        importlib.import_module(target).main(argv)
except SystemExit:
    pass
seen.setdefault("first_by", "probe")
import torch  # noqa: F401
seen.update({k: os.environ.get(k) for k in KEYS if k not in seen})
print("SEEN " + json.dumps(seen))
"""

ENTRY_POINTS = [  # (how the probe runs it, target, arguments that stop before any real work)
    ("module", "lfp_core.precompute", ["--help"]),
    ("module", "bench", ["--help"]),
    ("main", "lfp_core.cli", ["--help"]),
]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in POLICY_ENV and k != SWITCH}
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="disabled",
        TOKENIZERS_PARALLELISM="false",
        **extra,
    )
    return env


def _probe(kind: str, target: str, argv: list[str], env: dict[str, str]) -> dict:
    p = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(list(POLICY_ENV)), kind, target, *argv],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=300,
    )
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("SEEN ")]
    assert lines, f"probe of {target} printed no result (exit {p.returncode}): {p.stderr[-2000:]}"
    return json.loads(lines[-1][5:])


def test_apply_sets_only_what_the_user_left_unset():
    env: dict[str, str] = {}
    assert apply_thread_policy(env) == POLICY_ENV and env == POLICY_ENV
    assert apply_thread_policy(env) == {}  # idempotent
    user = {k: "ACTIVE" for k in POLICY_ENV}
    assert apply_thread_policy(user) == {} and user == {k: "ACTIVE" for k in POLICY_ENV}
    for off in ("off", "OFF", "0", "false", "no"):
        env = {SWITCH: off}
        assert apply_thread_policy(env) == {} and env == {SWITCH: off}


@pytest.mark.parametrize("kind,target,argv", ENTRY_POINTS, ids=[t for _, t, _ in ENTRY_POINTS])
def test_entry_point_sets_the_policy_before_torch_loads(kind, target, argv):
    seen = _probe(kind, target, argv, _clean_env())
    assert {k: seen[k] for k in POLICY_ENV} == POLICY_ENV, (
        f"torch first imported ({seen['first_by']}) without the policy"
    )


@pytest.mark.parametrize("kind,target,argv", ENTRY_POINTS[:1], ids=[ENTRY_POINTS[0][1]])
def test_entry_point_keeps_the_users_values_and_the_off_switch(kind, target, argv):
    user = {k: "ACTIVE" for k in POLICY_ENV}
    seen = _probe(kind, target, argv, _clean_env(**user))
    assert {k: seen[k] for k in POLICY_ENV} == user
    seen = _probe(kind, target, argv, _clean_env(**{SWITCH: "off"}))
    assert all(seen[k] is None for k in POLICY_ENV)


def _policy_call_precedes_other_imports(path: Path) -> None:
    """The module calls apply_thread_policy() before any import except __future__, os, pathlib and
    lfp_core.runtime itself (the dashboard and the test session are started by streamlit/pytest, so
    this is checked on their source)."""
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if (
            isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Call)
            and getattr(node.value.func, "id", None) == "apply_thread_policy"
        ):
            return
        if isinstance(node, ast.Import):
            bad = [a.name for a in node.names if a.name not in ("os",)]
            assert not bad, f"{path.name} imports {bad} before apply_thread_policy()"
        if isinstance(node, ast.ImportFrom):
            assert node.module in ("__future__", "lfp_core.runtime"), (
                f"{path.name} imports {node.module} before apply_thread_policy()"
            )
    pytest.fail(f"{path.name} never calls apply_thread_policy() at module level")


@pytest.mark.parametrize("rel", ["app.py", "tests/conftest.py", "bench/__main__.py"])
def test_dashboard_and_test_session_apply_the_policy_first(rel):
    _policy_call_precedes_other_imports(REPO_ROOT / rel)


def test_lfp_script_exports_the_same_policy():
    """./lfp's thread_policy() exports POLICY_ENV, keeps user values and honours the off switch."""
    script = (REPO_ROOT / "lfp").read_text()
    start = script.index("thread_policy() {")
    func = script[start : script.index("\n}\n", start) + 3]
    show = "; ".join(f'echo "{k}=${{{k}:-}}"' for k in POLICY_ENV)

    def run(**extra: str) -> dict[str, str]:
        out = subprocess.run(
            ["bash", "-c", f"set -euo pipefail\n{func}\nthread_policy; {show}"],
            env=_clean_env(**extra),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return dict(line.split("=", 1) for line in out.splitlines())

    assert run() == POLICY_ENV
    user = {k: "ACTIVE" for k in POLICY_ENV}
    assert run(**user) == user
    assert run(**{SWITCH: "Off"}) == {k: "" for k in POLICY_ENV}
