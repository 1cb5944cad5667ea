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
from collections.abc import Mapping
from typing import Any

from lfp_core import diffreport, seqreport
from lfp_core.errors import BadInputError
from lfp_core.rewards import parse_spec
from lfp_core.settings import reward_settings_of, run_settings_of
from lfp_core.stages import stages_for
from lfp_core.store import SCHEMA_VERSION, RunReader, done_summary
from lfp_core.store.summaries import (
    AblationSummary,
    ActivationsSummary,
    AttributionSummary,
    BaseSamplesSummary,
    DivergenceSummary,
    LabelsSummary,
    ProbeRoleSummary,
    ProbesSummary,
    PromptsSummary,
    RewardModelSummary,
    RLEvalSummary,
    RLHFSummary,
    SAEsSummary,
)

log = logging.getLogger("lfp_core.report")


def run_reward(config: Mapping[str, Any] | None, records: list) -> dict:
    """The reward a run used: ``{spec, name, kind}`` from its config, the name as the base_samples stage
    recorded it once that stage is done (a classifier's default label is resolved only on loading)."""
    spec = reward_settings_of(dict(config) if isinstance(config, Mapping) else None).spec
    parsed = parse_spec(spec)
    bs = done_summary(records, BaseSamplesSummary)
    name = (bs.reward_info or {}).get("name") if bs is not None else None
    return {"spec": spec, "name": name or parsed.name, "kind": parsed.kind}


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
        "run": {
            "name": info.get("name"),
            "preset": info.get("preset"),
            "task": task,
            "dir": str(r.run_dir),
            "reward": run_reward(info.get("config"), records),
        },
        "model": None if model is None else {k: model[k] for k in ("name", "n_params", "n_layers", "d_model")},
        "stages": stages,
        "base_reward": r.reward_summary("base"),
    }
    inputs = {
        "prompts": getattr(done_summary(records, PromptsSummary), "source", None),
        "corpus": getattr(done_summary(records, ActivationsSummary), "source", None),
    }
    if any(inputs.values()):
        rep["inputs"] = {k: v for k, v in inputs.items() if v}
    rl = done_summary(records, RLHFSummary)
    if rl is not None:  # a given pair (nothing trained here: no RL curve) or the policy trained here
        rep["tuned_model"] = (
            {"given": rl.given} if rl.given else {"trained_by": "GRPO" if task == "vader" else "DPO", "steps": rl.steps}
        )
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
        rep["rlhf"]["given"] = rl.given if rl is not None else None
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
            "basis": [dict(b) for b in sa.basis],  # per layer: base vs tuned beside base vs base′, tuned vs tuned′
            "mmcs": r.sae_pairs().drop(columns=["mmcs_max"]).to_dict("records"),
        }
        harvest = done_summary(records, ActivationsSummary)
        hook = (harvest.hook if harvest is not None else None) or "hook_mlp_out"
        if sa.given or hook != "hook_mlp_out":  # what the run was given (absent from a run that trained its SAEs)
            rep["sae_source"] = {
                "hook": hook,
                "given": dict(sa.given),
                "trained": list(sa.trained),
                "layers_from": sa.layers_from,
                "not_applicable": dict(sa.not_applicable),
            }
    pr = done_summary(records, ProbesSummary)
    if pr is not None and (pr.tuned is None or pr.tuned.tau_occurrence is None):  # no token probe: not a lexicon
        t = pr.tuned or ProbeRoleSummary()
        rep["probe"] = {k: v for k, v in (("logistic", t.logistic), ("pca_var_ratio", t.pca_var_ratio)) if v}
    elif pr is not None:
        t = pr.tuned or ProbeRoleSummary()
        probe = {
            "tau_occurrence": t.tau_occurrence,
            "tau_word": t.tau_word,
            "tau_baseline": t.tau_baseline,
            "tau_shuffled": t.tau_shuffled,
            "contrastive_probe": t.contrastive_probe,
            "sign_acc_pos": t.sign_acc_pos,
            "sign_acc_neg": t.sign_acc_neg,
            "irm": t.irm,
            "logistic": t.logistic,
            "pca_var_ratio": t.pca_var_ratio,
            "inputs": t.inputs,
            "word_split_by": pr.word_split_by,
            "penalty_cv": pr.penalty_cv,
            "tau_difference": pr.tau_difference,
        }
        rep["probe"] = {k: v for k, v in probe.items() if v is not None}
        b = pr.base or ProbeRoleSummary()
        rep["probe"]["base_model"] = {"tau_occurrence": b.tau_occurrence, "tau_word": b.tau_word}
    if pr is not None and pr.sequence:
        rep["probe"]["sequence"] = pr.sequence  # schema 6: pooled SAE features → each completion's reward
        rep["probe"]["feature_ranking"] = pr.feature_ranking
    lb = done_summary(records, LabelsSummary)
    if lb is not None:
        rep["labels"] = {
            "labeller": lb.labeller,
            "n_labelled": lb.n_labelled,
            "n_relevant": lb.n_relevant,
            "detection_acc_mean": lb.detection_acc_mean,
            "n_score_docs": lb.n_score_docs,  # held-out scoring text (None: a run before schema 5)
            "n_not_detection_scored": lb.n_not_detection_scored,
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
                "n": x.n,
                "hypothesis": x.hypothesis,
                "rank_n": x.rank_n,
                "rank_diff": x.rank_diff,
                "n_random": x.n_random,
                "random_median": x.random_median,
                "random_lo": x.random_lo,
                "random_hi": x.random_hi,
                "p_min": x.p_min,
            }
            for name, x in ab.sets.items()
        }
    rm = done_summary(records, RewardModelSummary)
    if rm is not None and rm.pair_acc is not None and rm.pair_acc_train is not None:
        rep["reward_model"] = {
            "pair_acc": rm.pair_acc["acc"],
            "pair_acc_ci": [rm.pair_acc["lo"], rm.pair_acc["hi"]],
            "n_eval_pairs": rm.pair_acc["n"],
            "n_eval_prompts": rm.pair_acc.get("n_prompts"),
            "pair_acc_ci_method": rm.pair_acc.get("method"),
            "pair_acc_train": rm.pair_acc_train["acc"],
            "saes": rm.sae_stats,
        }
        at = done_summary(records, AttributionSummary)
        if at is not None and at.pm is not None:
            rep["reward_model"]["atp_true_spearman"] = at.pm["spearman_top"]["rho"]
            rep["reward_model"]["atp"] = {k: v for k, v in (("pm", at.pm), ("policy", at.policy)) if v is not None}
            # per target, AtP and the path estimate vs true ablation, on the top features and the random sample
            rep["reward_model"]["atp_checks"] = {k: at.check_rows(k) for k in rep["reward_model"]["atp"]}
            rep["reward_model"]["disagreement"] = at.disagreement
    diffing = diffreport.diffing_section(r, records)  # schema 7: crosscoders, patching, lens, causal checks
    if diffing is not None:
        rep["diffing"] = diffing
    skipped = not_applicable(records)
    if skipped:
        rep["not_applicable"] = skipped
    return rep


