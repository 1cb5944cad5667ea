"""Benchmarks: ``python -m bench dashboard [--run data/runs/demo] [--features 50000]`` and
``python -m bench live [--run data/runs/demo]`` and ``python -m bench throughput [--run data/runs/demo]``.

Prints the figures recorded in bench/RESULTS.md. Run it alone on the machine (other CPU work
inflates every figure).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

from lfp_core.config import REPO_ROOT


def _machine() -> str:
    import os

    import torch

    return f"{platform.platform()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, python {platform.python_version()}"


def _cpu_ticks() -> tuple[int, int]:
    """(steal, total) jiffies from /proc/stat (0, 0 where unavailable): how much of the CPU the
    hypervisor took away while a benchmark ran."""
    try:
        v = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        return v[7], sum(v)
    except (OSError, IndexError, ValueError):
        return 0, 0


def _steal_since(start: tuple[int, int]) -> str:
    s, t = _cpu_ticks()
    return f"{(s - start[0]) / max(t - start[1], 1):.0%}" if t else "n/a"


def dashboard(args) -> int:
    from bench import dashboard as d

    print(f"machine: {_machine()}")
    run = Path(args.run)
    print(f"\n## Page render time (AppTest, server side) on {run}: first render, then median/max of {args.repeats}")
    print(f"{'page':28s} {'first ms':>9s} {'median ms':>10s} {'max ms':>8s}")
    for r in d.page_render_times(run, args.repeats):
        print(f"{r['page']:28s} {r['first_ms']:9.0f} {r['median_ms']:10.0f} {r['max_ms']:8.0f}")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        store = d.build_synthetic_store(Path(tmp) / "synthetic", n_features=args.features)
        size = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
        print(f"\n## Synthetic store: {args.features:,} features × 20 examples × 64 tokens, built in "
              f"{time.perf_counter() - t:.1f} s, {size / 1e6:.0f} MB")
        q = d.query_latency(store, args.queries)
        for name, v in q.items():
            print(f"{name:14s} p50 {v['p50_ms']:6.1f} ms  p95 {v['p95_ms']:6.1f} ms  (n {v['n']})")
    return 0


def live(args) -> int:
    """Latency of the Ablation lab's engine: a 64-token prompt, 8 completions of 20 tokens with and
    without the features zeroed, next-token change and activations (what one click of Run does)."""
    import numpy as np

    from lfp_core.live import LiveEngine

    print(f"machine: {_machine()}")
    t = time.perf_counter()
    eng = LiveEngine(args.run)
    print(f"engine loaded in {time.perf_counter() - t:.1f} s (policy + {len(eng.saes)} SAEs)")
    rng = np.random.default_rng(0)
    reviews = "This film was a strange mix of good acting and a terrible, boring plot that never"
    ids = (eng.tokenizer(reviews * 8, add_special_tokens=False)["input_ids"])[:64]
    text = eng.tokenizer.decode(ids)
    layers = eng.layers
    times = []
    ticks = _cpu_ticks()
    for i in range(args.warmup + args.repeats):
        feats = {layer: sorted(rng.choice(eng.d_sae(layer), size=args.features // len(layers), replace=False).tolist())
                 for layer in layers}
        t = time.perf_counter()
        eng.run(text, feats, n=8, new_tokens=20, seed=i)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    ms = np.array(times) * 1000
    print(f"live ablation ({len(eng.encode(text, 20)[0])} tokens incl. BOS, 8 × 20 sampled tokens with and without "
          f"{args.features} features zeroed): p50 {np.median(ms):.0f} ms  p95 {np.percentile(ms, 95):.0f} ms  "
          f"max {ms.max():.0f} ms  (n {len(ms)} after {args.warmup} warm-up; CPU steal during the run "
          f"{_steal_since(ticks)})")
    print("per call ms: " + " ".join(f"{x:.0f}" for x in ms))
    return 0


def throughput(args) -> int:
    from bench.throughput import measure

    print(f"machine: {_machine()}")
    ticks = _cpu_ticks()
    m = measure(Path(args.run), args.docs, args.repeats)
    f = m["forward_tps"]
    print(f"corpus: first {m['docs']} documents of the run's activation corpus, {m['tokens']:,} tokens "
          f"({m['rows']:,} harvested rows), layers {m['layers']}; medians of {args.repeats}")
    print(f"bare forward pass      {f:10,.0f} tokens/s  1.00")
    print(f"harvest ({len(m['layers'])} layers)      {m['harvest_tps']:10,.0f} tokens/s  {m['harvest_tps'] / f:.2f}")
    print(f"SAE training (1 SAE)   {m['sae_tps']:10,.0f} tokens/s  {m['sae_tps'] / f:.2f}")
    print(f"harvest + {len(m['layers'])} SAEs        {m['harvest_plus_sae_tps']:10,.0f} tokens/s  "
          f"{m['harvest_plus_sae_tps'] / f:.2f}  (target >= 0.70)")
    print(f"CPU steal during the run {_steal_since(ticks)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = p.add_subparsers(dest="what", required=True)
    b = sub.add_parser("dashboard", help="page render times and feature-page/browser query latency")
    b.add_argument("--run", default=str(REPO_ROOT / "data" / "runs" / "demo"))
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--features", type=int, default=50_000)
    b.add_argument("--queries", type=int, default=60)
    lv = sub.add_parser("live", help="latency of the Ablation lab's live engine")
    lv.add_argument("--run", default=str(REPO_ROOT / "data" / "runs" / "demo"))
    lv.add_argument("--repeats", type=int, default=30)
    lv.add_argument("--warmup", type=int, default=3)
    lv.add_argument("--features", type=int, default=16)
    tp = sub.add_parser("throughput", help="harvest and SAE training tokens/s against a bare forward pass")
    tp.add_argument("--run", default=str(REPO_ROOT / "data" / "runs" / "demo"))
    tp.add_argument("--docs", type=int, default=1000)
    tp.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if args.what == "throughput":
        return throughput(args)
    if args.what == "live":
        return live(args)
    if args.what == "dashboard":
        if not (Path(args.run) / "run.duckdb").exists():
            print(f"no run at {args.run}: compute it with ./lfp demo (or python -m lfp_core.precompute --preset demo "
                  f"--out {args.run})", file=sys.stderr)
            return 2
        return dashboard(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
