"""Headline figures of a run.

    python -m lfp_core.report RUN_DIR [--json]

``--json`` prints a JSON object (``schema_version``, ``run``, ``model``, ``stages``,
``base_reward``; later stages add keys); without it, a readable summary.
"""

from __future__ import annotations

import argparse
import json
import sys

from lfp_core.stages import STAGES
from lfp_core.store import SCHEMA_VERSION, RunReader, StoreError


def build_report(run_dir: str) -> dict:
    """The run's headline figures as a JSON-ready dict (stages never run are 'pending')."""
    r = RunReader(run_dir)
    info = r.run_info()
    recorded = {s.name: s.status for s in r.stages()}
    stages = {s.name: recorded.get(s.name, "pending") for s in STAGES}
    stages.update({k: v for k, v in recorded.items() if k not in stages})
    model = r.model_info("base")
    return {
        "schema_version": SCHEMA_VERSION,
        "run": {"name": info.get("name"), "preset": info.get("preset"), "dir": str(r.run_dir)},
        "model": None if model is None else {k: model[k] for k in ("name", "n_params", "n_layers", "d_model")},
        "stages": stages,
        "base_reward": r.reward_summary("base"),
    }


def format_report(rep: dict) -> str:
    """A readable multi-line summary of :func:`build_report`'s output."""
    lines = [f"LFP Explorer run {rep['run']['name']} ({rep['run']['dir']}), preset {rep['run']['preset']}"]
    m = rep["model"]
    lines.append("model: " + ("not loaded yet" if m is None else
                              f"{m['name']}: {m['n_params']:,} parameters, {m['n_layers']} layers, d_model {m['d_model']}"))
    lines.append("stages: " + ", ".join(f"{k} {v}" for k, v in rep["stages"].items()))
    b = rep["base_reward"]
    lines.append("base-model reward: " + ("not computed yet" if b is None else
                                          f"mean {b['mean']:.3f} ± {b['se']:.3f} (s.e.), n = {b['n']}"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lfp_core.report", description="Headline figures of a run.")
    ap.add_argument("run_dir")
    ap.add_argument("--json", action="store_true", help="print JSON")
    args = ap.parse_args(argv)
    try:
        rep = build_report(args.run_dir)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(rep, indent=2) if args.json else format_report(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