def not_applicable(records: list) -> dict[str, dict[str, str]]:
    """``{stage: {what: reason}}``: what the finished stages skipped for this run (e.g. the lexicon
    readings under a sequence reward) and why."""
    return {
        r.name: dict(r.summary.not_applicable)
        for r in records
        if r.status == "done" and r.summary is not None and r.summary.not_applicable
    }


_INPUT_NAMES = {
    "token_embedding": "token identity (the token's input embedding → the same ridge)",
    "raw_selected": "raw MLP outputs the SAEs read → the same ridge",
    "diff_means_raw": "difference of means of the raw MLP outputs (positive − negative words), projection",
    "raw_all_layers": "raw MLP outputs of every layer → the same ridge",
}
_SAE_KEYS = ("fvu", "mse", "l0", "dead_frac", "cos_sim", "l2_ratio", "ce_loss_recovered")


def _label_lines(lb: dict) -> list[str]:
    """The labels stage's figures, each with what it tests."""
    ov, acc = lb["overlap"], lb["detection_acc_mean"]
    offline = str(lb["labeller"]).startswith("offline")
    held = lb.get("n_score_docs")
    where = (
        f"held-out windows ({held} documents holding none of the probe's points, never a feature's own "
        "top-example documents)"
        if held is not None
        else "windows that may share documents with the explainer's and the probe's (a run before schema 5)"
    )
    windows = "held-out activating windows" if held is not None else "its windows"
    relevance = (
        f"Spearman of activation with |VADER valence| on {windows}"
        if offline
        else "the LLM's reading of the explanation"
    )
    unscored = lb.get("n_not_detection_scored")
    return [
        f"labels ({lb['labeller']}): {lb['n_labelled']} features, {lb['n_relevant']} reward-related ({relevance}); "
        f"detection accuracy {'n/a' if acc is None else f'{acc:.3f}'} (chance 0.5) on {where}"
        + (f"; {unscored} features not detection-scored (no held-out activating window)" if unscored else ""),
        f"labels: overlap of the reward-related with the probe's top {ov['n_probe_top']}: {ov['n']} (expected "
        f"{ov['expected'] or 0:.1f}, hypergeometric p {ov['p'] if ov['p'] is not None else float('nan'):.1e}); "
        + (
            "both read word valence: consistency between two readings of valence, not independent validation"
            if offline
            else "the LLM judges explanations written from top examples, the probe reads word valence"
        ),
    ]


