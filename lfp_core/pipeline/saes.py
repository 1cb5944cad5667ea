"""SAE stages: harvest a block hook's activations (the MLP output by default) at the selected layers, train
SAEs on them (with their quality metrics, the L1 sweep, MFR and dictionary comparisons, each SAE from its own
seed and each main SAE beside an other-seed reference) or load the SAEs given for a model
(:mod:`lfp_core.pipeline.given_saes`), and compute per-feature statistics for the dashboard."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from lfp_core import activations, features, sae_sources, saes
from lfp_core.models import continuation_decoder
from lfp_core.pipeline import given_saes
from lfp_core.pipeline.core import Context
from lfp_core.pipeline.harvest import build_corpus, stage_activations  # noqa: F401  (the activations stage)
from lfp_core.pipeline.shared import ROLES, harvest_dir, harvest_hook, harvest_summary, role_model, selected_layers
from lfp_core.settings import FeaturesStageSettings, SAEStageSettings
from lfp_core.store import RunWriter, Where, artifacts_dir, put_rows

log = logging.getLogger(__name__)


# --- SAE training ------------------------------------------------------------------------------------
def sae_jobs(
    s: SAEStageSettings, layers: list[int], d_model: int, roles: tuple[str, ...] | list[str] = ROLES
) -> list[dict]:
    """Every SAE the stage trains for the models ``roles`` (all but those whose SAEs are given), in order.

    Each SAE is initialised from its own seed, derived from the run seed and its id
    (:func:`lfp_core.saes.derive_seed`), so no two compared dictionaries share an initialisation.
    Beside each main SAE a ``reseed`` SAE of the same model, layer and settings but another seed gives
    the seed-to-seed reference that base-vs-tuned MMCS is read against. The MFR baseline
    (independent TopK SAEs of the tuned model's first layer) is the tuned main SAE and its reseed
    when the main SAEs are TopK, plus ``independent`` jobs up to ``mfr_n`` SAEs. The variants, the L1
    sweep and MFR are the tuned model's, trained only when its SAEs are trained here.
    """
    seed, suite = s.run.seed, s.sae_suite
    roles = [r for r in ROLES if r in roles]

    def spec(arch: str | None = None, expansion: int | None = None, **kw) -> saes.SAESpec:
        return saes.SAESpec.from_settings(s.sae, d_model, seed, s.run.device, arch, expansion, **kw)

    jobs: list[dict[str, Any]] = [
        {"kind": kind, "role": role, "layer": layer, "spec": spec()}
        for kind in ("main", "reseed")
        for role in roles
        for layer in layers
    ]
    if "tuned" not in roles:
        return _seeded(jobs, seed)
    for layer in layers:
        for v in suite.variants:
            jobs.append(
                {"kind": "variant", "role": "tuned", "layer": layer, "spec": spec(v.arch, v.expansion), "name": v.name}
            )
    first = layers[0]
    for c in suite.sweep_l1:
        jobs.append(
            {
                "kind": "sweep",
                "role": "tuned",
                "layer": first,
                "spec": replace(spec("relu", 1), l1=c),
                "name": f"l1={c:g}",
            }
        )
    if suite.mfr_n >= 2:
        mfr_spec = spec("topk", mfr=suite.mfr_coefficient, mfr_warm_up_frac=suite.mfr_warmup_frac)
        jobs.append({"kind": "mfr", "role": "tuned", "layer": first, "spec": mfr_spec, "n": suite.mfr_n})
        reused = len(_MAIN_KINDS) if s.sae.arch == "topk" else 0  # main and reseed are independent TopK SAEs
        for i in range(reused, suite.mfr_n):
            jobs.append(
                {"kind": "independent", "role": "tuned", "layer": first, "spec": spec("topk"), "name": f"seed{i}"}
            )
    return _seeded(jobs, seed)


def _seeded(jobs: list[dict], seed: int) -> list[dict]:
    for job in jobs:
        job["spec"] = replace(job["spec"], seed=saes.derive_seed(seed, sae_id(job)))
    return jobs


_MAIN_KINDS = ("main", "reseed")  # a model's main SAE and its other-seed reference: one id each


def job_seeds(job: dict) -> list[int]:
    """The initialisation seed of each SAE a job trains (the members of an MFR group have their own)."""
    if job["kind"] == "mfr":
        return saes.mfr_member_seeds(job["spec"], job["n"])
    return [job["spec"].seed]


def sae_id(job: dict, member: int | None = None) -> str:
    base = f"{job['role']}-L{job['layer']}-{job['kind']}"
    if job["kind"] in _MAIN_KINDS:
        return base
    s = job["spec"]
    if job["kind"] == "mfr":
        return base if member is None else f"{base}-m{member}"
    return f"{base}-{job['name']}" if job.get("name") else f"{base}-{s.arch}"


def sae_path(ctx: Context, sid: str) -> Path:
    return artifacts_dir(ctx.writer.run_dir) / "saes" / sid


def ce_sequences(ctx: Context, n_docs: int) -> list[list[int]]:
    """BOS + held-out corpus documents (not completions) for the next-token loss."""
    tok, r = ctx.model.tokenizer, ctx.writer.reader()
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    docs = r.corpus_docs(split="eval", completions=False, limit=n_docs)
    return [bos + list(t) for t in docs.token_ids]


def evaluate(ctx: Context, sae, role: str, layer: int, ce_docs: int) -> dict:
    """FVU, L0, dead fraction on the run's held-out harvest; loss recovered at the hook the SAE reads."""
    h = harvest_dir(ctx)
    idx = h.index()
    acts = h.acts(role, layer)
    m = saes.reconstruction_metrics(sae, acts, np.nonzero(idx["is_eval"])[0])
    if "ce_seqs" not in ctx.cache:
        ctx.cache["ce_seqs"] = ce_sequences(ctx, ce_docs)
    hook = sae.cfg.metadata.hook_name
    hooked, key = role_model(ctx, role).hooked(), ("ce_baseline", role, hook)
    if key not in ctx.cache:  # clean and zero-ablated losses do not depend on the SAE
        ctx.cache[key] = saes.ce_baselines(hooked, layer, ctx.cache["ce_seqs"], ctx.batch(), hook=hook)
    m.update(saes.ce_metrics(hooked, sae, layer, ctx.cache["ce_seqs"], ctx.batch(), baseline=ctx.cache[key]))
    return m


def sae_record_row(ctx: Context, job: dict, sid: str, sae, info: dict, seed: int, ce_docs: int) -> dict:
    s = job["spec"]
    path = saes.save_sae(sae, sae_path(ctx, sid))
    metrics = evaluate(ctx, sae, job["role"], job["layer"], ce_docs)
    log.info(
        "SAE %-28s FVU %.3f  L0 %.1f  dead %.3f  loss recovered %.3f  (%.1fs)",
        sid,
        metrics["fvu"],
        metrics["l0"],
        metrics["dead_frac"],
        metrics["ce_loss_recovered"],
        info["seconds"],
    )
    return {
        "sae_id": sid,
        "role": job["role"],
        "layer": job["layer"],
        "kind": job["kind"],
        **saes.sae_record(sae, s),
        "seed": seed,
        "hook_name": sae.cfg.metadata.hook_name,
        "path": str(path.relative_to(ctx.writer.run_dir)),
        "train_tokens": s.train_tokens,
        "seconds": info["seconds"],
        **{k: metrics[k] for k in _METRICS},
    }


_METRICS = (
    "mse",
    "fvu",
    "l0",
    "dead_frac",
    "dead_tokens",
    "n_eval_tokens",
    "cos_sim",
    "l2_ratio",
    "ce_clean",
    "ce_spliced",
    "ce_zero",
    "ce_loss_recovered",
    "ce_tokens",
)


def stage_saes(ctx: Context, s: SAEStageSettings, config_hash: str) -> None:
    """Train every SAE job, or load the SAEs given for a model (each committed one by one, so an interrupted
    stage resumes), then compare dictionaries (MMCS) and record which quality bars the main SAEs meet.

    Given SAEs are checked against the loaded model and the harvested hook, stored as their role's main
    SAEs and evaluated like trained ones on the run's held-out harvest; a role without given SAEs is
    trained as in a run given none (the same seeds and batches). What applies only to SAEs trained here
    (other-seed references, the paper's variants, the L1 sweep, MFR) is listed in ``not_applicable``.
    """
    w, ce_docs = ctx.writer, s.sae_suite.ce_docs
    layers = selected_layers(ctx)
    hook = harvest_hook(ctx)
    hooked = ctx.model.hooked()
    given = sae_sources.resolve_all(s.sae_source)
    sae_sources.check_given(given, sae_sources.shape_of_hooked(hooked, ctx.model.spec.name), hook)
    for role, found in given.items():
        if [g.layer for g in found] != layers:
            raise sae_sources.GivenSAEError(
                f"the given {role} SAEs read layers {[g.layer for g in found]} but the run harvested layers "
                f"{layers}; re-run the activations stage (it harvests the given SAEs' layers)"
            )
    trained = [r for r in ROLES if r not in given]
    d_model = hooked.cfg.d_model
    data_seed = {sae_id(j): s.run.seed + i for i, j in enumerate(sae_jobs(s, layers, d_model))}  # as with no SAEs given
    jobs = given_saes.given_jobs(given) + sae_jobs(s, layers, d_model, roles=trained)
    if given:
        log.info(given_saes.usage_line(s.sae_source, given, trained, layers))
    na = given_saes.not_applicable(given, trained, s.sae_suite)
    for what, why in na.items():
        log.info("saes: not computed: %s (%s)", what, why)
    h = harvest_dir(ctx)
    idx = h.index()
    train_rows = np.nonzero(~idx["is_eval"])[0]
    done = w.done_chunks("saes", config_hash)
    for ci, job in enumerate(jobs):
        if ci in done:
            continue
        if "given" in job:
            rows = [given_record_row(ctx, job, ce_docs)]
        else:
            acts = h.acts(job["role"], job["layer"])
            src = saes.ActivationSource(
                acts, train_rows, job["spec"].batch_size, seed=data_seed[sae_id(job)], layer=job["layer"]
            )
            hook_at = activations.hook_name(job["layer"], hook)
            name = f"{ctx.model.spec.name}:{job['role']}"
            if job["kind"] == "mfr":
                members, info = saes.train_mfr(job["spec"], src, hook_at, job["n"], model_name=name)
                rows = [
                    sae_record_row(ctx, job, sae_id(job, i), sae, info, member_seed, ce_docs)
                    for i, (sae, member_seed) in enumerate(zip(members, job_seeds(job)))
                ]
            else:
                sae, info = saes.train_sae(job["spec"], src, hook_at, model_name=name)
                rows = [sae_record_row(ctx, job, sae_id(job), sae, info, job["spec"].seed, ce_docs)]
        with w.transaction() as con:
            RunWriter.put_saes(con, rows)  # replaces the rows of the same sae_id
            RunWriter.add_chunk_marker(con, "saes", config_hash, ci)
    table = w.reader().saes()
    pairs = dictionary_pairs(ctx, table)
    if "base vs tuned MMCS" in na:  # one model's SAEs given, the other's trained here
        pairs = [p for p in pairs if p["comparison"] != "base_vs_tuned"]
    main = table[table.kind == "main"]
    bars = {
        r.sae_id: {
            "fvu<=0.2": bool(r.fvu <= 0.2),
            "loss_recovered>=0.8": bool(r.ce_loss_recovered >= 0.8),
            "dead<=0.2": bool(r.dead_frac <= 0.2),
        }
        for r in main.itertuples()
    }
    harvested = harvest_summary(ctx)
    ctx.commit(
        lambda con: put_rows(con, "sae_pairs", pairs),
        {
            "n_saes": len(table),
            "layers": layers,
            "bars": bars,
            "mfr": mfr_summary(table, pairs),
            "basis": basis_summary(pairs),
            "given": s.sae_source.given(),
            "trained": trained,
            "not_applicable": na,
            "layers_from": harvested.layers_from if harvested is not None else None,
        },
    )


def given_record_row(ctx: Context, job: dict, ce_docs: int) -> dict:
    """Load a given SAE, store it as its role's main SAE of its layer and evaluate it like a trained one."""
    g: sae_sources.GivenSAE = job["given"]
    sae = sae_sources.load_given(g, device=ctx.run.device)
    given_saes.adopt(sae, g, ctx.model.spec.name)
    sid = sae_id(job)
    path = saes.save_sae(sae, sae_path(ctx, sid))
    metrics = evaluate(ctx, sae, g.role, g.layer, ce_docs)
    log.info(
        "SAE %-28s given (%s): FVU %.3f  L0 %.1f  dead %.3f  loss recovered %.3f",
        sid,
        g.where,
        metrics["fvu"],
        metrics["l0"],
        metrics["dead_frac"],
        metrics["ce_loss_recovered"],
    )
    return {
        "sae_id": sid,
        "role": g.role,
        "layer": g.layer,
        "kind": "main",
        **given_saes.record(sae, g),
        "hook_name": g.hook_name,
        "path": str(path.relative_to(ctx.writer.run_dir)),
        **{k: metrics[k] for k in _METRICS},
    }


def _pair(ctx: Context, table, a: str, b: str, comparison: str, layer: int) -> dict | None:
    paths = dict(zip(table.sae_id, table.path))
    if a not in paths or b not in paths:
        return None
    da = saes.decoder(saes.load_sae(ctx.writer.run_dir / paths[a]))
    db = saes.decoder(saes.load_sae(ctx.writer.run_dir / paths[b]))
    m = saes.mmcs(da, db)
    return {
        "a": a,
        "b": b,
        "comparison": comparison,
        "layer": layer,
        "mmcs_hungarian": m["hungarian"],
        "mmcs_max": m["max"],
    }


# the per-layer basis comparisons: name -> the two SAEs' ids (templates of the layer)
BASIS_COMPARISONS = {
    "base_vs_tuned": ("base-L{}-main", "tuned-L{}-main"),
    "base_vs_base_reseed": ("base-L{}-main", "base-L{}-reseed"),
    "tuned_vs_tuned_reseed": ("tuned-L{}-main", "tuned-L{}-reseed"),
}


def mfr_baseline_ids(table, layer: int) -> list[str]:
    """The independently trained TopK SAEs of the tuned model at ``layer`` (the MFR baseline): the main
    SAE and its reseed when they are TopK, then the ``independent`` ones."""
    sel = table[(table.role == "tuned") & (table.layer == layer) & (table.arch == "topk")]
    order = {"main": 0, "reseed": 1, "independent": 2}
    sel = sel[sel.kind.isin(list(order))]
    return list(sel.assign(o=sel.kind.map(order)).sort_values(["o", "sae_id"]).sae_id)


def dictionary_pairs(ctx: Context, table) -> list[dict]:
    """MMCS between, per layer: the base and tuned main SAEs, and each main SAE and its reseed (the
    same model and settings, another seed: the chance level base-vs-tuned is read against); the 1x
    and 2x ReLU variants; the MFR members; the independently trained TopK SAEs (the MFR baseline)."""
    out = []
    ids = set(table.sae_id)
    for layer in sorted(set(table.layer)):
        for name, (a, b) in BASIS_COMPARISONS.items():
            out.append(_pair(ctx, table, a.format(layer), b.format(layer), name, layer))
        out.append(
            _pair(
                ctx, table, f"tuned-L{layer}-variant-relu-1x", f"tuned-L{layer}-variant-relu-2x", "relu_1x_vs_2x", layer
            )
        )
        mfr = sorted(i for i in ids if i.startswith(f"tuned-L{layer}-mfr-"))
        ind = mfr_baseline_ids(table, layer) if mfr else []
        for group, name in ((mfr, "mfr"), (ind, "independent")):
            for i in range(len(group)):
                for j in range(i + 1, len(group)):
                    out.append(_pair(ctx, table, group[i], group[j], name, layer))
    # one row per pair of SAEs (the store's key): the tuned main SAE and its reseed are both a basis
    # reference and an MFR-baseline pair; the row keeps its first (basis) name and mfr_summary finds it
    # by its SAEs
    seen: set[tuple[str, str]] = set()
    uniq = []
    for p in out:
        if p is not None and (p["a"], p["b"]) not in seen:
            seen.add((p["a"], p["b"]))
            uniq.append(p)
    return uniq


def basis_summary(pairs: list[dict]) -> list[dict]:
    """Per layer, base-vs-tuned MMCS (Hungarian) beside the same-model different-seed references
    (base vs base′, tuned vs tuned′). Base-vs-tuned is evidence that RL changed the basis only if it is
    below both references (``below_reference``); each reference is one pair of seeds, not an interval."""
    by = {(p["layer"], p["comparison"]): p["mmcs_hungarian"] for p in pairs}
    out = []
    for layer in sorted({p["layer"] for p in pairs}):
        vals = {name: by.get((layer, name)) for name in BASIS_COMPARISONS}
        if vals["base_vs_tuned"] is None:
            continue
        refs = [v for k, v in vals.items() if k != "base_vs_tuned" and v is not None]
        out.append(
            {
                "layer": int(layer),
                **{k: (None if v is None else float(v)) for k, v in vals.items()},
                "below_reference": (bool(vals["base_vs_tuned"] < min(refs)) if len(refs) == 2 else None),
            }
        )
    return out


def mfr_summary(table, pairs: list[dict]) -> dict:
    """MFR vs independently trained SAEs of the same layer, architecture and k (so equal L0)."""
    out = {}
    mfr_layers = sorted(set(table.layer[table.kind == "mfr"]))
    groups = {
        "mfr": table[table.kind == "mfr"],
        "independent": table[table.sae_id.isin([i for ly in mfr_layers for i in mfr_baseline_ids(table, ly)])],
    }
    for kind, sel in groups.items():
        ids = set(sel.sae_id)  # every pair among the group's SAEs, whatever name its row carries
        mm = [p["mmcs_hungarian"] for p in pairs if p["a"] in ids and p["b"] in ids and p["layer"] in mfr_layers]
        if len(sel) and mm:
            out[kind] = {
                "n": len(sel),
                "fvu": float(sel.fvu.mean()),
                "l0": float(sel.l0.mean()),
                "ce_loss_recovered": float(sel.ce_loss_recovered.mean()),
                "mmcs": float(np.mean(mm)),
            }
    return out


def stage_features(ctx: Context, s: FeaturesStageSettings, config_hash: str) -> None:
    """Per-feature statistics, examples, logit effects and neighbours of every main SAE."""
    w, tok = ctx.writer, ctx.model.tokenizer
    r = w.reader()
    main = r.saes("main")
    h = harvest_dir(ctx)
    idx = h.index()
    docs = r.corpus_docs()
    doc_tokens = {int(d): list(t) for d, t in zip(docs.doc_id, docs.token_ids)}
    src_of = dict(zip(docs.doc_id.astype(int), docs.source))
    row_source = np.array([src_of[int(d)] for d in idx["doc_id"]], dtype=object)
    piece = continuation_decoder(tok)
    vocab = [piece([i]) for i in range(ctx.model.hooked().cfg.d_vocab)]
    done = w.done_chunks("features", config_hash)
    hook = harvest_hook(ctx)
    n = 0
    for ci, row in enumerate(main.itertuples()):
        if ci in done:
            continue
        sae = saes.load_sae(w.run_dir / row.path, hook=activations.hook_name(int(row.layer), hook))  # reads the harvest
        m = role_model(ctx, row.role).hooked()
        feats, ex = features.feature_tables(
            sae,
            h.acts(row.role, row.layer),
            idx,
            doc_tokens,
            row_source,
            m.W_U,
            vocab.__getitem__,
            s.features,
            row.role,
            int(row.layer),
            seed=s.run.seed,
        )
        log.info("features of %s: %d features, %d examples", row.sae_id, len(feats), len(ex))
        with w.transaction() as con:
            RunWriter.delete_rows(con, "features", Where(role=row.role, layer=int(row.layer)))
            RunWriter.delete_rows(con, "feature_examples", Where(role=row.role, layer=int(row.layer)))
            put_rows(con, "features", feats)
            put_rows(con, "feature_examples", ex)
            RunWriter.add_chunk_marker(con, "features", config_hash, ci)
        n += len(feats)
    ctx.commit(lambda con: None, {"saes": list(main.sae_id)})
