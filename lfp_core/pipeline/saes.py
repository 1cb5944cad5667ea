"""SAE stages: harvest MLP-output activations at the selected layers, train SAEs on them (with
their quality metrics, the L1 sweep, MFR and dictionary comparisons), and compute per-feature
statistics for the dashboard."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from lfp_core import activations, corpora, features, saes
from lfp_core.pipeline.core import Context, Stage
from lfp_core.pipeline.rl import tuned_policy
from lfp_core.store import RunWriter, artifacts_dir, put_rows

log = logging.getLogger(__name__)

ROLES = ("tuned", "base")


def selected_layers(ctx: Context) -> list[int]:
    df = ctx.writer.reader().layer_divergence()
    layers = sorted(int(x) for x in df.layer[df.selected])
    if not layers:
        raise RuntimeError("the divergence stage selected no layers; run it first")
    activations.check_layers(layers, ctx.model.hooked().cfg.n_layers)
    return layers


def role_model(ctx: Context, role: str):
    return ctx.model if role == "base" else tuned_policy(ctx)


def harvest_dir(ctx: Context) -> activations.Harvest:
    return activations.Harvest(artifacts_dir(ctx.writer.run_dir) / "activations")


def _special(tok) -> set[int]:
    return {t for t in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if t is not None}


def build_corpus(ctx: Context) -> tuple[list[activations.Doc], str]:
    """Held-out IMDB reviews (first ``sae_doc_tokens`` tokens) or model-sampled documents, then
    every base and tuned completion (prompt + completion). Every ``sae_eval_every``-th document
    is held out from SAE training."""
    cfg, tok, r = ctx.cfg, ctx.model.tokenizer, ctx.writer.reader()
    texts: list[tuple[str, list[int], dict]] = []
    try:
        reviews, where = corpora.imdb_reviews(cfg.data_dir, ("test",))
        pool = sorted(reviews["test"], key=lambda x: x.doc_id)
        pick = np.random.default_rng([cfg.seed, 41]).permutation(len(pool))
        for i in pick:
            ids = tok(pool[int(i)].text[: cfg.sae_doc_tokens * 12], add_special_tokens=False)["input_ids"]
            if len(ids) >= 16:
                texts.append(("imdb", ids[: cfg.sae_doc_tokens], {"label": pool[int(i)].label}))
            if len(texts) >= cfg.sae_corpus_docs:
                break
    except FileNotFoundError as exc:
        from lfp_core.sampling import sample_batch

        log.warning("IMDB not reachable (%s): sampling the activation corpus from the base model", exc)
        where = "model-sampled"
        for start in range(0, cfg.sae_corpus_docs, cfg.gen_batch_size):
            n = min(cfg.gen_batch_size, cfg.sae_corpus_docs - start)
            for ids in sample_batch(ctx.model, [[] for _ in range(n)], cfg.sae_doc_tokens,
                                    seed=cfg.seed * 31 + start, allow_eos=False):
                texts.append(("model_sampled", list(ids), {}))
    prompts = r.prompts("eval")
    ids_of = dict(zip(prompts.prompt_id.astype(int), prompts.token_ids))
    for role in ("base", "tuned"):
        c = r.completions(role)
        texts += [(f"{role}_completion", list(ids_of[int(p)]) + list(t),
                   {"prompt_id": int(p), "sample_idx": int(s), "n_prefix": len(ids_of[int(p)])})
                  for p, s, t in zip(c.prompt_id, c.sample_idx, c.token_ids)]
    docs = [activations.Doc(i, src, "eval" if i % cfg.sae_eval_every == 0 else "train", [int(t) for t in ids], **meta)
            for i, (src, ids, meta) in enumerate(texts)]
    return docs, where


def stage_activations(ctx: Context, config_hash: str) -> None:
    """Harvest ``blocks.L.hook_mlp_out`` of the tuned and the base model at the selected layers."""
    cfg, tok = ctx.cfg, ctx.model.tokenizer
    layers = selected_layers(ctx)
    docs, where = build_corpus(ctx)
    h = harvest_dir(ctx)
    special = _special(tok)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    idx = activations.write_index(h.root, docs, special)
    detail: dict = {"layers": layers, "source": where, "n_docs": len(docs), "n_rows": int(len(idx["doc_id"])),
                    "n_train_rows": int((~idx["is_eval"]).sum()), "n_eval_rows": int(idx["is_eval"].sum())}
    for role in ROLES:
        m = role_model(ctx, role)
        detail[role] = activations.harvest_role(m.hooked(), docs, layers, h.root, role, bos, special,
                                                batch_size=ctx.batch(), device=cfg.device)
    rows = [{"doc_id": d.doc_id, "source": d.source, "split": d.split, "n_tokens": len(d.token_ids),
             "token_ids": d.token_ids, "text": tok.decode(d.token_ids), "label": d.label, "prompt_id": d.prompt_id,
             "sample_idx": d.sample_idx, "n_prefix": d.n_prefix} for d in docs]
    log.info("activation corpus: %d documents from %s, %d rows (%d held out) at layers %s", len(docs), where,
             detail["n_rows"], detail["n_eval_rows"], layers)
    vocab = [{"token_id": i, "text": tok.decode([i])} for i in range(ctx.model.hooked().cfg.d_vocab)]

    def write(con):
        put_rows(con, "act_docs", rows)
        put_rows(con, "vocab", vocab)

    ctx.commit(write, detail)


# --- SAE training ------------------------------------------------------------------------------------
def _spec(cfg, d_model: int, arch: str | None = None, expansion: int | None = None, **kw) -> saes.SAESpec:
    arch = arch or cfg.sae_arch
    return saes.SAESpec(arch=arch, d_sae=(expansion or cfg.sae_expansion) * d_model, k=cfg.sae_k, l1=cfg.sae_l1,
                        lr=cfg.sae_lr, train_tokens=cfg.sae_train_tokens, batch_size=cfg.sae_batch_size,
                        seed=cfg.seed, device=cfg.device, **kw)


def sae_jobs(cfg, layers: list[int], d_model: int) -> list[dict]:
    """Every SAE the stage trains, in order (the chunk index of a job is its position)."""
    jobs = [{"kind": "main", "role": role, "layer": layer, "spec": _spec(cfg, d_model)}
            for role in ROLES for layer in layers]
    for layer in layers:
        for arch, mult in cfg.variants():
            jobs.append({"kind": "variant", "role": "tuned", "layer": layer,
                         "spec": _spec(cfg, d_model, arch, mult), "name": f"{arch}-{mult}x"})
    first = layers[0]
    for c in cfg.sweep_l1():
        jobs.append({"kind": "sweep", "role": "tuned", "layer": first,
                     "spec": replace(_spec(cfg, d_model, "relu", 1), l1=c), "name": f"l1={c:g}"})
    if cfg.mfr_n >= 2:
        mfr_spec = _spec(cfg, d_model, "topk", mfr=cfg.mfr_coefficient, mfr_warm_up_frac=cfg.mfr_warmup_frac)
        jobs.append({"kind": "mfr", "role": "tuned", "layer": first, "spec": mfr_spec, "n": cfg.mfr_n})
        for i in range(1, cfg.mfr_n):  # the main SAE (seed 0) is the first independent one
            jobs.append({"kind": "independent", "role": "tuned", "layer": first,
                         "spec": replace(_spec(cfg, d_model, "topk"), seed=cfg.seed + i), "name": f"seed{i}"})
    return jobs


def sae_id(job: dict, member: int | None = None) -> str:
    s = job["spec"]
    base = f"{job['role']}-L{job['layer']}-{job['kind']}"
    if job["kind"] == "main":
        return base
    if job["kind"] == "mfr":
        return f"{base}-m{member}"
    return f"{base}-{job['name']}" if job.get("name") else f"{base}-{s.arch}"


def sae_path(ctx: Context, sid: str) -> Path:
    return artifacts_dir(ctx.writer.run_dir) / "saes" / sid


def ce_sequences(ctx: Context) -> list[list[int]]:
    """BOS + held-out corpus documents (not completions) for the next-token loss."""
    tok, r = ctx.model.tokenizer, ctx.writer.reader()
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    docs = r.query("SELECT token_ids FROM act_docs WHERE split = 'eval' AND source NOT LIKE '%_completion' "
                   "ORDER BY doc_id LIMIT ?", [ctx.cfg.sae_ce_docs])
    return [bos + list(t) for t in docs.token_ids]


def evaluate(ctx: Context, sae, role: str, layer: int) -> dict:
    h = harvest_dir(ctx)
    idx = h.index()
    acts = h.acts(role, layer)
    m = saes.reconstruction_metrics(sae, acts, np.nonzero(idx["is_eval"])[0])
    if "ce_seqs" not in ctx.cache:
        ctx.cache["ce_seqs"] = ce_sequences(ctx)
    hooked, key = role_model(ctx, role).hooked(), ("ce_baseline", role, layer)
    if key not in ctx.cache:  # clean and zero-ablated losses do not depend on the SAE
        ctx.cache[key] = saes.ce_baselines(hooked, layer, ctx.cache["ce_seqs"], ctx.batch())
    m.update(saes.ce_metrics(hooked, sae, layer, ctx.cache["ce_seqs"], ctx.batch(), baseline=ctx.cache[key]))
    return m


def _record(ctx: Context, job: dict, sid: str, sae, info: dict, seed: int) -> dict:
    s = job["spec"]
    path = saes.save_sae(sae, sae_path(ctx, sid))
    metrics = evaluate(ctx, sae, job["role"], job["layer"])
    log.info("SAE %-28s FVU %.3f  L0 %.1f  dead %.3f  loss recovered %.3f  (%.1fs)", sid, metrics["fvu"],
             metrics["l0"], metrics["dead_frac"], metrics["ce_loss_recovered"], info["seconds"])
    return {"sae_id": sid, "role": job["role"], "layer": job["layer"], "kind": job["kind"],
            **saes.sae_record(sae, s), "seed": seed, "hook_name": activations.hook_name(job["layer"]),
            "path": str(path.relative_to(ctx.writer.run_dir)), "train_tokens": s.train_tokens,
            "seconds": info["seconds"], **{k: metrics[k] for k in _METRICS}}


_METRICS = ("mse", "fvu", "l0", "dead_frac", "dead_tokens", "n_eval_tokens", "cos_sim", "l2_ratio", "ce_clean",
            "ce_spliced", "ce_zero", "ce_loss_recovered", "ce_tokens")


def stage_saes(ctx: Context, config_hash: str) -> None:
    """Train every SAE job (committed one by one, so an interrupted stage resumes), then compare
    dictionaries (MMCS) and record which quality bars the main SAEs meet."""
    cfg, w = ctx.cfg, ctx.writer
    layers = selected_layers(ctx)
    h = harvest_dir(ctx)
    idx = h.index()
    train_rows = np.nonzero(~idx["is_eval"])[0]
    jobs = sae_jobs(cfg, layers, ctx.model.hooked().cfg.d_model)
    done = w.done_chunks("saes", config_hash)
    for ci, job in enumerate(jobs):
        if ci in done:
            continue
        acts = h.acts(job["role"], job["layer"])
        src = saes.ActivationSource(acts, train_rows, job["spec"].batch_size, seed=cfg.seed + ci, layer=job["layer"])
        hook = activations.hook_name(job["layer"])
        name = f"{ctx.model.spec.name}:{job['role']}"
        if job["kind"] == "mfr":
            members, info = saes.train_mfr(job["spec"], src, hook, job["n"], model_name=name)
            rows = [_record(ctx, job, sae_id(job, i), sae, info, job["spec"].seed + 1000 * i)
                    for i, sae in enumerate(members)]
        else:
            sae, info = saes.train_sae(job["spec"], src, hook, model_name=name)
            rows = [_record(ctx, job, sae_id(job), sae, info, job["spec"].seed)]
        with w.transaction() as con:
            con.execute("DELETE FROM saes WHERE sae_id IN (SELECT unnest(?))", [[r["sae_id"] for r in rows]])
            put_rows(con, "saes", rows)
            RunWriter.add_chunk_marker(con, "saes", config_hash, ci)
    table = w.reader().saes()
    pairs = dictionary_pairs(ctx, table)
    main = table[table.kind == "main"]
    bars = {r.sae_id: {"fvu<=0.2": bool(r.fvu <= 0.2), "loss_recovered>=0.8": bool(r.ce_loss_recovered >= 0.8),
                       "dead<=0.2": bool(r.dead_frac <= 0.2)} for r in main.itertuples()}
    ctx.commit(lambda con: put_rows(con, "sae_pairs", pairs),
               {"n_saes": len(table), "layers": layers, "bars": bars, "mfr": mfr_summary(table, pairs)})


def _pair(ctx: Context, table, a: str, b: str, comparison: str, layer: int) -> dict | None:
    paths = dict(zip(table.sae_id, table.path))
    if a not in paths or b not in paths:
        return None
    da = saes.decoder(saes.load_sae(ctx.writer.run_dir / paths[a]))
    db = saes.decoder(saes.load_sae(ctx.writer.run_dir / paths[b]))
    m = saes.mmcs(da, db)
    return {"a": a, "b": b, "comparison": comparison, "layer": layer, "mmcs_hungarian": m["hungarian"],
            "mmcs_max": m["max"]}


def dictionary_pairs(ctx: Context, table) -> list[dict]:
    """MMCS between: base and tuned main SAEs of a layer; the 1x and 2x ReLU variants; the MFR
    members; the independently trained TopK SAEs (the MFR baseline)."""
    out = []
    ids = set(table.sae_id)
    for layer in sorted(set(table.layer)):
        out.append(_pair(ctx, table, f"base-L{layer}-main", f"tuned-L{layer}-main", "base_vs_tuned", layer))
        out.append(_pair(ctx, table, f"tuned-L{layer}-variant-relu-1x", f"tuned-L{layer}-variant-relu-2x",
                         "relu_1x_vs_2x", layer))
        mfr = sorted(i for i in ids if i.startswith(f"tuned-L{layer}-mfr-"))
        ind = [f"tuned-L{layer}-main"] + sorted(i for i in ids if i.startswith(f"tuned-L{layer}-independent-"))
        for group, name in ((mfr, "mfr"), (ind if len(ind) > 1 else [], "independent")):
            for i in range(len(group)):
                for j in range(i + 1, len(group)):
                    out.append(_pair(ctx, table, group[i], group[j], name, layer))
    return [p for p in out if p is not None]


def mfr_summary(table, pairs: list[dict]) -> dict:
    """MFR vs independently trained SAEs of the same layer, architecture and k (so equal L0)."""
    out = {}
    mfr_layers = set(table.layer[table.kind == "mfr"])
    groups = {"mfr": table[table.kind == "mfr"],
              "independent": table[(table.role == "tuned") & table.layer.isin(mfr_layers)
                                   & table.kind.isin(["main", "independent"])]}
    for kind, sel in groups.items():
        mm = [p["mmcs_hungarian"] for p in pairs if p["comparison"] == kind]
        if len(sel) and mm:
            out[kind] = {"n": len(sel), "fvu": float(sel.fvu.mean()), "l0": float(sel.l0.mean()),
                         "ce_loss_recovered": float(sel.ce_loss_recovered.mean()), "mmcs": float(np.mean(mm))}
    return out


def stage_features(ctx: Context, config_hash: str) -> None:
    """Per-feature statistics, examples, logit effects and neighbours of every main SAE."""
    cfg, w, tok = ctx.cfg, ctx.writer, ctx.model.tokenizer
    r = w.reader()
    main = r.saes("main")
    h = harvest_dir(ctx)
    idx = h.index()
    docs = r.query("SELECT doc_id, source, token_ids FROM act_docs ORDER BY doc_id")
    doc_tokens = {int(d): list(t) for d, t in zip(docs.doc_id, docs.token_ids)}
    src_of = dict(zip(docs.doc_id.astype(int), docs.source))
    row_source = np.array([src_of[int(d)] for d in idx["doc_id"]], dtype=object)
    vocab = [tok.decode([i]) for i in range(ctx.model.hooked().cfg.d_vocab)]
    settings = features.FeatureSettings(top_k=cfg.feature_top_k, window=cfg.feature_window, seed=cfg.seed)
    done = w.done_chunks("features", config_hash)
    n = 0
    for ci, row in enumerate(main.itertuples()):
        if ci in done:
            continue
        sae = saes.load_sae(w.run_dir / row.path)
        m = role_model(ctx, row.role).hooked()
        feats, ex = features.feature_tables(sae, h.acts(row.role, row.layer), idx, doc_tokens, row_source, m.W_U,
                                            vocab.__getitem__, settings, row.role, int(row.layer))
        log.info("features of %s: %d features, %d examples", row.sae_id, len(feats), len(ex))
        with w.transaction() as con:
            con.execute("DELETE FROM features WHERE role = ? AND layer = ?", [row.role, int(row.layer)])
            con.execute("DELETE FROM feature_examples WHERE role = ? AND layer = ?", [row.role, int(row.layer)])
            put_rows(con, "features", feats)
            put_rows(con, "feature_examples", ex)
            RunWriter.add_chunk_marker(con, "features", config_hash, ci)
        n += len(feats)
    ctx.commit(lambda con: None, {"saes": list(main.sae_id)})


_SAE_FIELDS = ("sae_arch", "sae_expansion", "sae_k", "sae_l1", "sae_lr", "sae_batch_size", "sae_train_tokens",
               "sae_variants", "sae_sweep_l1", "sae_ce_docs", "mfr_n", "mfr_coefficient", "mfr_warmup_frac",
               "seed", "device")

STAGES = [
    Stage("activations", ("data_dir", "sae_corpus_docs", "sae_doc_tokens", "sae_eval_every", "seed", "device"),
          ("divergence", "rl_eval"), stage_activations, {"act_docs": ("true", []), "vocab": ("true", [])}, tasks=("vader",), version=2,
          describe="harvest MLP outputs of the tuned and base models at the selected layers (held-out IMDB text "
                   "and completions)"),
    Stage("saes", _SAE_FIELDS, ("activations",), stage_saes, {"saes": ("kind <> ?", ["rm"]), "sae_pairs": ("true", [])},
          chunked=True, tasks=("vader",),
          describe="train SAEs with sae-lens (main, paper variants, L1 sweep, MFR); FVU, L0, dead, loss recovered, MMCS"),
    Stage("features", ("feature_top_k", "feature_window", "seed"), ("saes",), stage_features,
          {"features": ("true", []), "feature_examples": ("true", [])}, chunked=True, tasks=("vader",), version=2,
          describe="per-feature density, histograms, top and interval examples, logit effects, neighbours"),
]
