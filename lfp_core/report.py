"""Headline figures of a run.

    python -m lfp_core.report RUN_DIR [--json]

Exit status: 0 on success, 2 on bad input (a missing, foreign or damaged run: one line), 1 on any
other failure (its traceback is logged).

``--json`` prints a JSON object (``schema_version``, ``run``, ``model``, ``stages``,
``base_reward``; later stages add keys); without it, a readable summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from lfp_core.errors import BadInputError
from lfp_core.settings import run_settings_of
from lfp_core.stages import stages_for
from lfp_core.store import SCHEMA_VERSION, RunReader, done_summary
from lfp_core.store.summaries import (
    AblationSummary,
    AttributionSummary,
    DivergenceSummary,
    LabelsSummary,
    ProbeRoleSummary,
    ProbesSummary,
    RewardModelSummary,
    RLEvalSummary,
    SAEsSummary,
)

log = logging.getLogger("lfp_core.report")


def build_report(run_dir: str) -> dict:
    """The run's headline figures as a JSON-ready dict (stages never run are 'pending')."""
    r = RunReader(run_dir)
    info = r.run_info()
    records = r.stages()
    recorded = {s.name: s.status for s in records}
    task = run_settings_of(info.get("config")).task
    stages = {s.name: recorded.get(s.name, "pending") for s in stages_for(task)}
    stages.update({k: v for k, v in recorded.items() if k not in stages})
    model = r.model_info("base")
    rep: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "run": {"name": info.get("name"), "preset": info.get("preset"), "task": task, "dir": str(r.run_dir)},
        "model": None if model is None else {k: model[k] for k in ("name", "n_params", "n_layers", "d_model")},
        "stages": stages,
        "base_reward": r.reward_summary("base"),
    }
    ev = done_summary(records, RLEvalSummary)
    if ev is not None:
        rep["rlhf"] = (
            {
                "reward_base": ev.reward_base,
                "reward_tuned": ev.reward_tuned,
                "difference": ev.difference,
                "kl_per_token": ev.kl_per_token,
                "distinct2_base": ev.distinct2_base,
                "distinct2_tuned": ev.distinct2_tuned,
            }
            if task == "vader"
            else {
                "eval_margin": ev.eval_margin,
                "eval_accuracy": ev.eval_accuracy,
                "train_margin": ev.train_margin,
                "train_accuracy": ev.train_accuracy,
                "n_eval": ev.n_eval,
                "n_train": ev.n_train,
            }
        )
    dv = done_summary(records, DivergenceSummary)
    if dv is not None:
        div = r.layer_divergence()
        rep["divergence"] = {
            "param": [float(x) for x in div.param],
            "activation": [float(x) for x in div.act_cos],
            "activation_rel_l2": [float(x) for x in div.act_rel_l2],
            "measure": dv.measure,
            "selected_layers": dv.selected_layers,
        }
    sa = done_summary(records, SAEsSummary)
    if sa is not None:
        table = r.saes()
        table = table[~table.kind.isin(["sweep", "rm"])]  # the preference model's SAEs are reported under reward_model
        rep["saes"] = [
            {
                "layer": int(x.layer),
                "role": x.role,
                "kind": x.kind,
                "sae_id": x.sae_id,
                "arch": x.arch,
                "d_sae": int(x.d_sae),
                **{k: float(getattr(x, k)) for k in _SAE_KEYS},
            }
            for x in table.itertuples()
        ]
        rep["sae_comparisons"] = {
            "mfr_vs_independent": sa.mfr,
            "mmcs": r.sae_pairs().drop(columns=["mmcs_max"]).to_dict("records"),
        }
    pr = done_summary(records, ProbesSummary)
    if pr is not None:
        t = pr.tuned or ProbeRoleSummary()
        probe = {
            "tau_occurrence": t.tau_occurrence,
            "tau_word": t.tau_word,
            "tau_baseline": t.tau_baseline,
            "tau_shuffled": t.tau_shuffled,
            "tau_contrastive": t.tau_contrastive,
            "sign_acc_pos": t.sign_acc_pos,
            "sign_acc_neg": t.sign_acc_neg,
            "irm": t.irm,
            "logistic": t.logistic,
            "pca_var_ratio": t.pca_var_ratio,
            "inputs": t.inputs,
        }
        rep["probe"] = {k: v for k, v in probe.items() if v is not None}
        b = pr.base or ProbeRoleSummary()
        rep["probe"]["base_model"] = {"tau_occurrence": b.tau_occurrence, "tau_word": b.tau_word}
    lb = done_summary(records, LabelsSummary)
    if lb is not None:
        rep["labels"] = {
            "labeller": lb.labeller,
            "n_labelled": lb.n_labelled,
            "n_relevant": lb.n_relevant,
            "detection_acc_mean": lb.detection_acc_mean,
            "overlap": {k: lb.overlap.get(k) for k in ("n", "p", "expected", "n_flagged", "n_probe_top", "n_labelled")},
        }
    ab = done_summary(records, AblationSummary)
    if ab is not None:
        rep["ablation"] = {
            "reward_before": ab.reward_before,
            "reward_after": ab.reward_after,
            "random_after_mean": ab.random_after_mean,
            "p": ab.p,
            "p_rank": ab.p_rank,
            "lower_than_all": ab.lower_than_all,
        }
        rep["ablation"]["sets"] = {
            name: {
                "size": x.size,
                "reward_before": x.reward_before,
                "reward_after": x.reward_after,
                "diff": x.diff,
                "diff_lo": x.diff_lo,
                "diff_hi": x.diff_hi,
                "random_after_mean": x.random_after_mean,
                "p": x.p,
                "p_rank": x.p_rank,
            }
            for name, x in ab.sets.items()
        }
    rm = done_summary(records, RewardModelSummary)
    if rm is not None and rm.pair_acc is not None and rm.pair_acc_train is not None:
        rep["reward_model"] = {
            "pair_acc": rm.pair_acc["acc"],
            "pair_acc_ci": [rm.pair_acc["lo"], rm.pair_acc["hi"]],
            "n_eval_pairs": rm.pair_acc["n"],
            "pair_acc_train": rm.pair_acc_train["acc"],
            "saes": rm.sae_stats,
        }
        at = done_summary(records, AttributionSummary)
        if at is not None and at.pm is not None:
            rep["reward_model"]["atp_true_spearman"] = at.pm["spearman_top"]["rho"]
            rep["reward_model"]["atp"] = {k: v for k, v in (("pm", at.pm), ("policy", at.policy)) if v is not None}
            rep["reward_model"]["disagreement"] = at.disagreement
    return rep


