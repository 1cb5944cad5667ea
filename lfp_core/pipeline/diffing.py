"""The crosscoders stage (model diffing): for the fine-tune and, where the run has one, the null fine-tune
control, at each studied layer: a BatchTopK crosscoder over (base, other) activations of the same tokens
(:mod:`lfp_core.crosscoder`), its latents' relative decoder norms, latent scaling and classes
(:mod:`lfp_core.latent_scaling`), and a difference SAE (sae-lens TopK) on other − base. Every dictionary's
latents also get the features tables' rows (roles ``cc_tuned``, ``cc_null``, ``dsae_tuned``, ``dsae_null``),
so the Feature page shows any of them.

"other" is the tuned model for pair ``tuned`` and the null model for pair ``null``. The null model's
activations are harvested here, on the activation corpus's documents (the same tokens as the base and tuned
harvest), into ``artifacts/diffing/null``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from lfp_core import activations, crosscoder, crosscoder_metrics, features, latent_scaling, saes
from lfp_core.errors import BadInputError
from lfp_core.models import continuation_decoder
from lfp_core.pipeline.core import Context
from lfp_core.pipeline.null import null_policy
from lfp_core.pipeline.shared import (
    harvest_dir,
    harvest_hook,
    role_model,
    run_reward,
    selected_layers,
    special_tokens,
)
from lfp_core.settings import DiffingSettings, DiffingStageSettings
from lfp_core.store import RunWriter, Where, artifacts_dir, put_rows
from lfp_core.store.summaries import NullSummary

log = logging.getLogger(__name__)
CE_DOCS = 32  # held-out corpus documents for the loss-recovered figures (the SAEs' default)


def diffing_dir(ctx: Context) -> Path:
    return artifacts_dir(ctx.writer.run_dir) / "diffing"


def pairs_of(ctx: Context) -> list[str]:
    """``["tuned"]`` plus ``"null"`` when the run has a null model."""
    s = ctx.writer.reader().summary(NullSummary)
    return ["tuned"] + (["null"] if s is not None and s.recipe not in (None, "none") else [])


def other_model(ctx: Context, pair: str):
    return role_model(ctx, "tuned") if pair == "tuned" else null_policy(ctx)


def corpus_docs(ctx: Context) -> list[activations.Doc]:
    """The activation corpus as the activations stage built it (doc id order is its construction order, so
    a harvest of these documents has the stored index's row order)."""
    df = ctx.writer.reader().corpus_docs()
    return [
        activations.Doc(int(d), str(src), str(sp), [int(t) for t in ids])
        for d, src, sp, ids in zip(df.doc_id, df.source, df.split, df.token_ids)
    ]


def other_acts(ctx: Context, pair: str, layer: int) -> np.ndarray:
    if pair == "tuned":
        return harvest_dir(ctx).acts("tuned", layer)
    return activations.Harvest(diffing_dir(ctx)).acts("null", layer)


def harvest_null(ctx: Context, s: DiffingStageSettings, layers: list[int]) -> dict:
    """Harvest the null model at the studied layers' hook over the activation corpus (same rows as the
    base and tuned harvest: checked)."""
    tok = ctx.model.tokenizer
    hook = harvest_hook(ctx)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    out = diffing_dir(ctx)
    info = activations.harvest_role(
        null_policy(ctx).hooked(),
        corpus_docs(ctx),
        layers,
        out,
        "null",
        bos,
        special_tokens(tok),
        batch_size=ctx.batch(),
        device=s.run.device,
        hook_of=lambda layer: activations.hook_name(layer, hook),
    )
    n = harvest_dir(ctx).n_rows()
    if info["rows"] != n:
        raise RuntimeError(f"the null harvest has {info['rows']} rows, the activation corpus {n}: not the same tokens")
    return info


class _PairView:
    """Rows of two activation arrays side by side ([n, 2·d]): what the features tables read for a crosscoder."""

    def __init__(self, a: np.ndarray, b: np.ndarray):
        self.a, self.b = a, b
        self.shape = (a.shape[0], a.shape[1] * 2)

    def __getitem__(self, idx):
        return np.concatenate([np.asarray(self.a[idx], np.float32), np.asarray(self.b[idx], np.float32)], axis=-1)


class _DiffView:
    """other − base rows ([n, d]): what a difference SAE reads."""

    def __init__(self, a: np.ndarray, b: np.ndarray):
        self.a, self.b = a, b
        self.shape = a.shape

    def __getitem__(self, idx):
        return np.asarray(self.b[idx], np.float32) - np.asarray(self.a[idx], np.float32)


class _CrosscoderAsSAE:
    """A crosscoder seen as an SAE over [base ‖ other] rows: encode reads both halves, ``W_dec`` is the other
    model's decoder (logit effects and neighbours are the other model's)."""

    def __init__(self, cc):
        self.cc = cc
        self.d_in = int(cc.W_dec.shape[-1])
        self.cfg = type("Cfg", (), {"d_sae": int(cc.W_dec.shape[0])})()
        self.device = torch.device("cpu")
        self.W_dec = (cc.W_dec[:, 1, :] / cc.scale[1]).detach()  # raw units

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.cc.encode(x.reshape(x.shape[0], 2, self.d_in))


def _spec(d: DiffingSettings, d_model: int, seed: int) -> crosscoder.CrosscoderSpec:
    return crosscoder.CrosscoderSpec(
        d_sae=d.expansion * d_model,
        k=d.k,
        lr=d.lr,
        batch_size=d.batch_size,
        train_tokens=d.train_tokens,
        seed=seed,
        arch=d.arch,
        l1=d.l1,
        device="cpu",
    )


def _reward_signal(ctx: Context, s: DiffingStageSettings) -> np.ndarray | None:
    """Per vocabulary token, its lexicon valence (the reward signal a latent is correlated with), or None for a
    reward that is not a per-word lexicon."""
    from lfp_core import reward as vader

    if run_reward(ctx, s.reward.spec).kind != "lexicon":
        return None
    key = "token_valence"
    if key not in ctx.cache:
        ctx.cache[key] = np.asarray(
            vader.token_valence_table(ctx.model.tokenizer, ctx.model.hooked().cfg.d_vocab), np.float64
        )
    return ctx.cache[key]


@torch.no_grad()
def reward_correlation(code_of, rows: np.ndarray, token_ids: np.ndarray, valence: np.ndarray) -> np.ndarray:
    """Pearson correlation, per latent, between its activation and the valence of the token it reads, over
    ``rows`` (held out); NaN for a latent that never fires there. ``code_of(rows) -> [n, d_sae]``."""
    v = valence[token_ids[rows]]
    sx = sxx = sxy = None
    n = len(rows)
    for start in range(0, n, 8192):
        f = code_of(rows[start : start + 8192]).double()
        vv = torch.from_numpy(v[start : start + 8192]).double()
        if sx is None:
            sx, sxx, sxy = f.sum(0), (f * f).sum(0), (f * vv[:, None]).sum(0)
        else:
            sx, sxx, sxy = sx + f.sum(0), sxx + (f * f).sum(0), sxy + (f * vv[:, None]).sum(0)
    assert sx is not None and sxx is not None and sxy is not None
    mv, vv_var = float(v.mean()), float(v.var())
    cov = sxy / n - sx / n * mv
    var = sxx / n - (sx / n) ** 2
    den = torch.sqrt(var.clamp_min(0) * vv_var)
    out = torch.where(den > 0, cov / den.clamp_min(1e-30), torch.full_like(cov, float("nan")))
    return out.numpy()


def _feature_rows(ctx: Context, s: DiffingStageSettings, sae_like, acts, role: str, layer: int, W_U):
    r = ctx.writer.reader()
    h = harvest_dir(ctx)
    idx = h.index()
    if "doc_tokens" not in ctx.cache:
        docs = r.corpus_docs()
        ctx.cache["doc_tokens"] = {int(d): list(t) for d, t in zip(docs.doc_id, docs.token_ids)}
        src_of = dict(zip(docs.doc_id.astype(int), docs.source))
        ctx.cache["row_source"] = np.array([src_of[int(d)] for d in idx["doc_id"]], dtype=object)
        piece = continuation_decoder(ctx.model.tokenizer)
        ctx.cache["vocab"] = [piece([i]) for i in range(ctx.model.hooked().cfg.d_vocab)]
    return features.feature_tables(
        sae_like,
        acts,
        idx,
        ctx.cache["doc_tokens"],
        ctx.cache["row_source"],
        W_U,
        ctx.cache["vocab"].__getitem__,
        s.features,
        role,
        layer,
        seed=s.run.seed,
    )


def _ce(ctx: Context, hooked_base, hooked_other, cc, hook_name: str) -> dict:
    from lfp_core.pipeline.saes import ce_sequences

    if "diff_ce_seqs" not in ctx.cache:
        ctx.cache["diff_ce_seqs"] = ce_sequences(ctx, CE_DOCS)
    return crosscoder_metrics.ce_recovered(
        hooked_base, hooked_other, cc, hook_name, ctx.cache["diff_ce_seqs"], ctx.batch()
    )


def train_pair_layer(ctx: Context, s: DiffingStageSettings, pair: str, layer: int) -> tuple[list, list, list, list]:
    """One pair at one layer: the crosscoder and the difference SAE, their records, latents and features rows."""
    d = s.diffing
    h = harvest_dir(ctx)
    idx = h.index()
    train_rows, eval_rows = np.nonzero(~idx["is_eval"])[0], np.nonzero(idx["is_eval"])[0]
    a, b = h.acts("base", layer), other_acts(ctx, pair, layer)
    d_model = int(a.shape[1])
    hook = harvest_hook(ctx)
    hook_name = activations.hook_name(layer, hook)
    seed = saes.derive_seed(s.run.seed, "crosscoder", layer)  # the same for both pairs: only the data differ
    out = diffing_dir(ctx)
    out.mkdir(parents=True, exist_ok=True)
    base_m, other_m = role_model(ctx, "base"), other_model(ctx, pair)
    valence = _reward_signal(ctx, s)
    tokens = idx["token_id"]
    records, latents, frows, exrows = [], [], [], []

    # -- crosscoder
    spec = _spec(d, d_model, seed)
    cc, info = crosscoder.train_crosscoder(
        spec, crosscoder.PairedSource(a, b, train_rows, d.batch_size, seed, layer=layer)
    )
    cid = f"cc_{pair}_L{layer}"
    path = crosscoder.save_crosscoder(cc, out / f"{cid}.pt")
    stats = crosscoder_metrics.latent_stats(cc, a, b, eval_rows)
    rec = crosscoder_metrics.reconstruction(cc, a, b, eval_rows)
    rec["fvu"] = (rec["fvu_base"], rec["fvu_other"])
    scale = latent_scaling.latent_scaling(cc, crosscoder.pair_batches(a, b, eval_rows))
    classes = classify(stats, scale, d)
    ce_out = _ce(ctx, base_m.hooked(), other_m.hooked(), cc, hook_name)
    ce = [{**ce_out[slot], "recovered": ce_out[slot]["ce_loss_recovered"]} for slot in ("base", "other")]
    view = _CrosscoderAsSAE(cc)
    role = f"cc_{pair}"
    feats, ex = _feature_rows(ctx, s, view, _PairView(a, b), role, layer, other_m.hooked().W_U)
    frows += feats
    exrows += ex
    corr = (
        reward_correlation(
            lambda rows: view.encode(torch.from_numpy(_PairView(a, b)[rows])), eval_rows, tokens, valence
        )
        if valence is not None
        else np.full(view.cfg.d_sae, np.nan)
    )
    counts = {c: int((classes == c).sum()) for c in CLASSES}
    records.append(
        {
            "dict_id": cid,
            "kind": "crosscoder",
            "pair": pair,
            "layer": layer,
            "role": role,
            "hook_name": hook_name,
            "arch": d.arch,
            "d_sae": spec.d_sae,
            "k": d.k,
            "seed": seed,
            "path": str(path.relative_to(ctx.writer.run_dir)),
            "train_tokens": d.train_tokens,
            "seconds": info["seconds"],
            "tokens_per_s": info["tokens_per_s"],
            "n_eval_tokens": len(eval_rows),
            "l0": float(rec["l0"]),
            "dead_frac": float((stats["density"] == 0).mean()),
            "fvu_base": rec["fvu"][0],
            "fvu_other": rec["fvu"][1],
            **{f"{k}_base": ce[0][k] for k in ("ce_clean", "ce_spliced", "ce_zero")},
            "recovered_base": ce[0]["recovered"],
            **{f"{k}_other": ce[1][k] for k in ("ce_clean", "ce_spliced", "ce_zero")},
            "recovered_other": ce[1]["recovered"],
            "n_shared": counts["shared"],
            "n_base_only": counts["base-only"],
            "n_tuned_only": counts["tuned-only"],  # not robust (the classes are exclusive)
            "n_robust": counts["robust tuned-only"],
            "n_dead": counts["dead"],
        }
    )
    by_feat = {f["feature"]: f for f in feats}
    for i in range(spec.d_sae):
        f = by_feat[i]
        latents.append(
            {
                "dict_id": cid,
                "latent": i,
                "kind": "crosscoder",
                "pair": pair,
                "layer": layer,
                "role": role,
                "rel_norm": float(stats["rel_norm"][i]),
                "dec_cos": float(stats["dec_cos"][i]),
                "norm_base": float(stats["norm_base"][i]),
                "norm_other": float(stats["norm_other"][i]),
                "density": float(stats["density"][i]),
                "density_base_text": f["freq_base_text"],
                "density_other_text": f["freq_tuned_text"],
                "mean_act": _finite(stats["mean_act_active"][i]),  # when firing, as the features tables
                **{k: _finite(scale[k][i]) for k in ("beta_eps_base", "beta_eps_other", "beta_r_base", "beta_r_other")},
                "nu_eps": _finite(scale["nu_eps"][i]),
                "nu_r": _finite(scale["nu_r"][i]),
                "class": str(classes[i]),
                "reward_corr": _finite(corr[i]),
                "top_tokens": f["top_tokens"],
            }
        )
    log.info(
        "crosscoder %s: FVU base %.3f / %s %.3f, loss recovered %.3f / %.3f; %s (%.1fs, %.0f tokens/s)",
        cid,
        rec["fvu"][0],
        pair,
        rec["fvu"][1],
        ce[0]["recovered"],
        ce[1]["recovered"],
        ", ".join(f"{k} {v}" for k, v in counts.items()),
        info["seconds"],
        info["tokens_per_s"],
    )

    # -- difference SAE (sae-lens TopK on other − base)
    dspec = saes.SAESpec(
        arch="topk",
        d_sae=d.expansion * d_model,
        k=d.k,
        lr=saes.SAESpec().lr,
        train_tokens=d.train_tokens,
        batch_size=d.batch_size,
        seed=saes.derive_seed(s.run.seed, "diff_sae", layer),
        device=s.run.device,
    )
    dsae, dinfo = saes.train_sae(
        dspec,
        crosscoder.DifferenceSource(a, b, train_rows, d.batch_size, dspec.seed, layer=layer),
        hook_name,
        ctx.model.spec.name,
    )
    did = f"dsae_{pair}_L{layer}"
    dpath = saes.save_sae(dsae, out / did)
    dview = _DiffView(a, b)
    dm = saes.reconstruction_metrics(dsae, dview, eval_rows)  # type: ignore[arg-type]  # an array-like view
    drole = f"dsae_{pair}"
    dfeats, dex = _feature_rows(ctx, s, dsae, dview, drole, layer, other_m.hooked().W_U)
    frows += dfeats
    exrows += dex
    dcorr = (
        reward_correlation(lambda rows: dsae.encode(torch.from_numpy(dview[rows])).float(), eval_rows, tokens, valence)
        if valence is not None
        else np.full(dspec.d_sae, np.nan)
    )
    records.append(
        {
            "dict_id": did,
            "kind": "diff_sae",
            "pair": pair,
            "layer": layer,
            "role": drole,
            "hook_name": hook_name,
            "arch": "topk",
            "d_sae": dspec.d_sae,
            "k": d.k,
            "seed": dspec.seed,
            "path": str(Path(dpath).relative_to(ctx.writer.run_dir)),
            "train_tokens": d.train_tokens,
            "seconds": dinfo["seconds"],
            "tokens_per_s": dinfo["tokens_per_s"],
            "n_eval_tokens": len(eval_rows),
            "l0": dm.get("l0"),
            "dead_frac": dm.get("dead_frac"),
            "fvu_other": dm.get("fvu"),
        }
    )
    for f in dfeats:
        i = int(f["feature"])
        latents.append(
            {
                "dict_id": did,
                "latent": i,
                "kind": "diff_sae",
                "pair": pair,
                "layer": layer,
                "role": drole,
                "density": f["density"],
                "density_base_text": f["freq_base_text"],
                "density_other_text": f["freq_tuned_text"],
                "mean_act": f["mean_act"],
                "reward_corr": _finite(dcorr[i]),
                "top_tokens": f["top_tokens"],
            }
        )
    log.info("difference SAE %s: FVU %.3f of other − base (%.1fs)", did, dm.get("fvu", float("nan")), dinfo["seconds"])
    return records, latents, frows, exrows


CLASSES = ("shared", "base-only", "tuned-only", "robust tuned-only", "dead")


def classify(stats: dict, scale: dict, d: DiffingSettings) -> np.ndarray:
    """Each latent's class: tuned-only (relative norm > ``diffing.tuned_only``), robust tuned-only (also ν^ε
    and ν^r in [-0.1, ``diffing.nu_max``)), base-only (< 1 − ``tuned_only``), shared (in between), dead (never
    fires on the held-out tokens, or both decoders zero)."""
    th = latent_scaling.ClassThresholds(
        tuned_only_min=d.tuned_only,
        base_only_max=1.0 - d.tuned_only,
        shared_band=0.5,  # everything between base-only and tuned-only is shared
        nu_eps_max=d.nu_max,
        nu_r_max=d.nu_max,
    )
    out = np.asarray(latent_scaling.classify(stats["rel_norm"], scale["nu_eps"], scale["nu_r"], th), dtype=object)
    out[(np.asarray(stats["density"]) == 0) | ~np.isfinite(np.asarray(stats["rel_norm"], float))] = "dead"
    return out


def _finite(x) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def crosscoder_layers(ctx: Context, s: DiffingStageSettings) -> list[int]:
    """The layers to train at: ``diffing.layers``, each of which must have the paired (base and tuned) harvest."""
    harvested = selected_layers(ctx)
    if s.diffing.layers == "auto":
        return harvested
    missing = [int(x) for x in s.diffing.layers if int(x) not in harvested]
    if missing:
        raise BadInputError(
            f"diffing.layers asks for layer(s) {missing} but the activations stage harvested base and tuned "
            f"activations ({harvest_hook(ctx)}) only at layers {harvested}: a crosscoder needs both models' "
            "activations on the same tokens there; choose among those layers, or harvest more (n_selected_layers)"
        )
    return sorted({int(x) for x in s.diffing.layers})


def stage_crosscoders(ctx: Context, s: DiffingStageSettings, config_hash: str) -> None:
    """Chunk 0: the null model's harvest (when the run has a null model); then one chunk per (pair, layer)."""
    w = ctx.writer
    layers = crosscoder_layers(ctx, s)
    pairs = pairs_of(ctx)
    done = w.done_chunks("crosscoders", config_hash)
    if "null" in pairs and 0 not in done:
        info = harvest_null(ctx, s, layers)
        log.info("null harvest: %d rows at layers %s", info["rows"], layers)
        with w.transaction() as con:
            RunWriter.add_chunk_marker(con, "crosscoders", config_hash, 0)
    jobs = [(p, layer) for p in pairs for layer in layers]
    for ci, (pair, layer) in enumerate(jobs, start=1):
        if ci in done:
            continue
        records, latents, frows, exrows = train_pair_layer(ctx, s, pair, layer)
        with w.transaction() as con:
            for role in {r["role"] for r in records}:
                RunWriter.delete_rows(con, "features", Where(role=role, layer=layer))
                RunWriter.delete_rows(con, "feature_examples", Where(role=role, layer=layer))
            for r in records:
                RunWriter.delete_rows(con, "diff_latents", Where(dict_id=r["dict_id"]))
                RunWriter.delete_rows(con, "diff_dictionaries", Where(dict_id=r["dict_id"]))
            put_rows(con, "diff_dictionaries", records)
            put_rows(con, "diff_latents", latents)
            put_rows(con, "features", frows)
            put_rows(con, "feature_examples", exrows)
            RunWriter.add_chunk_marker(con, "crosscoders", config_hash, ci)
    table = w.reader().diff_dictionaries()
    counts: dict[str, dict[str, dict]] = {}
    for r in table[table.kind == "crosscoder"].itertuples():
        counts.setdefault(str(r.pair), {})[str(int(r.layer))] = {
            "shared": int(r.n_shared),
            "base_only": int(r.n_base_only),
            "tuned_only": int(r.n_tuned_only),
            "robust": int(r.n_robust),
            "dead": int(r.n_dead),
            "d_sae": int(r.d_sae),
        }
    ns = w.reader().summary(NullSummary)
    detail: dict = {
        "layers": layers,
        "hook": harvest_hook(ctx),
        "pairs": pairs,
        "dictionaries": list(table.dict_id),
        "counts": counts,
        "thresholds": {
            "tuned_only": s.diffing.tuned_only,
            "base_only": 1 - s.diffing.tuned_only,
            "nu_max": s.diffing.nu_max,
        },
        "null_recipe": ns.recipe if ns is not None else None,
    }
    if "null" not in pairs:
        detail["not_applicable"] = {
            "null control": (ns.not_applicable.get("null control") if ns else None) or "no null model"
        }
    if _reward_signal(ctx, s) is None:
        detail.setdefault("not_applicable", {})["reward correlation"] = (
            "the reward is not a per-word lexicon, so latents are not correlated with a token valence"
        )
    ctx.commit(lambda con: None, detail)
