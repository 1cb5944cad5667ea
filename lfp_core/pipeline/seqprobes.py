"""The probes stage's sequence-level part (:mod:`lfp_core.seqprobes`): every held-out completion of both
policies, each model's activations over it pooled through its own SAEs, against the completion's stored
reward; with the controls and baselines beside it, stored in ``probe_sequences`` and the stage summary.

Which probes apply follows the reward's kind (:func:`lfp_core.seqprobes.reward_kind`): a per-word lexicon
(VADER) keeps the per-token probe and gets this one beside it; any other reward gets only this one, and the
stage records why the token-level parts do not apply (:func:`lfp_core.seqprobes.not_applicable`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from lfp_core import seqprobes
from lfp_core.pipeline.core import Context
from lfp_core.pipeline.probes import _pooled, rows_by_doc
from lfp_core.pipeline.shared import ROLES, role_model
from lfp_core.settings import ProbesStageSettings

log = logging.getLogger(__name__)

POLICIES = ("base", "tuned")


@dataclass
class CompletionPoints:
    """The sequence probe's data: one entry per completion with at least one harvested token."""

    doc_id: np.ndarray  # [n] its activation-corpus document
    policy: np.ndarray  # [n] which policy wrote it (base, tuned)
    prompt_id: np.ndarray  # [n]
    sample_idx: np.ndarray  # [n]
    reward: np.ndarray  # [n] the stored reward
    rows: list[np.ndarray]  # its harvest rows (the completion's tokens only)
    test: np.ndarray  # [n] held out (by prompt)
    n_dropped: int  # completions with no harvested token

    @property
    def n_tokens(self) -> np.ndarray:
        return np.array([len(x) for x in self.rows])


def completion_points(ctx: Context, idx: dict, seed: int) -> CompletionPoints:
    """Every base and tuned completion in the activation corpus, with its reward, its harvest rows past the
    prompt and the split by prompt."""
    r = ctx.writer.reader()
    docs = r.corpus_docs(sources=tuple(f"{p}_completion" for p in POLICIES))
    reward_of = {}
    for policy in POLICIES:
        c = r.completions(policy)
        reward_of.update({(policy, int(p), int(k)): float(v) for p, k, v in zip(c.prompt_id, c.sample_idx, c.reward)})
    policy = np.array([s.removesuffix("_completion") for s in docs.source], dtype=object)
    keys = list(zip(policy, docs.prompt_id.astype(int), docs.sample_idx.astype(int)))
    missing = [k for k in keys if k not in reward_of]
    if missing:
        raise RuntimeError(f"{len(missing)} corpus completions have no stored reward (first: {missing[0]})")
    pos = idx["pos"]
    rows = [x[pos[x] >= n0] for x, n0 in zip(rows_by_doc(idx["doc_id"], docs.doc_id.astype(int)), docs.n_prefix)]
    keep = np.array([len(x) > 0 for x in rows], dtype=bool)
    prompt_id = docs.prompt_id.to_numpy(dtype=int)[keep]
    return CompletionPoints(
        doc_id=docs.doc_id.to_numpy(dtype=int)[keep],
        policy=policy[keep],
        prompt_id=prompt_id,
        sample_idx=docs.sample_idx.to_numpy(dtype=int)[keep],
        reward=np.array([reward_of[k] for k, ok in zip(keys, keep) if ok]),
        rows=[x for x, ok in zip(rows, keep) if ok],
        test=seqprobes.prompt_split(prompt_id, seed),
        n_dropped=int((~keep).sum()),
    )


def pooled_inputs(
    ctx: Context, role: str, layers: list[int], pts: CompletionPoints, token_ids: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``role``'s pooled SAE features [n, d_sae·L] and the baselines' inputs: its pooled raw activations at
    those layers, its pooled input embeddings of the completion's tokens, the token count, the policy."""
    feats, raw = _pooled(ctx, role, layers, pts.rows)
    W_E = role_model(ctx, role).hooked().W_E.detach().float().cpu().numpy()  # [d_vocab, d_model]
    embed = np.stack([W_E[token_ids[x]].mean(0) for x in pts.rows])  # [n, d_model]
    return feats, {
        "raw_selected": raw,
        "token_embedding": embed,
        "length": pts.n_tokens[:, None].astype(np.float64),
        "policy": (pts.policy == "tuned").astype(np.float64)[:, None],
    }


def sequence_probes(
    ctx: Context, s: ProbesStageSettings, layers: list[int], idx: dict
) -> tuple[dict, list[dict], list[dict]]:
    """The sequence probe on each model's features, its controls, baselines and tuned − base difference.

    Returns:
        (the summary's ``sequence`` record, probe_sequences rows, probe_features rows of the sequence probe
        fitted on the training prompts).
    """
    seed = s.run.seed
    pts = completion_points(ctx, idx, seed)
    test, y = pts.test, pts.reward
    detail: dict = {
        "reward": s.reward.spec,
        "layers": layers,
        "pooling": seqprobes.POOLING,
        "split": seqprobes.SPLIT.format(pct=0.2),
        "penalty_cv": seqprobes.PENALTY_CV,
        "n_completions": int(len(y)),
        "n_prompts": int(len(np.unique(pts.prompt_id))),
        "n_test": int(test.sum()),
        "n_test_prompts": int(len(np.unique(pts.prompt_id[test]))),
        "n_dropped": pts.n_dropped,
        "n_by_policy": {p: int((pts.policy == p).sum()) for p in POLICIES},
    }
    assert not set(pts.prompt_id[test]) & set(pts.prompt_id[~test]), "the sequence split shares a prompt"
    preds: dict[str, np.ndarray] = {}
    seq_rows: list[dict] = []
    feat_rows: list[dict] = []
    for role in ROLES:
        X, inputs = pooled_inputs(ctx, role, layers, pts, idx["token_id"])
        res, pred, model = seqprobes.sequence_probe(X, y, pts.prompt_id, test, seed, inputs, policy=pts.policy)
        detail[role], preds[role] = res, pred
        feat_rows += seqprobes.feature_rows(role, layers, X[~test], model)
        seq_rows += [
            {
                "role": role,
                "policy": pol,
                "prompt_id": int(p),
                "sample_idx": int(k),
                "reward": float(v),
                "pred": float(q),
                "n_tokens": int(n),
            }
            for pol, p, k, v, q, n in zip(
                pts.policy[test], pts.prompt_id[test], pts.sample_idx[test], y[test], pred, pts.n_tokens[test]
            )
        ]
        pr = res["probe"]
        log.info(
            "sequence probe (%s features): held-out Spearman %.3f (95%% CI over %d prompts %.3f to %.3f), τ %.3f, "
            "R² %.3f; shuffled %.3f, untrained %.3f; %s",
            role,
            pr["rho"],
            pr["n_prompts"],
            pr["lo"],
            pr["hi"],
            pr["tau"],
            pr["r2"],
            res["shuffled"]["rho"],
            res["untrained"]["rho"],
            ", ".join(f"{k} {v['rho']:.3f}" for k, v in res["inputs"].items()),
        )
    detail["difference"] = seqprobes.rho_difference(preds["tuned"], preds["base"], y[test], pts.prompt_id[test], seed)
    return detail, seq_rows, feat_rows