def _ablation_line(name: str, x: dict) -> str:
    """One tested ablation set: its effect with CI, and (schema 5) its matched random controls' distribution
    and the one-sided rank p with the number of controls and the hypothesised direction."""
    head = f"ablation {name} ({x['size']} features"
    if x.get("hypothesis"):
        head += f"; hypothesis: zeroing them {x['hypothesis']}s the reward"
    body = (
        f"): reward {x['reward_before']:.3f} -> {x['reward_after']:.3f} (diff {x['diff']:+.3f}, 95% CI "
        f"{x['diff_lo']:+.3f} to {x['diff_hi']:+.3f}"
    )
    if x.get("rank_diff") is not None and x.get("n_random"):
        return (
            f"{head}{body}, {x['n']} prefixes); on the first {x['rank_n']}: {x['rank_diff']:+.3f} vs {x['n_random']} "
            f"random sets matched in size per layer and activation mass, median {x['random_median']:+.3f} (range "
            f"{x['random_lo']:+.3f} to {x['random_hi']:+.3f}); rank p {x['p_rank']:.3g} (one-sided, N={x['n_random']}, "
            f"smallest attainable {x['p_min']:.3g})"
        )
    if x.get("random_after_mean") is not None:  # a run of schema 4: 5 random sets, bootstrap over prefixes
        return (
            f"{head}{body}); size-matched random sets {x['random_after_mean']:.3f} on average, p {x['p']:.3g} "
            f"(rank p {x['p_rank']:.3g})"
        )
    return f"{head}{body})"


def attribution_lines(name: str, a: dict, rows: list[dict]) -> list[str]:
    """The attribution check of one target (``pm`` or ``policy``): AtP and the path estimate side by side
    against true ablation, on the top features by |AtP| and on the random sample (``rows``:
    ``AttributionSummary.check_rows``)."""
    if not rows:  # runs before schema 5: layer-wide integrated gradients, top features only
        return [
            f"attribution ({'preference model' if name == 'pm' else 'policy probe reward'}): layer-wide "
            f"integrated gradients ({a['steps']} steps) vs true ablation, top {a['top_k']} features: Spearman "
            f"{a['spearman_top']['rho']:.3f} (p {a['spearman_top']['p']:.1e}); {a['spearman_points']['n']} "
            f"(text, feature) points {a['spearman_points']['rho']:.3f}"
        ]
    target = "preference model reward" if name == "pm" else "policy's expected next-token valence"
    lines = [
        f"attribution ({target}): single-feature estimates vs true ablation of one feature, over {a['n_texts']} "
        f"texts (means over texts; non-negligible: |true| >= {a['rel_floor_share']:.0%} of the sample's largest)"
    ]
    for c in rows:
        p = f"p {c['p']:.1e}" if c["p"] > 0 else "p < 1e-300"  # (scipy's p underflows to 0)
        recall = (
            f", recall of the true top {c['k']} {c['recall']:.2f} (chance {c['recall_chance']:.2f})"
            if "recall" in c
            else ""
        )
        lines.append(
            f"  {c['sample']}, {c['estimator']}: Spearman {c['rho']:.3f} "
            f"({p}, {c['n']} features; "
            f"sign-only {c['rho_sign_only']:.3f}); over the {c['n_rel']} non-negligible: sign agreement "
            f"{c['sign_agree']:.2f}, median relative error {c['median_rel_err']:.3g}{recall}"
        )
    return lines


