"""How harvest + SAE training time and the run's store grow with the corpus (1× to 4×).

For each multiple m, the first m × (corpus / 4) documents of the demo run's activation corpus (4× is
the whole corpus; ``--base-docs`` sets 1× explicitly)
goes through what the precompute does with it, in one process and a fresh run directory: the tuned
policy's harvest of the selected layers (float16 memory-mapped files), one TopK SAE per layer trained
for one pass over the training rows (so its cost should grow with the corpus; the precompute's fixed
``sae_train_tokens`` budget would hide that), the features stage's tables of each SAE, and the
DuckDB store holding the documents, features and examples. Times are wall and process CPU seconds;
the smallest size runs once more first, as a warm-up, and is not reported.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _timed(fn, *args):
    """``fn(*args)``, its wall time and its process CPU time."""
    w, c = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - w, time.process_time() - c


def measure(run: Path, multiples: list[int], base_docs: int | None = None) -> list[dict]:
    from bench.throughput import _docs, run_sae_spec
    from lfp_core import activations, features, saes
    from lfp_core.live import LiveEngine
    from lfp_core.pipeline.shared import special_tokens as _special
    from lfp_core.settings import FeatureSettings
    from lfp_core.store import RunReader, RunWriter, put_rows

    eng = LiveEngine(run)
    hooked, tok, layers = eng.model, eng.tokenizer, eng.layers
    n_all = RunReader(run).table_size("act_docs")
    all_docs = _docs(run, n_all)
    special = _special(tok)
    vocab = [tok.decode([i]) for i in range(hooked.cfg.d_vocab)]
    settings = FeatureSettings()
    base = base_docs or n_all // max(multiples)
    if base * max(multiples) > n_all:
        raise ValueError(f"{max(multiples)} x {base} documents requested; the run's corpus has {n_all}")
    out = []
    for m in [multiples[0], *multiples]:  # the first measurement warms the caches up and is dropped
        docs = all_docs[: base * m]
        tmp = Path(tempfile.mkdtemp(prefix=f"lfp-scaling-{m}x-"))
        try:
            root = tmp / "run" / "artifacts" / "activations"
            idx = activations.write_index(root, docs, special)
            info, h_wall, h_cpu = _timed(
                activations.harvest_role, hooked, docs, layers, root, "tuned", eng.bos, special
            )
            train = np.nonzero(~idx["is_eval"])[0]
            s_wall = s_cpu = f_wall = f_cpu = 0.0
            tables = []
            for layer in layers:
                acts = np.load(root / "tuned" / f"L{layer}.npy", mmap_mode="r")
                spec = run_sae_spec(run, hooked.cfg.d_model, len(train))
                src = saes.ActivationSource(acts, train, spec.batch_size, seed=0, layer=layer)
                (sae, _), w, c = _timed(saes.train_sae, spec, src, activations.hook_name(layer))
                s_wall, s_cpu = s_wall + w, s_cpu + c
                doc_tokens = {d.doc_id: d.token_ids for d in docs}
                src_of = {d.doc_id: d.source for d in docs}
                row_source = np.array([src_of[int(d)] for d in idx["doc_id"]], dtype=object)
                tbl, w, c = _timed(
                    features.feature_tables,
                    sae,
                    acts,
                    idx,
                    doc_tokens,
                    row_source,
                    hooked.W_U,
                    vocab.__getitem__,
                    settings,
                    "tuned",
                    layer,
                )
                f_wall, f_cpu = f_wall + w, f_cpu + c
                tables.append(tbl)
            writer = RunWriter(tmp / "run")
            with writer.transaction() as con:
                put_rows(
                    con,
                    "act_docs",
                    [
                        {
                            "doc_id": d.doc_id,
                            "source": d.source,
                            "split": d.split,
                            "n_tokens": len(d.token_ids),
                            "token_ids": d.token_ids,
                            "text": tok.decode(d.token_ids),
                        }
                        for d in docs
                    ],
                )
                for feats, ex in tables:
                    put_rows(con, "features", feats)
                    put_rows(con, "feature_examples", ex)
            out.append(
                {
                    "multiple": m,
                    "docs": len(docs),
                    "tokens": int(sum(len(d.token_ids) + len(eng.bos) for d in docs)),
                    "rows": int(info["rows"]),
                    "train_rows": int(len(train)),
                    "harvest_s": h_wall,
                    "harvest_cpu_s": h_cpu,
                    "sae_s": s_wall,
                    "sae_cpu_s": s_cpu,
                    "features_s": f_wall,
                    "features_cpu_s": f_cpu,
                    "harvest_bytes": _dir_bytes(root),
                    "db_bytes": (tmp / "run" / "run.duckdb").stat().st_size,
                }
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out[1:]


def exponent(x: list[float], y: list[float]) -> float:
    """Slope of log y against log x: 1.0 is linear growth."""
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])
