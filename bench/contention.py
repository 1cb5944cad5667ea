"""The demo model's GRPO step and harvest pass with the machine to itself and with competing busy
processes, with and without the thread policy of :mod:`lfp_core.runtime`.

Each (policy, load) cell runs in a fresh child process (``python -m bench.contention --child``):
the OpenMP wait policy is read once when torch loads, so it cannot change inside one process. The
competitors are plain Python busy loops (``while True: pass``) at normal priority, started before
the child and killed after it, each in a session of its own: Linux's autogroup scheduling shares
the CPU between sessions first, so this is how another user's or terminal's process competes (a
busy loop in the bench's own session would only compete thread against thread; ``--same-session``). The child reports per-step times (GRPO: every ``training_step`` of
trl's GRPOTrainer — generation, reward, loss and update — after the first ``warmup`` steps) and
per-pass times (harvest of the demo model's MLP outputs at every layer over synthetic documents),
and the parent prints medians and the ratio loaded/idle of each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

from lfp_core.config import REPO_ROOT
from lfp_core.resources import cpu_ticks, steal_since
from lfp_core.runtime import POLICY_ENV, SWITCH

BUSY_CODE = "while True: pass"


# --- the child: one process, one policy, timings as JSON ------------------------------------------
def _train_grpo(base, prompt_ids: list[list[int]], steps: int, artifacts: Path) -> list[float]:
    """Seconds of each GRPO training step of lfp_core.rlhf's trainer on ``prompt_ids``.

    The only place this bench depends on the RL stage's API (settings types, train_policy); the
    timing wraps trl's GRPOTrainer.training_step, which generates, scores and updates.
    """
    from trl import GRPOTrainer

    from lfp_core.rlhf import train_policy
    from lfp_core.settings import (
        CompletionSettings,
        RewardSettings,
        RLSettings,
        RLStageSettings,
        RunSettings,
        TunedSettings,
    )

    times: list[float] = []
    orig = GRPOTrainer.training_step

    def timed(self, *a, **kw):
        t = time.perf_counter()
        out = orig(self, *a, **kw)
        times.append(time.perf_counter() - t)
        return out

    s = RLStageSettings(
        run=RunSettings(),
        reward=RewardSettings(),
        rl=RLSettings(steps=steps, save_every=10**6),
        completions=CompletionSettings(),
        tuned=TunedSettings(),
    )
    with mock.patch.object(GRPOTrainer, "training_step", timed):
        train_policy(base, prompt_ids, s, artifacts)
    return times


def _synthetic_docs(vocab: int, n: int, seed: int = 0):
    """``n`` documents of random token ids (16-128 tokens): a harvest's cost depends on the token
    count and the batching by length, not on the text."""
    import random

    from lfp_core.activations import Doc

    rng = random.Random(seed)
    return [
        Doc(i, "synthetic", "train", [rng.randrange(1, vocab) for _ in range(rng.randint(16, 128))]) for i in range(n)
    ]


def _harvest_times(base, n_docs: int, repeats: int) -> tuple[list[float], int]:
    from lfp_core import activations

    hooked = base.hooked()
    docs = _synthetic_docs(hooked.cfg.d_vocab, n_docs)
    bos = [base.tokenizer.bos_token_id]
    layers = list(range(hooked.cfg.n_layers))
    times = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            activations.harvest_role(hooked, docs, layers, Path(tmp), "base", bos, set())
            times.append(time.perf_counter() - t)
    return times, sum(len(d.token_ids) + 1 for d in docs)


def child(args) -> int:
    import random

    import torch

    from lfp_core.models import load_model

    base = load_model("demo")
    rng = random.Random(0)
    vocab = base.hf.config.vocab_size
    prompts = [[rng.randrange(1, vocab) for _ in range(rng.randint(2, 9))] for _ in range(64)]
    ticks = cpu_ticks()
    cpu0 = time.process_time()
    out: dict = {"threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    if args.steps:
        with tempfile.TemporaryDirectory() as tmp:
            out["grpo_s"] = _train_grpo(base, prompts, args.steps, Path(tmp))[args.warmup :]
    if args.harvest_repeats:
        out["harvest_s"], out["harvest_tokens"] = _harvest_times(base, args.docs, args.harvest_repeats)
    out["cpu_s"] = time.process_time() - cpu0
    out["steal"] = steal_since(ticks)
    print("RESULT " + json.dumps(out), flush=True)
    return 0


# --- the parent: busy processes, children, the table ---------------------------------------------
def parse_policy(text: str) -> dict[str, str] | None:
    """A policy variant: ``on`` (lfp_core.runtime's POLICY_ENV), ``off`` (OpenMP's defaults) or
    ``VAR=VALUE+VAR=VALUE`` (these variables instead of the policy's), as ``None`` for off."""
    if text == "on":
        return dict(POLICY_ENV)
    if text == "off":
        return None
    out = {}
    for item in text.split("+"):
        k, sep, v = item.partition("=")
        if not sep or not k.strip():
            raise ValueError(f"policy variant {text!r}: expected on, off or VAR=VALUE[+VAR=VALUE...]")
        out[k.strip()] = v.strip()
    return out


def child_env(policy: str) -> dict[str, str]:
    """The environment of a child under a policy variant (:func:`parse_policy`): the policy's
    variables removed and the switch off, then the variant's variables set; offline either way."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="disabled",
        TOKENIZERS_PARALLELISM="false",
    )
    for k in POLICY_ENV:
        env.pop(k, None)
    env[SWITCH] = "off"
    variant = parse_policy(policy)
    if variant is not None:
        env.update(variant)
    return env


def parse_result(stdout: str) -> dict:
    """The child's ``RESULT {json}`` line (the last one), or ValueError naming what came back."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        raise ValueError(f"no RESULT line from the child; its output ended with: {stdout[-2000:]!r}")
    return json.loads(lines[-1][len("RESULT ") :])


def start_busy(n: int, new_session: bool = True) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", BUSY_CODE], start_new_session=new_session) for _ in range(n)]


def stop_busy(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def busy_seconds() -> float | None:
    """CPU seconds the whole machine has spent not idle (all cores, /proc/stat); None where unavailable."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait
    except (OSError, IndexError, ValueError):
        return None


def _children_cpu() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_cell(
    policy: str,
    busy: int,
    steps: int,
    warmup: int,
    harvest_repeats: int,
    docs: int,
    timeout: float,
    new_session: bool = True,
) -> dict:
    """One child under ``busy`` competing processes. Also reports ``other_cores``: the CPU the rest of
    the machine (processes outside this bench) used meanwhile, in cores — a busy shared machine is a
    load the cell did not ask for."""
    cmd = [
        sys.executable,
        "-m",
        "bench.contention",
        "--child",
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
        "--harvest-repeats",
        str(harvest_repeats),
        "--docs",
        str(docs),
    ]
    t0, machine0, ours0 = time.perf_counter(), busy_seconds(), _children_cpu()
    procs = start_busy(busy, new_session)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=child_env(policy), timeout=timeout)
    finally:
        stop_busy(procs)
    wall, machine1, ours1 = time.perf_counter() - t0, busy_seconds(), _children_cpu()
    if p.returncode != 0:
        raise RuntimeError(f"child failed (exit {p.returncode}): {p.stderr[-3000:]}")
    r = parse_result(p.stdout)
    other = None if machine0 is None or machine1 is None else max(0.0, (machine1 - machine0) - (ours1 - ours0)) / wall
    r.update(policy=policy, busy=busy, wall_s=wall, other_cores=other, loadavg=os.getloadavg()[0])
    return r


def summarize(cells: list[dict]) -> list[dict]:
    """Medians per cell, each cell's ratio to the idle cell (busy 0) of the same policy and to the
    idle cell of policy ``off`` (OpenMP's defaults: what a policy costs on an idle machine)."""
    rows = []
    idle = {c["policy"]: c for c in cells if c["busy"] == 0}
    off = idle.get("off", {})
    for c in cells:
        row = {
            "policy": c["policy"],
            "busy": c["busy"],
            "threads": c["threads"],
            "steal": c.get("steal"),
            "cpu_s": c.get("cpu_s"),
            "other_cores": c.get("other_cores"),
        }
        for key in ("grpo_s", "harvest_s"):
            if c.get(key):
                row[key] = statistics.median(c[key])
                row[key + "_n"] = len(c[key])
                base = idle.get(c["policy"], {}).get(key)
                row[key + "_ratio"] = row[key] / statistics.median(base) if base else None
                row[key + "_vs_off"] = row[key] / statistics.median(off[key]) if off.get(key) else None
        rows.append(row)
    return rows


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(rows: list[dict], bar: float = 2.5) -> None:
    print(
        f"{'policy':24s} {'busy':>4s} {'thr':>3s} {'GRPO step s':>11s} {'x idle':>7s} {'x off':>6s} "
        f"{'harvest s':>10s} {'x idle':>7s} {'x off':>6s} {'steal':>6s} {'others':>6s}"
    )
    for r in rows:
        print(
            f"{r['policy']:24s} {r['busy']:4d} {r['threads']:3d} {_fmt(r.get('grpo_s'), '11.2f')} "
            f"{_fmt(r.get('grpo_s_ratio'), '7.2f')} {_fmt(r.get('grpo_s_vs_off'), '6.2f')} "
            f"{_fmt(r.get('harvest_s'), '10.2f')} {_fmt(r.get('harvest_s_ratio'), '7.2f')} "
            f"{_fmt(r.get('harvest_s_vs_off'), '6.2f')} {_fmt(r.get('steal'), '6.0%')} {_fmt(r.get('other_cores'), '6.2f')}"
        )
    print(
        f"bar (issue 16): loaded/idle <= {bar} with one competing busy process. 'x idle': to the same policy's idle "
        "cell; 'x off': to the idle cell without a policy; 'others': cores used meanwhile by processes outside the "
        "bench (0 on a quiet machine)"
    )


def too_loaded(cell: dict, max_others: float) -> bool:
    """The rest of the machine used more than ``max_others`` cores during the cell."""
    return cell.get("other_cores") is not None and cell["other_cores"] > max_others


def parent(args) -> int:
    policies = [x.strip() for x in args.policy.split(",") if x.strip()]
    for x in policies:
        parse_policy(x)  # a typo fails here, not after the first cells
    loads = [0] + [int(x) for x in args.busy.split(",") if x.strip()]
    print(
        f"cells: policy {args.policy}, busy processes {loads} "
        f"({'in the bench session' if args.same_session else 'each in a session of its own'}), "
        f"{args.steps} GRPO steps (first {args.warmup} "
        f"dropped), {args.harvest_repeats} harvest passes over {args.docs} synthetic documents; "
        f"on = {', '.join(f'{k}={v}' for k, v in POLICY_ENV.items())}"
    )
    ticks = cpu_ticks()
    cells = []
    for busy in loads:  # the policies side by side at each load, so a change in the machine's load hits both
        for policy in policies:
            for attempt in range(args.retries + 1):
                t = time.perf_counter()
                c = run_cell(
                    policy,
                    busy,
                    args.steps,
                    args.warmup,
                    args.harvest_repeats,
                    args.docs,
                    args.timeout,
                    new_session=not args.same_session,
                )
                print(
                    f"  policy {policy}, busy {busy}: {time.perf_counter() - t:.0f} s, other "
                    f"processes {_fmt(c['other_cores'], '.2f')} cores; GRPO steps "
                    + " ".join(f"{x:.2f}" for x in c.get("grpo_s", []))
                    + "; harvest passes "
                    + " ".join(f"{x:.2f}" for x in c.get("harvest_s", [])),
                    flush=True,
                )
                if not too_loaded(c, args.max_others) or attempt == args.retries:
                    break
                print(f"    (other processes used more than {args.max_others} cores: measuring the cell again)")
            cells.append(c)
    print()
    print_table(summarize(cells))
    f = steal_since(ticks)
    print(f"CPU steal during the bench {'n/a' if f is None else format(f, '.0%')}")
    if args.json:
        Path(args.json).write_text(json.dumps(cells, indent=1))
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--policy",
        default="off,on",
        help="comma-separated policy variants: on (lfp_core.runtime's thread policy), off (OpenMP's defaults), or "
        "VAR=VALUE+VAR=VALUE (e.g. GOMP_SPINCOUNT=10000); default off,on",
    )
    p.add_argument("--busy", default="1", help="competing busy processes, comma-separated (idle is always run)")
    p.add_argument("--steps", type=int, default=8, help="GRPO steps per cell (0: none)")
    p.add_argument("--warmup", type=int, default=2, help="GRPO steps dropped from each cell's median")
    p.add_argument("--harvest-repeats", type=int, default=3, help="harvest passes per cell (0: none)")
    p.add_argument("--docs", type=int, default=400, help="synthetic documents per harvest pass")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per cell")
    p.add_argument(
        "--max-others",
        type=float,
        default=0.2,
        help="measure a cell again (up to --retries times) when processes outside the bench used more cores than this",
    )
    p.add_argument("--retries", type=int, default=2, help="see --max-others")
    p.add_argument(
        "--same-session",
        action="store_true",
        help="start the busy processes in the bench's own session (compete thread against thread)",
    )
    p.add_argument("--json", default=None, help="also write the raw per-cell timings here")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.contention", description=__doc__)
    add_arguments(p)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    return child(args) if args.child else parent(args)


if __name__ == "__main__":
    sys.exit(main())