def format_report(rep: dict) -> str:
    """A readable multi-line summary of :func:`build_report`'s output."""
    lines = [f"LFP Explorer run {rep['run']['name']} ({rep['run']['dir']}), preset {rep['run']['preset']}"]
    rw = rep["run"].get("reward")
    if rw and rep["run"].get("task", "vader") == "vader":
        lines.append(f"reward: {rw['name']} (--reward {rw['spec']}; {rw['kind']})")
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
    for stage, skipped in rep.get("not_applicable", {}).items():
        lines += [f"not applicable ({stage}, {what}): {why}" for what, why in skipped.items()]
    if rep.get("inputs"):
        lines.append(
            "texts: "
            + "; ".join(
                f"{'prompts' if k == 'prompts' else 'activation corpus'} from {v}" for k, v in rep["inputs"].items()
            )
        )
    tm = rep.get("tuned_model")
    if tm and tm.get("given"):
        lines.append(
            f"tuned model: given: {tm['given']} (not trained here, so there is no RL training curve or per-step "
            "reward; the evaluation below compares the given pair)"
        )
    elif tm:
        lines.append(f"tuned model: trained here by {tm['trained_by']}, {tm['steps']} steps")
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
            f"gain {d['mean']:+.3f} (95% CI {d['ci_low']:+.3f} to {d['ci_high']:+.3f}, {d['n_se']:.1f} s.e.; "
            f"{d.get('method') or 'paired t-test'})"
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
    src = rep.get("sae_source")
    if src:
        given = ", ".join(f"{role} {where}" for role, where in src["given"].items()) or "none"
        lines.append(
            f"SAEs read {src['hook']}; given: {given}; trained here: {', '.join(src['trained']) or 'none'}"
            + (f"; layers: {src['layers_from']}" if src["given"] else "")
        )
        lines += [f"not computed: {what} ({why})" for what, why in src["not_applicable"].items()]
    for x in rep.get("saes", []):
        if x["kind"] in ("main", "variant"):
            lines.append(
                f"SAE {x['sae_id']} ({x['arch']}, {x['d_sae']} features): FVU {x['fvu']:.3f}, L0 {x['l0']:.1f}, "
                f"dead {x['dead_frac']:.3f}, cos {x['cos_sim']:.3f}, loss recovered {x['ce_loss_recovered']:.1%}"
            )
    if "probe" in rep and "tau_occurrence" in rep["probe"]:
        p = rep["probe"]
        cv = p.get("penalty_cv") or {}
        how = {"occurrence": "positions", "word": "words, no test word sharing a stem with a training word"}
        if p.get("word_split_by") != "stem":
            how["word"] = "words"  # a run from before schema 5: split by word only
        if "tau_occurrence" in p:  # the per-token probe (absent under a sequence reward: not_applicable)
            for split in ("occurrence", "word"):
                x, diff = p[f"tau_{split}"], (p.get("tau_difference") or {}).get(split)
                lines.append(
                    f"probe, {split} split (80/20 over {how[split]}"
                    + (f"; penalty by {cv[split]}" if split in cv else "")
                    + f"): Kendall τ {x['tau']:.3f} (p {x['p']:.1e}, {x['n_words']} words); base model "
                    f"{p['base_model'][f'tau_{split}']['tau']:.3f}"
                    + (
                        f"; tuned − base {diff['diff']:+.3f} ({diff['level']:.0%} bootstrap CI over words "
                        f"{diff['lo']:+.3f} to {diff['hi']:+.3f})"
                        if diff
                        else ""
                    )
                )
            lines.append(
                f"probe controls: untrained map τ {p['tau_baseline']['tau']:.3f}, shuffled targets τ "
                f"{p['tau_shuffled']['tau']:.3f}; sign accuracy {p['sign_acc_pos']:.2f} (positive words), "
                f"{p['sign_acc_neg']:.2f} (negative); IRM vs reward Pearson {p['irm']['pearson']:.3f}"
            )
            for name, x in p.get("inputs", {}).items():
                if name != "sae_selected":
                    lines.append(
                        f"baseline: {_INPUT_NAMES.get(name, name.replace('_', ' '))} ({x['dim']} dims): τ occurrence "
                        f"{x['occurrence']['tau']:.3f}, τ word {x['word']['tau']:.3f} (p {x['word']['p']:.1e}); "
                        f"SAE probe {p['tau_occurrence']['tau']:.3f}, {p['tau_word']['tau']:.3f}"
                    )
        ct = p.get("contrastive_probe")
        if ct:
            lines.append(
                f"contrastive probe (ridge on F(x) − F(x with a neutral word), fitted on training words): τ "
                f"{ct['tau']:.3f} (p {ct['p']:.1e}) on {ct['n_words']} held-out words"
            )
    if "probe" in rep:
        p = rep["probe"]
        if "imdb" in p.get("logistic", {}):
            lg = p["logistic"]["imdb"]
            lines.append(
                f"IMDB pos/neg logistic probe on SAE features: {lg['acc']:.3f} (95% CI {lg['ci_low']:.3f}–"
                f"{lg['ci_high']:.3f}), raw activations {lg['raw_acc']:.3f}, majority {lg['majority_acc']:.3f}"
            )
        if p.get("sequence"):
            lines += seqreport.sequence_lines(p["sequence"])
    if "labels" in rep:
        lines += _label_lines(rep["labels"])
    for name, x in rep.get("ablation", {}).get("sets", {}).items():
        lines.append(_ablation_line(name, x))
    if "reward_model" in rep:
        x = rep["reward_model"]
        lines.append(
            f"preference model: held-out pair accuracy {x['pair_acc']:.3f} (95% CI {x['pair_acc_ci'][0]:.3f}–"
            f"{x['pair_acc_ci'][1]:.3f}, {x['n_eval_pairs']} pairs"
            + (f" from {x['n_eval_prompts']} prompts" if x.get("n_eval_prompts") else "")
            + f", CI {x.get('pair_acc_ci_method') or 'Wilson over pairs'}; chance 0.5), "
            f"training {x['pair_acc_train']:.3f}"
        )
        for name, a in x.get("atp", {}).items():
            lines += attribution_lines(name, a, x.get("atp_checks", {}).get(name, []))
        dis = x.get("disagreement") or {}
        if dis:
            lines.append(
                f"preference model vs oracle: disagrees on {dis['n_disagree']} of {dis['n_eval']} held-out pairs"
            )
    for b in rep.get("sae_comparisons", {}).get("basis", []):
        lines.append(basis_line(b))
    mfr = rep.get("sae_comparisons", {}).get("mfr_vs_independent", {})
    if "mfr" in mfr and "independent" in mfr:
        a, b = mfr["mfr"], mfr["independent"]
        lines.append(
            f"MFR vs independent (L0 {a['l0']:.0f} both): MMCS {a['mmcs']:.3f} vs {b['mmcs']:.3f}, FVU "
            f"{a['fvu']:.3f} vs {b['fvu']:.3f}, loss recovered {a['ce_loss_recovered']:.1%} vs "
            f"{b['ce_loss_recovered']:.1%}"
        )
    if "diffing" in rep:
        lines += diffreport.diffing_lines(rep["diffing"])
    return "\n".join(lines)


