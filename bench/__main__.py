"""Benchmarks: ``python -m bench stages`` (the whole demo precompute, each stage's wall time, CPU time
and peak RSS), ``python -m bench throughput`` (harvest and SAE training against a bare forward pass; ``--crosscoder``:
crosscoder training against the SAE trainer),
``python -m bench scaling`` (1× to 4× corpus), ``python -m bench dashboard`` (page render times, query
latency at 50k features), ``python -m bench live`` (the Ablation lab's engine) and ``python -m bench
contention`` (the GRPO step and harvest pass idle vs beside competing busy processes, with and without
lfp_core.runtime's thread policy); ``--run`` defaults to data/runs/demo.

Prints the figures recorded in bench/RESULTS.md. Run it alone on the machine (other CPU work
inflates every figure).
"""

from __future__ import annotations

from lfp_core.runtime import apply_thread_policy

apply_thread_policy()  # before anything imports torch (lfp_core/runtime.py)

import argparse  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from lfp_core.config import REPO_ROOT  # noqa: E402
from lfp_core.resources import cpu_ticks, steal_since  # noqa: E402


def _machine() -> str:
    import os

    import torch

    return f"{platform.platform()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, python {platform.python_version()}"


def _steal_since(start: tuple[int, int]) -> str:
    f = steal_since(start)
    return "n/a" if f is None else f"{f:.0%}"


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
        print(
            f"\n## Synthetic store: {args.features:,} features × 20 examples × 64 tokens, built in "
            f"{time.perf_counter() - t:.1f} s, {size / 1e6:.0f} MB"
        )
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
    ticks = cpu_ticks()
    for i in range(args.warmup + args.repeats):
        feats = {
            layer: sorted(rng.choice(eng.d_sae(layer), size=args.features // len(layers), replace=False).tolist())
            for layer in layers
        }
        t = time.perf_counter()
        eng.run(text, feats, n=8, new_tokens=20, seed=i)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    ms = np.array(times) * 1000
    print(
        f"live ablation ({len(eng.encode(text, 20)[0])} tokens incl. BOS, 8 × 20 sampled tokens with and without "
        f"{args.features} features zeroed): p50 {np.median(ms):.0f} ms  p95 {np.percentile(ms, 95):.0f} ms  "
        f"max {ms.max():.0f} ms  (n {len(ms)} after {args.warmup} warm-up; CPU steal during the run "
        f"{_steal_since(ticks)})"
    )
    print("per call ms: " + " ".join(f"{x:.0f}" for x in ms))
    return 0


def throughput(args) -> int:
    from bench.throughput import main_crosscoder, measure

    print(f"machine: {_machine()}")
    ticks = cpu_ticks()
    if args.crosscoder:
        main_crosscoder(args.run, args.rows, args.repeats)
        print(f"CPU steal during the run {_steal_since(ticks)}")
        return 0
    m = measure(Path(args.run), args.docs, args.repeats)
    f = m["forward_tps"]
    print(
        f"corpus: first {m['docs']} documents of the run's activation corpus, {m['tokens']:,} tokens "
        f"({m['rows']:,} harvested rows), layers {m['layers']}; medians of {args.repeats}"
    )
    print(f"bare forward pass      {f:10,.0f} tokens/s  1.00")
    print(f"harvest ({len(m['layers'])} layers)      {m['harvest_tps']:10,.0f} tokens/s  {m['harvest_tps'] / f:.2f}")
    print(f"SAE training (1 SAE)   {m['sae_tps']:10,.0f} tokens/s  {m['sae_tps'] / f:.2f}")
    print(
        f"harvest + {len(m['layers'])} SAEs        {m['harvest_plus_sae_tps']:10,.0f} tokens/s  "
        f"{m['harvest_plus_sae_tps'] / f:.2f}  (target >= 0.70)"
    )
    print(f"CPU steal during the run {_steal_since(ticks)}")
    return 0


_STAGE_LINE = re.compile(
    r"stage (\S+)\s+done in ([0-9.]+)s \(CPU ([0-9.]+)s, peak RSS ([0-9.]+) GiB(?: \(sampled\))?(?:, CPU steal (\d+)%)?\)"
)


def stages(args) -> int:
    """The whole precompute of a preset into a fresh directory, as a user runs it (a subprocess),
    with each stage's wall time, process CPU time, peak RSS and the machine's CPU steal."""
    import shutil
    import subprocess

    print(f"machine: {_machine()}")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="lfp-bench-stages-")) / "run"
    if out.exists() and any(out.iterdir()):
        print(f"--out {out} is not empty: the bench measures a fresh run", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "lfp_core.precompute", "--preset", args.preset, "--out", str(out), *args.extra]
    print("command: " + " ".join(cmd[1:]))
    log_path = out.parent / f"{out.name}.precompute.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    ticks, t0 = cpu_ticks(), time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stderr=log, stdout=log, cwd=REPO_ROOT)
    wall = time.perf_counter() - t0
    rows = [m.groups() for m in _STAGE_LINE.finditer(log_path.read_text())]
    # the process's peak is the largest stage peak (each stage resets the kernel's high-water mark,
    # which also resets what getrusage would report, or samples RSS where the kernel cannot reset it)
    peak = max((float(r[3]) for r in rows), default=float("nan"))
    print(f"{'stage':14s} {'wall s':>8s} {'CPU s':>8s} {'peak RSS GiB':>13s} {'steal':>6s}")
    for name, w, c, rss, st in rows:
        print(f"{name:14s} {float(w):8.1f} {float(c):8.1f} {float(rss):13.2f} {(st or '?') + '%':>6s}")
    print(
        f"{'total':14s} {wall:8.1f} {sum(float(r[2]) for r in rows):8.1f} {peak:13.2f} {_steal_since(ticks):>6s}"
        f"   (wall incl. start-up; peak RSS: the largest stage's)"
    )
    print(f"targets (demo preset): total <= 600 s, peak RSS <= 4 GiB; log: {log_path}")
    if proc.returncode != 0:
        print(f"precompute failed (exit {proc.returncode}); see {log_path}", file=sys.stderr)
        return 1
    if not args.keep and not args.out:
        shutil.rmtree(out.parent, ignore_errors=True)
    return 0


