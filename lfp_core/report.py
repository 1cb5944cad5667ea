"""Headline figures of a run.

    python -m lfp_core.report RUN_DIR [--json]

``--json`` prints a JSON object (``schema_version``, ``run``, ``model``, ``stages``,
``base_reward``; later stages add keys); without it, a readable summary.
"""

from __future__ import annotations

import argparse
import json
import sys

from lfp_core.pipeline import stages_for
from lfp_core.store import SCHEMA_VERSION, RunReader, StoreError


def build_report(run_dir: str) -> dict:
    """The run's headline figures as a JSON-ready dict (stages never run are 'pending')."""
    r = RunReader(run_dir)
    info = r.run_info()
    records = {s.name: s for s in r.stages()}
    recorded = {s.name: s.status for s in records.values()}
    task = info.get("config", {}).get("task", "vader")
    stages = {s.name: recorded.get(s.name, "pending") for s in stages_for(task)}
    stages.update({k: v for k, v in recorded.items() if k not in stages})
    model = r.model_info("base")
    rep = {
        "schema_version": SCHEMA_VERSION,
        "run": {"name": info.get("name"), "preset": info.get("preset"), "task": task, "dir": str(r.run_dir)},
        "model": None if model is None else {k: model[k] for k in ("name", "n_params", "n_layers", "d_model")},
        "stages": stages,
        "base_reward": r.reward_summary("base"),
    }
    ev = records.get("rl_eval")
    if ev is not None and ev.status == "done":
        d = ev.detail
        keys = ("reward_base", "reward_tuned", "difference", "kl_per_token", "distinct2_base", "distinct2_tuned") \
            if task == "vader" else ("eval_margin", "eval_accuracy", "train_margin", "train_accuracy", "n_eval", "n_train")
        rep["rlhf"] = {k: d[k] for k in keys}
    dv = records.get("divergence")
    if dv is not None and dv.status == "done":
        div = r.layer_divergence()
        rep["divergence"] = {"param": [float(x) for x in div.param], "activation": [float(x) for x in div.act_cos],
                             "activation_rel_l2": [float(x) for x in div.act_rel_l2],
                             "measure": dv.detail.get("measure"), "selected_layers": dv.detail.get("selected_layers")}
    st = records.get("saes")
    if st is not None and st.status == "done":
        table = r.saes()
        table = table[~table.kind.isin(["sweep", "rm"])]  # the preference model's SAEs are reported under reward_model
        rep["saes"] = [{"layer": int(x.layer), "role": x.role, "kind": x.kind, "sae_id": x.sae_id, "arch": x.arch,
                        "d_sae": int(x.d_sae), **{k: float(getattr(x, k)) for k in _SAE_KEYS}}
                       for x in table.itertuples()]
        rep["sae_comparisons"] = {"mfr_vs_independent": st.detail.get("mfr", {}),
                                  "mmcs": r.sae_pairs().drop(columns=["mmcs_max"]).to_dict("records")}
    pr = records.get("probes")
    if pr is not None and pr.status == "done":
        t = pr.detail.get("tuned", {})
        keys = ("tau_occurrence", "tau_word", "tau_baseline", "tau_shuffled", "tau_contrastive", "sign_acc_pos",
                "sign_acc_neg", "irm", "logistic", "pca_var_ratio", "inputs")
        rep["probe"] = {k: t[k] for k in keys if k in t}
        rep["probe"]["base_model"] = {k: pr.detail.get("base", {}).get(k) for k in ("tau_occurrence", "tau_word")}
    lb = records.get("labels")
    if lb is not None and lb.status == "done":
        d = lb.detail
        rep["labels"] = {"labeller": d.get("labeller"), "n_labelled": d.get("n_labelled"), "n_relevant": d.get("n_relevant"),
                         "detection_acc_mean": d.get("detection_acc_mean"),
                         "overlap": {k: d.get("overlap", {}).get(k) for k in ("n", "p", "expected", "n_flagged",
                                                                               "n_probe_top", "n_labelled")}}
    ab = records.get("ablation")
    if ab is not None and ab.status == "done":
        d = ab.detail
        rep["ablation"] = {k: d.get(k) for k in ("reward_before", "reward_after", "random_after_mean", "p", "p_rank",
                                                 "lower_than_all")}
        rep["ablation"]["sets"] = {name: {k: x.get(k) for k in ("size", "reward_before", "reward_after", "diff", "diff_lo",
                                                                "diff_hi", "random_after_mean", "p", "p_rank")}
                                   for name, x in d.get("sets", {}).items()}
    rm = records.get("reward_model")
    if rm is not None and rm.status == "done":
        d = rm.detail
        rep["reward_model"] = {"pair_acc": d["pair_acc"]["acc"], "pair_acc_ci": [d["pair_acc"]["lo"], d["pair_acc"]["hi"]],
                               "n_eval_pairs": d["pair_acc"]["n"], "pair_acc_train": d["pair_acc_train"]["acc"],
                               "saes": {k: v for k, v in d.get("saes", {}).items() if k != "harvest"}}
        at = records.get("attribution")
        if at is not None and at.status == "done":
            a = at.detail
            rep["reward_model"]["atp_true_spearman"] = a["pm"]["spearman_top"]["rho"]
            rep["reward_model"]["atp"] = {k: a[k] for k in ("pm", "policy") if k in a}
            rep["reward_model"]["disagreement"] = a.get("disagreement")
    return rep