def basis_line(b: dict) -> str:
    """One layer's base-vs-tuned MMCS beside its same-model different-seed references, with the reading."""

    def f(x) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    head = (
        f"layer {b['layer']} MMCS (Hungarian): base vs tuned {f(b['base_vs_tuned'])}; same model, another seed: "
        f"base vs base′ {f(b.get('base_vs_base_reseed'))}, tuned vs tuned′ {f(b.get('tuned_vs_tuned_reseed'))}"
    )
    return head + " — " + basis_reading(b)


def basis_reading(b: Mapping[str, Any]) -> str:
    """What one layer's base-vs-tuned MMCS says against its two other-seed references. Each reference is
    a single pair of seeds, so the seed-to-seed spread is not measured (the two references' difference is
    the only hint of it): base vs tuned below both is reported with its margin as a hint, never as a
    finding; at or above either reference it is no evidence at all."""
    if b.get("below_reference") is None:
        return "no other-seed reference: base vs tuned cannot be read"
    refs = [b["base_vs_base_reseed"], b["tuned_vs_tuned_reseed"]]
    if b["below_reference"]:
        return (
            f"below both references by {min(refs) - b['base_vs_tuned']:.3f} (the references differ by "
            f"{abs(refs[0] - refs[1]):.3f}); one seed pair each, so the seed-to-seed spread is not measured: "
            "a hint that RL changed the basis, not a finding"
        )
    return "not below both references: no evidence that RL changed the basis beyond seed-to-seed variation"


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
