"""Harvest and SAE-training throughput against the physical limit on this machine: a bare forward pass
of the same model over the same tokens (same batching by length, no hooks, nothing kept).

Everything runs on one run's activation corpus (the demo run's by default) with the tuned policy, at
the run's selected layers, in one process, so the figures are ratios within one run.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _docs(run: Path, n_docs: int):
    from lfp_core.activations import Doc
    from lfp_core.store import RunReader

    df = RunReader(run).corpus_docs(limit=n_docs)
    return [
        Doc(int(d), s, sp, [int(t) for t in ids]) for d, s, sp, ids in zip(df.doc_id, df.source, df.split, df.token_ids)
    ]


def run_sae_spec(run: Path, d_model: int, n_rows: int):
    """The run's main-SAE settings (the saes stage's own spec), for one pass over ``n_rows``."""
    from dataclasses import replace

    from lfp_core.saes import SAESpec
    from lfp_core.settings import RunConfig
    from lfp_core.store import RunReader

    cfg = RunConfig.from_dict(RunReader(run).run_info()["config"])
    spec = SAESpec.from_settings(cfg.sae, d_model, cfg.run.seed, cfg.run.device)
    return replace(spec, train_tokens=(n_rows // spec.batch_size) * spec.batch_size, seed=0, device="cpu")


@torch.no_grad()
def bare_forward(hooked, docs, bos: list[int], batch_size: int = 32) -> tuple[float, int]:
    """Seconds and tokens of plain forward passes over ``docs`` batched exactly as the harvest batches them."""
    from lfp_core.activations import _groups

    t0, n = time.perf_counter(), 0
    for group in _groups(docs):
        for s in range(0, len(group), batch_size):
            toks = torch.tensor([bos + d.token_ids for d in group[s : s + batch_size]])
            hooked(toks, return_type=None)
            n += toks.numel()
    return time.perf_counter() - t0, n


def measure(run: Path, n_docs: int, repeats: int) -> dict:
    """Median tokens/s of the bare forward pass, the harvest (selected layers, to float16 memmaps) and the
    SAE training (the run's main-SAE settings, one pass over the harvested rows)."""
    from lfp_core import activations, saes
    from lfp_core.live import LiveEngine
    from lfp_core.pipeline.shared import special_tokens as _special

    eng = LiveEngine(run)
    hooked, tok, layers = eng.model, eng.tokenizer, eng.layers
    docs = _docs(run, n_docs)
    bos = eng.bos
    fwd, harv = [], []
    for _ in range(repeats):
        secs, n_tok = bare_forward(hooked, docs, bos)
        fwd.append(n_tok / secs)
        with tempfile.TemporaryDirectory() as tmp:
            activations.write_index(Path(tmp), docs, _special(tok))
            t = time.perf_counter()
            info = activations.harvest_role(hooked, docs, layers, Path(tmp), "tuned", bos, _special(tok))
            harv.append(n_tok / (time.perf_counter() - t))
            rows = info["rows"] if isinstance(info, dict) and "rows" in info else None
            acts = np.load(Path(tmp) / "tuned" / f"L{layers[0]}.npy")
    n_rows = len(acts) if rows is None else rows
    spec = run_sae_spec(run, hooked.cfg.d_model, n_rows)
    sae_tps = []
    for i in range(repeats):
        src = saes.ActivationSource(acts, np.arange(n_rows), spec.batch_size, seed=i, layer=layers[0])
        _, tinfo = saes.train_sae(spec, src, f"blocks.{layers[0]}.hook_mlp_out")
        sae_tps.append(tinfo["tokens_per_s"])
    f, h, s = float(np.median(fwd)), float(np.median(harv)), float(np.median(sae_tps))
    # harvest + one SAE per layer over the same tokens, as the precompute does per model
    combined = 1.0 / (1.0 / h + len(layers) / s)
    return {
        "docs": len(docs),
        "tokens": n_tok,
        "rows": int(n_rows),
        "layers": layers,
        "forward_tps": f,
        "harvest_tps": h,
        "sae_tps": s,
        "harvest_plus_sae_tps": combined,
    }


def measure_crosscoder(run: Path, n_rows: int, repeats: int) -> dict:
    """Median tokens/s of training one SAE (the run's main-SAE settings, on the tuned model's rows) and one
    BatchTopK crosscoder with the same dictionary size, k, batch size and learning rate on the same rows of
    the paired harvest (base and tuned activations at the first selected layer), one pass over ``n_rows``
    rows; the ratio crosscoder ÷ SAE (the issue's bar: >= 0.5, a crosscoder reads two vectors a token)."""
    from dataclasses import replace

    from lfp_core import crosscoder, saes
    from lfp_core.store import RunReader

    acts_dir = Path(run) / "artifacts" / "activations"
    layer = sorted(int(p.stem[1:]) for p in (acts_dir / "tuned").glob("L*.npy"))[0]
    base = np.load(acts_dir / "base" / f"L{layer}.npy", mmap_mode="r")
    tuned = np.load(acts_dir / "tuned" / f"L{layer}.npy", mmap_mode="r")
    rows = np.arange(min(n_rows, len(tuned)))
    spec = run_sae_spec(run, tuned.shape[1], len(rows))
    cspec = crosscoder.CrosscoderSpec(
        d_sae=spec.d_sae, k=spec.k, lr=spec.lr, batch_size=spec.batch_size, train_tokens=spec.train_tokens
    )
    RunReader(run)  # the run must be readable (as for the other measurements)
    sae_tps, cc_tps = [], []
    for i in range(repeats):
        src = saes.ActivationSource(tuned, rows, spec.batch_size, seed=i, layer=layer)
        sae_tps.append(saes.train_sae(replace(spec, seed=i), src, f"blocks.{layer}.hook_mlp_out")[1]["tokens_per_s"])
        psrc = crosscoder.PairedSource(base, tuned, rows, cspec.batch_size, seed=i, layer=layer)
        cc_tps.append(crosscoder.train_crosscoder(replace(cspec, seed=i), psrc)[1]["tokens_per_s"])
    s, c = float(np.median(sae_tps)), float(np.median(cc_tps))
    return {
        "layer": layer,
        "rows": len(rows),
        "spec": cspec.describe(),
        "sae_tps": s,
        "crosscoder_tps": c,
        "ratio": c / s,
    }


def main_crosscoder(run: str = "data/runs/demo", n_rows: int = 60_000, repeats: int = 3) -> int:
    """Print :func:`measure_crosscoder`'s figures (``python -c "from bench.throughput import main_crosscoder as m; m()"``)."""
    m = measure_crosscoder(Path(run), n_rows, repeats)
    print(f"rows: first {m['rows']:,} of the paired harvest at layer {m['layer']}; {m['spec']}; medians of {repeats}")
    print(f"SAE training (1 SAE)        {m['sae_tps']:10,.0f} tokens/s  1.00")
    print(f"crosscoder training         {m['crosscoder_tps']:10,.0f} tokens/s  {m['ratio']:.2f}  (target >= 0.50)")
    return 0