_SAE_KEYS = ("fvu", "mse", "l0", "dead_frac", "cos_sim", "l2_ratio", "ce_loss_recovered")


def format_report(rep: dict) -> str:
    """A readable multi-line summary of :func:`build_report`'s output."""
    lines = [f"LFP Explorer run {rep['run']['name']} ({rep['run']['dir']}), preset {rep['run']['preset']}"]
    m = rep["model"]
    lines.append(
        "model: "
        + (
            "not loaded yet"
            if m is None
            else f"{m['name']}: {m['n_params']:,} parameters, {m['n_layers']} layers, d_model {m['d_model']}"
        )
    )
    lines.append("stages: " + ", ".join(f"{k} {v}" for k, v in rep["stages"].items()))
    b = rep["base_reward"]
    if rep["run"].get("task", "vader") == "vader":
        lines.append(
            "base-model reward: "
            + ("not computed yet" if b is None else f"mean {b['mean']:.3f} ± {b['se']:.3f} (s.e.), n = {b['n']}")
        )
    if "rlhf" in rep and "eval_accuracy" in rep["rlhf"]:
        x = rep["rlhf"]
        lines.append(
            f"DPO implicit reward, held-out pairs: accuracy {x['eval_accuracy']:.3f}, margin "
            f"{x['eval_margin']['mean']:+.4f} ± {x['eval_margin']['se']:.4f}; training pairs: accuracy "
            f"{x['train_accuracy']:.3f}, margin {x['train_margin']['mean']:+.4f}"
        )
    elif "rlhf" in rep:
        x = rep["rlhf"]
        d = x["difference"]
        lines.append(
            f"tuned-policy reward: mean {x['reward_tuned']['mean']:.3f} ± {x['reward_tuned']['se']:.3f}; "
            f"gain {d['mean']:+.3f} (95% CI {d['ci_low']:+.3f} to {d['ci_high']:+.3f}, {d['n_se']:.1f} s.e.)"
        )
        lines.append(
            f"KL(tuned||base) per token {x['kl_per_token']:.4f}; distinct-2 base {x['distinct2_base']:.3f}, "
            f"tuned {x['distinct2_tuned']:.3f}"
        )
    if "divergence" in rep:
        v = rep["divergence"]
        lines.append("layer divergence, parameter: " + ", ".join(f"L{i} {p:.3g}" for i, p in enumerate(v["param"])))
        lines.append(
            "layer divergence, MLP-out 1 - cos: " + ", ".join(f"L{i} {p:.3g}" for i, p in enumerate(v["activation"]))
        )
        lines.append(f"selected layers (by {v['measure']}): {v['selected_layers']}")
    for x in rep.get("saes", []):
        if x["kind"] in ("main", "variant"):
            lines.append(
                f"SAE {x['sae_id']} ({x['arch']}, {x['d_sae']} features): FVU {x['fvu']:.3f}, L0 {x['l0']:.1f}, "
                f"dead {x['dead_frac']:.3f}, cos {x['cos_sim']:.3f}, loss recovered {x['ce_loss_recovered']:.1%}"
            )
    if "probe" in rep:
        p = rep["probe"]
        for split in ("occurrence", "word"):
            x = p[f"tau_{split}"]
            lines.append(
                f"probe, {split} split: Kendall τ {x['tau']:.3f} (p {x['p']:.1e}, {x['n_words']} words); base "
                f"model {p['base_model'][f'tau_{split}']['tau']:.3f}"
            )
        lines.append(
            f"probe controls: untrained map τ {p['tau_baseline']['tau']:.3f}, shuffled targets τ "
            f"{p['tau_shuffled']['tau']:.3f}; sign accuracy {p['sign_acc_pos']:.2f} (positive words), "
            f"{p['sign_acc_neg']:.2f} (negative); IRM vs reward Pearson {p['irm']['pearson']:.3f}"
        )
        for name, x in p.get("inputs", {}).items():
            if name != "sae_selected":
                lines.append(
                    f"probe on {name.replace('_', ' ')} ({x['dim']} dims): τ occurrence {x['occurrence']['tau']:.3f}, "
                    f"τ word {x['word']['tau']:.3f}"
                )
        if "logistic" in p:
            lg = p["logistic"]["imdb"]
            lines.append(
                f"IMDB pos/neg logistic probe on SAE features: {lg['acc']:.3f} (95% CI {lg['ci_low']:.3f}–"
                f"{lg['ci_high']:.3f}), raw activations {lg['raw_acc']:.3f}, majority {lg['majority_acc']:.3f}"
            )
    if "labels" in rep:
        lb, ov = rep["labels"], rep["labels"]["overlap"]
        acc = lb["detection_acc_mean"]
        lines.append(
            f"labels ({lb['labeller']}): {lb['n_labelled']} features, {lb['n_relevant']} reward-related, "
            f"detection accuracy {'n/a' if acc is None else f'{acc:.3f}'}; overlap with the probe's top "
            f"{ov['n_probe_top']}: {ov['n']} (expected {ov['expected'] or 0:.1f}, hypergeometric p "
            f"{ov['p'] if ov['p'] is not None else float('nan'):.1e})"
        )
    for name, x in rep.get("ablation", {}).get("sets", {}).items():
        ctrl = (
            ""
            if x.get("random_after_mean") is None
            else (
                f"; size-matched random sets {x['random_after_mean']:.3f} on average, p {x['p']:.3g} (rank p {x['p_rank']:.3g})"
            )
        )
        lines.append(
            f"ablation {name} ({x['size']} features): reward {x['reward_before']:.3f} -> {x['reward_after']:.3f} "
            f"(diff {x['diff']:+.3f}, 95% CI {x['diff_lo']:+.3f} to {x['diff_hi']:+.3f}){ctrl}"
        )
    if "reward_model" in rep:
        x = rep["reward_model"]
        lines.append(
            f"preference model: held-out pair accuracy {x['pair_acc']:.3f} (95% CI {x['pair_acc_ci'][0]:.3f}–"
            f"{x['pair_acc_ci'][1]:.3f}, {x['n_eval_pairs']} pairs; chance 0.5), training {x['pair_acc_train']:.3f}"
        )
        for name, a in x.get("atp", {}).items():
            lines.append(
                f"attribution ({'preference model' if name == 'pm' else 'policy probe reward'}): AtP (IG {a['steps']} "
                f"steps) vs true ablation, top {a['top_k']} features: Spearman {a['spearman_top']['rho']:.3f} "
                f"(p {a['spearman_top']['p']:.1e}); {a['spearman_points']['n']} (text, feature) points "
                f"{a['spearman_points']['rho']:.3f}"
            )
        dis = x.get("disagreement") or {}
        if dis:
            lines.append(
                f"preference model vs oracle: disagrees on {dis['n_disagree']} of {dis['n_eval']} held-out pairs"
            )
    mfr = rep.get("sae_comparisons", {}).get("mfr_vs_independent", {})
    if "mfr" in mfr and "independent" in mfr:
        a, b = mfr["mfr"], mfr["independent"]
        lines.append(
            f"MFR vs independent (L0 {a['l0']:.0f} both): MMCS {a['mmcs']:.3f} vs {b['mmcs']:.3f}, FVU "
            f"{a['fvu']:.3f} vs {b['fvu']:.3f}, loss recovered {a['ce_loss_recovered']:.1%} vs "
            f"{b['ce_loss_recovered']:.1%}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lfp_core.report", description="Headline figures of a run.")
    ap.add_argument("run_dir")
    ap.add_argument("--json", action="store_true", help="print JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        rep = build_report(args.run_dir)
        text = json.dumps(rep, indent=2) if args.json else format_report(rep)
    except BadInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception:
        log.exception("the report of %s failed", args.run_dir)
        return 1
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