_SAE_KEYS = ("fvu", "mse", "l0", "dead_frac", "cos_sim", "l2_ratio", "ce_loss_recovered")


def format_report(rep: dict) -> str:
    """A readable multi-line summary of :func:`build_report`'s output."""
    lines = [f"LFP Explorer run {rep['run']['name']} ({rep['run']['dir']}), preset {rep['run']['preset']}"]
    m = rep["model"]
    lines.append("model: " + ("not loaded yet" if m is None else
                              f"{m['name']}: {m['n_params']:,} parameters, {m['n_layers']} layers, d_model {m['d_model']}"))
    lines.append("stages: " + ", ".join(f"{k} {v}" for k, v in rep["stages"].items()))
    b = rep["base_reward"]
    if rep["run"].get("task", "vader") == "vader":
        lines.append("base-model reward: " + ("not computed yet" if b is None else
                                              f"mean {b['mean']:.3f} ± {b['se']:.3f} (s.e.), n = {b['n']}"))
    if "rlhf" in rep and "eval_accuracy" in rep["rlhf"]:
        x = rep["rlhf"]
        lines.append(f"DPO implicit reward, held-out pairs: accuracy {x['eval_accuracy']:.3f}, margin "
                     f"{x['eval_margin']['mean']:+.4f} ± {x['eval_margin']['se']:.4f}; training pairs: accuracy "
                     f"{x['train_accuracy']:.3f}, margin {x['train_margin']['mean']:+.4f}")
    elif "rlhf" in rep:
        x = rep["rlhf"]
        d = x["difference"]
        lines.append(f"tuned-policy reward: mean {x['reward_tuned']['mean']:.3f} ± {x['reward_tuned']['se']:.3f}; "
                     f"gain {d['mean']:+.3f} (95% CI {d['ci_low']:+.3f} to {d['ci_high']:+.3f}, {d['n_se']:.1f} s.e.)")
        lines.append(f"KL(tuned||base) per token {x['kl_per_token']:.4f}; distinct-2 base {x['distinct2_base']:.3f}, "
                     f"tuned {x['distinct2_tuned']:.3f}")
    if "divergence" in rep:
        v = rep["divergence"]
        lines.append("layer divergence, parameter: " + ", ".join(f"L{i} {p:.3g}" for i, p in enumerate(v["param"])))
        lines.append("layer divergence, MLP-out 1 - cos: " + ", ".join(f"L{i} {p:.3g}" for i, p in enumerate(v["activation"])))
        lines.append(f"selected layers (by {v['measure']}): {v['selected_layers']}")
    for x in rep.get("saes", []):
        if x["kind"] in ("main", "variant"):
            lines.append(f"SAE {x['sae_id']} ({x['arch']}, {x['d_sae']} features): FVU {x['fvu']:.3f}, L0 {x['l0']:.1f}, "
                         f"dead {x['dead_frac']:.3f}, cos {x['cos_sim']:.3f}, loss recovered {x['ce_loss_recovered']:.1%}")
    if "probe" in rep:
        p = rep["probe"]
        for split in ("occurrence", "word"):
            x = p[f"tau_{split}"]
            lines.append(f"probe, {split} split: Kendall τ {x['tau']:.3f} (p {x['p']:.1e}, {x['n_words']} words); base "
                         f"model {p['base_model'][f'tau_{split}']['tau']:.3f}")
        lines.append(f"probe controls: untrained map τ {p['tau_baseline']['tau']:.3f}, shuffled targets τ "
                     f"{p['tau_shuffled']['tau']:.3f}; sign accuracy {p['sign_acc_pos']:.2f} (positive words), "
                     f"{p['sign_acc_neg']:.2f} (negative); IRM vs reward Pearson {p['irm']['pearson']:.3f}")
        for name, x in p.get("inputs", {}).items():
            if name != "sae_selected":
                lines.append(f"probe on {name.replace('_', ' ')} ({x['dim']} dims): τ occurrence {x['occurrence']['tau']:.3f}, "
                             f"τ word {x['word']['tau']:.3f}")
        if "logistic" in p:
            lg = p["logistic"]["imdb"]
            lines.append(f"IMDB pos/neg logistic probe on SAE features: {lg['acc']:.3f} (95% CI {lg['ci_low']:.3f}–"
                         f"{lg['ci_high']:.3f}), raw activations {lg['raw_acc']:.3f}, majority {lg['majority_acc']:.3f}")
    if "labels" in rep:
        lb, ov = rep["labels"], rep["labels"]["overlap"]
        acc = lb["detection_acc_mean"]
        lines.append(f"labels ({lb['labeller']}): {lb['n_labelled']} features, {lb['n_relevant']} reward-related, "
                     f"detection accuracy {'n/a' if acc is None else f'{acc:.3f}'}; overlap with the probe's top "
                     f"{ov['n_probe_top']}: {ov['n']} (expected {ov['expected'] or 0:.1f}, hypergeometric p "
                     f"{ov['p'] if ov['p'] is not None else float('nan'):.1e})")
    for name, x in rep.get("ablation", {}).get("sets", {}).items():
        ctrl = "" if x.get("random_after_mean") is None else (
            f"; size-matched random sets {x['random_after_mean']:.3f} on average, p {x['p']:.3g} (rank p {x['p_rank']:.3g})")
        lines.append(f"ablation {name} ({x['size']} features): reward {x['reward_before']:.3f} -> {x['reward_after']:.3f} "
                     f"(diff {x['diff']:+.3f}, 95% CI {x['diff_lo']:+.3f} to {x['diff_hi']:+.3f}){ctrl}")
    if "reward_model" in rep:
        x = rep["reward_model"]
        lines.append(f"preference model: held-out pair accuracy {x['pair_acc']:.3f} (95% CI {x['pair_acc_ci'][0]:.3f}–"
                     f"{x['pair_acc_ci'][1]:.3f}, {x['n_eval_pairs']} pairs; chance 0.5), training {x['pair_acc_train']:.3f}")
        for name, a in x.get("atp", {}).items():
            lines.append(f"attribution ({'preference model' if name == 'pm' else 'policy probe reward'}): AtP (IG {a['steps']} "
                         f"steps) vs true ablation, top {a['top_k']} features: Spearman {a['spearman_top']['rho']:.3f} "
                         f"(p {a['spearman_top']['p']:.1e}); {a['spearman_points']['n']} (text, feature) points "
                         f"{a['spearman_points']['rho']:.3f}")
        dis = x.get("disagreement") or {}
        if dis:
            lines.append(f"preference model vs oracle: disagrees on {dis['n_disagree']} of {dis['n_eval']} held-out pairs")
    mfr = rep.get("sae_comparisons", {}).get("mfr_vs_independent", {})
    if "mfr" in mfr and "independent" in mfr:
        a, b = mfr["mfr"], mfr["independent"]
        lines.append(f"MFR vs independent (L0 {a['l0']:.0f} both): MMCS {a['mmcs']:.3f} vs {b['mmcs']:.3f}, FVU "
                     f"{a['fvu']:.3f} vs {b['fvu']:.3f}, loss recovered {a['ce_loss_recovered']:.1%} vs "
                     f"{b['ce_loss_recovered']:.1%}")
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