def scaling(args) -> int:
    from bench.scaling import exponent, measure

    print(f"machine: {_machine()}")
    ticks = cpu_ticks()
    rows = measure(Path(args.run), [int(x) for x in args.multiples.split(",")], args.base_docs)
    print(
        f"{'corpus':>6s} {'docs':>6s} {'tokens':>9s} {'harvest s':>10s} {'SAEs s':>8s} {'features s':>11s} "
        f"{'(CPU s)':>18s} {'harvest MB':>11s} {'DuckDB MB':>10s}"
    )
    for r in rows:
        print(
            f"{r['multiple']:>5d}x {r['docs']:6d} {r['tokens']:9,d} {r['harvest_s']:10.1f} {r['sae_s']:8.1f} "
            f"{r['features_s']:11.1f} {r['harvest_cpu_s']:6.1f}/{r['sae_cpu_s']:5.1f}/{r['features_cpu_s']:5.1f} "
            f"{r['harvest_bytes'] / 1e6:11.1f} {r['db_bytes'] / 1e6:10.1f}"
        )
    if len(rows) >= 2:
        x = [r["tokens"] for r in rows]
        print(
            "growth exponent against tokens (1.0 = linear): "
            + ", ".join(
                f"{k} {exponent(x, [r[key] for r in rows]):.2f}"
                for k, key in (
                    ("harvest", "harvest_cpu_s"),
                    ("SAEs", "sae_cpu_s"),
                    ("features", "features_cpu_s"),
                    ("harvest MB", "harvest_bytes"),
                    ("DuckDB MB", "db_bytes"),
                )
            )
            + "  (times: CPU seconds)"
        )
    print(f"CPU steal during the run {_steal_since(ticks)}")
    return 0


def contention(args) -> int:
    from bench import contention as c

    print(f"machine: {_machine()}")
    return c.parent(args)


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
    tp.add_argument(
        "--crosscoder",
        action="store_true",
        help="instead: crosscoder training tokens/s against the SAE trainer's on the same rows (--rows of them)",
    )
    tp.add_argument("--rows", type=int, default=60_000)
    st = sub.add_parser("stages", help="the whole precompute of a preset: each stage's wall time, CPU and peak RSS")
    st.add_argument("--preset", default="demo")
    st.add_argument("--out", default=None, help="run directory (default: a temporary one, deleted afterwards)")
    st.add_argument("--keep", action="store_true", help="keep the temporary run")
    st.add_argument("extra", nargs="*", help="more precompute arguments after --, e.g. -- --set ablation_n=256")
    sc = sub.add_parser("scaling", help="harvest + SAE time and store size at 1x-4x corpus")
    sc.add_argument("--run", default=str(REPO_ROOT / "data" / "runs" / "demo"))
    sc.add_argument("--multiples", default="1,2,3,4")
    sc.add_argument(
        "--base-docs", type=int, default=None, help="documents at 1x (default: the corpus / largest multiple)"
    )
    ct = sub.add_parser("contention", help="GRPO step and harvest time idle vs beside busy processes, policy on/off")
    from bench.contention import add_arguments

    add_arguments(ct)
    args = p.parse_args(argv)
    if args.what == "contention":
        return contention(args)
    if args.what == "stages":
        return stages(args)
    if args.what == "scaling":
        return scaling(args)
    if args.what == "throughput":
        return throughput(args)
    if args.what == "live":
        return live(args)
    if args.what == "dashboard":
        if not (Path(args.run) / "run.duckdb").exists():
            print(
                f"no run at {args.run}: compute it with ./lfp demo (or python -m lfp_core.precompute --preset demo "
                f"--out {args.run})",
                file=sys.stderr,
            )
            return 2
        return dashboard(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
