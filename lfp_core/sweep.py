"""L1 sweep: the paper's sparsity/reconstruction curve for a run's activations.

    python -m lfp_core.sweep --run data/runs/demo --l1 0.1,0.3,1,3,10 [--layer 2] [--role tuned]
                             [--expansion 1] [--arch relu|tied] [--tokens 300000] [--plot sweep.html]

Trains one SAE per coefficient with sae-lens on the run's harvested activations (the run needs
its ``activations`` stage), evaluates each like the ``saes`` stage (held-out FVU, L0, dead
fraction, loss recovered), stores them in the run as ``sweep`` SAEs (the Layers & SAEs page plots
them) and prints the table. Exit status 2 on bad input (one line), 1 on any other failure (its traceback
is logged).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from lfp_core import activations, saes
from lfp_core.config import RunConfig
from lfp_core.errors import BadInputError, ConfigError
from lfp_core.pipeline import Context
from lfp_core.pipeline import saes as stage
from lfp_core.pipeline.shared import harvest_dir
from lfp_core.store import RunReader, RunWriter, StoreError
from lfp_core.store.summaries import ActivationsSummary

log = logging.getLogger("lfp_core.sweep")


def run_sweep(
    run_dir: str | Path,
    coefficients: list[float],
    layer: int | None = None,
    role: str = "tuned",
    expansion: int = 1,
    arch: str = "relu",
    tokens: int | None = None,
) -> list[dict]:
    """Train and evaluate one SAE per L1 coefficient; store and return their rows."""
    r = RunReader(run_dir)  # a missing or foreign run is an error here, never created
    writer = RunWriter(run_dir)
    harvested = r.summary(ActivationsSummary)
    if harvested is None:
        raise StoreError(
            f"{run_dir} has no harvested activations yet; run python -m lfp_core.precompute --out {run_dir}"
        )
    if arch not in ("relu", "tied"):
        raise ConfigError("the L1 sweep is for the L1-penalised architectures: relu or tied")
    cfg = RunConfig.from_dict(r.run_info()["config"])
    ctx = Context(run=cfg.run, writer=writer)
    layers = list(harvested.layers or [])
    layer = layers[0] if layer is None else layer
    activations.check_layers([layer], ctx.model.hooked().cfg.n_layers)
    if layer not in layers:
        raise BadInputError(f"layer {layer} has no harvested activations; this run harvested layers {layers}")
    h = harvest_dir(ctx)
    train_rows = np.nonzero(~h.index()["is_eval"])[0]
    base_spec = saes.SAESpec.from_settings(
        cfg.sae, ctx.model.hooked().cfg.d_model, cfg.run.seed, cfg.run.device, arch, expansion
    )
    if tokens is not None:
        base_spec = replace(base_spec, train_tokens=tokens)
    rows = []
    for i, c in enumerate(coefficients):
        job: dict[str, Any] = {
            "kind": "sweep",
            "role": role,
            "layer": layer,
            "spec": replace(base_spec, l1=c),
            "name": f"{arch}-{expansion}x-l1={c:g}" if (arch, expansion) != ("relu", 1) else f"l1={c:g}",
        }
        job["spec"] = replace(job["spec"], seed=saes.derive_seed(cfg.run.seed, stage.sae_id(job)))  # as the stage's
        src = saes.ActivationSource(
            h.acts(role, layer), train_rows, base_spec.batch_size, seed=cfg.run.seed + 500 + i, layer=layer
        )
        hook = activations.hook_name(layer, harvested.hook or activations.DEFAULT_HOOK)  # the harvested hook
        sae, info = saes.train_sae(job["spec"], src, hook, f"{ctx.model.spec.name}:{role}")
        rows.append(
            stage.sae_record_row(ctx, job, stage.sae_id(job), sae, info, job["spec"].seed, cfg.sae_suite.ce_docs)
        )
    with writer.transaction() as con:
        RunWriter.put_saes(con, rows)  # replaces the rows of the same sae_id
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lfp_core.sweep", description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--l1", required=True, help="comma-separated L1 coefficients, e.g. 0.1,0.3,1,3")
    ap.add_argument("--layer", type=int, default=None, help="default: the first selected layer")
    ap.add_argument("--role", choices=("tuned", "base"), default="tuned")
    ap.add_argument("--expansion", type=int, default=1, help="dictionary size as a multiple of d_model")
    ap.add_argument("--arch", choices=("relu", "tied"), default="relu")
    ap.add_argument("--tokens", type=int, default=None, help="training tokens per SAE (default: the run's)")
    ap.add_argument("--plot", type=Path, default=None, help="also write the curve as an HTML file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        try:
            coefs = [float(x) for x in args.l1.split(",") if x.strip()]
        except ValueError:
            coefs = []
        if not coefs or any(c <= 0 for c in coefs):
            raise ConfigError(f"--l1 {args.l1!r}: needs one or more positive numbers, comma-separated")
        rows = run_sweep(args.run, coefs, args.layer, args.role, args.expansion, args.arch, args.tokens)
    except BadInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception:
        log.exception("the L1 sweep of %s failed", args.run)
        return 1
    print(f"{'L1':>8} {'L0':>8} {'FVU':>7} {'MSE':>8} {'dead':>6} {'recovered':>9}")
    for x in sorted(rows, key=lambda x: x["l1_coefficient"]):
        print(
            f"{x['l1_coefficient']:>8g} {x['l0']:>8.1f} {x['fvu']:>7.3f} {x['mse']:>8.4f} {x['dead_frac']:>6.3f} "
            f"{x['ce_loss_recovered']:>9.1%}"
        )
    if args.plot:
        import pandas as pd

        from lfp_core.viz import l1_sweep_chart

        l1_sweep_chart(pd.DataFrame(rows)).write_html(args.plot)
        print(f"curve written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
