"""Precompute CLI: run the pipeline's stages in order into a run directory, resumably.

    python -m lfp_core.precompute --preset quick|demo|paper --model demo --out data/runs/NAME

A stage whose config hash matches a finished record is skipped; a stage whose inputs changed is
cleared and recomputed (and so is everything downstream, whose hashes include it); a stage that
was interrupted resumes (chunked stages from their last committed chunk). Exit status: 0 on
success, 2 on bad input (with a one-line reason), 1 on a failure inside a stage.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import logging
import os
import sys
import time
from pathlib import Path

from lfp_core.autointerp import LLMError
from lfp_core.config import PRESETS, TASKS, RunConfig, default_data_dir, preset_config, stage_hash
from lfp_core.models import ModelLoadError
from lfp_core.pipeline import STAGES, Context, stages_for
from lfp_core.resources import Meter
from lfp_core.store import DB_NAME, RunWriter, StoreError, db_path

log = logging.getLogger("lfp_core.precompute")


def run_pipeline(cfg: RunConfig, out: str | Path, until: str | None = None) -> dict[str, str]:
    """Run every stage (or up to and including ``until``) into ``out``.

    Returns:
        ``{stage: 'skipped' | 'done'}`` for the stages considered.
    """
    cfg.validate()
    writer = RunWriter(out)
    writer.set_config(cfg.preset, cfg.to_json())
    ctx = Context(cfg=cfg, writer=writer)
    hashes: dict[str, str] = {}
    outcome: dict[str, str] = {}
    for pos, stage in enumerate(stages_for(cfg.task)):
        upstream = tuple(hashes[u] for u in stage.after) + (f"v{stage.version}",)
        if stage.fingerprint is not None:
            upstream += (stage.fingerprint(cfg),)
        h = stage_hash(cfg, stage.fields, upstream)
        hashes[stage.name] = h
        status, old_hash = writer.stage_record(stage.name)
        if status == "done" and old_hash == h:
            log.info("stage %-14s up to date, skipped", stage.name)
            outcome[stage.name] = "skipped"
        else:
            resume = stage.chunked and status in ("running", "failed") and old_hash == h
            if not resume and stage.clears:
                writer.clear_stage(stage.name, stage.clears)
            log.info("stage %-14s %s", stage.name, "resuming" if resume else "running")
            t0 = time.time()
            writer.mark_stage(stage.name, pos, h, "running")

            def finish(con, detail, _name=stage.name, _pos=pos, _h=h, _t0=t0):
                writer.mark_stage(_name, _pos, _h, "done", time.time() - _t0, detail, con=con)

            ctx.finisher = finish
            try:
                with Meter() as meter:
                    stage.run(ctx, h)
            except BaseException as exc:
                writer.mark_stage(stage.name, pos, h, "failed", time.time() - t0, error=f"{type(exc).__name__}: {exc}")
                raise
            status, _ = writer.stage_record(stage.name)
            if status != "done":
                raise RuntimeError(f"stage {stage.name} returned without committing its results")
            log.info("stage %-14s done in %.1fs (%s)", stage.name, time.time() - t0, meter.describe())
            outcome[stage.name] = "done"
        if stage.name == until:
            break
    return outcome


def parse_overrides(items: list[str]) -> dict:
    """``["rl_steps=300", "rl_beta=0.2"]`` -> typed RunConfig overrides; unknown fields are refused."""
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields or key in ("extra", "preset"):
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of "
                             f"{', '.join(sorted(k for k in fields if k not in ('extra', 'preset')))}")
        default = fields[key].default
        try:
            if isinstance(default, bool):
                out[key] = raw.lower() in ("1", "true", "yes")
            elif isinstance(default, int):
                out[key] = int(raw)
            elif isinstance(default, float):
                out[key] = float(raw)
            else:
                out[key] = None if raw.lower() == "none" else raw
        except ValueError as exc:
            raise ValueError(f"--set {item!r}: {key} needs a {type(default).__name__}") from exc
    return out


def _move_aside(path: Path) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    dest = path.with_name(f"{path.name}.old-{stamp}")
    path.rename(dest)
    for suffix in (".wal",):
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.rename(dest.with_name(dest.name + suffix))
    return dest


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m lfp_core.precompute", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    ap.add_argument("--task", choices=TASKS, default=None, help="vader (GRPO on the VADER reward) or hh (DPO)")
    ap.add_argument("--model", default="demo", help="'demo', a local HF directory, or a hub id")
    ap.add_argument("--out", required=True, type=Path, help="run directory (created if missing)")
    ap.add_argument("--data-dir", default=None, help="public data sets folder (default: $LFP_DATA_DIR or ../shared/data)")
    ap.add_argument("--device", default=None, help="cpu or cuda")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--n-prompts", type=int, default=None, help="RL (training) prompts")
    ap.add_argument("--n-eval-prompts", type=int, default=None, help="held-out evaluation prompts")
    ap.add_argument("--samples-per-prompt", type=int, default=None)
    ap.add_argument("--gen-batch-size", type=int, default=None, help="prompts per generation batch")
    ap.add_argument("--labeller", choices=("offline", "openai"), default=None,
                    help="labels stage: the offline labeller (default) or an OpenAI-compatible endpoint "
                         "(key from $OPENAI_API_KEY)")
    ap.add_argument("--llm-model", default=None, help="model name for --labeller openai (default gpt-4o)")
    ap.add_argument("--llm-base-url", default=None, help="OpenAI-compatible base URL (default: $OPENAI_BASE_URL or OpenAI)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override any RunConfig field, e.g. --set rl_steps=300 --set rl_beta=0.2 (repeatable)")
    ap.add_argument("--until", choices=sorted({s.name for s in STAGES}), default=None, help="stop after this stage")
    ap.add_argument("--rebuild", action="store_true",
                    help="move an existing run.duckdb aside (kept as run.duckdb.old-*) and start afresh")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out: Path = args.out
    try:
        if out.exists() and not out.is_dir():
            raise StoreError(f"--out {out} is a file; give a directory for the run")
        data_dir = args.data_dir or default_data_dir()
        if args.data_dir and not Path(args.data_dir).is_dir():
            raise FileNotFoundError(f"--data-dir {args.data_dir} does not exist")
        values = dict(model=args.model, task=args.task, device=args.device, seed=args.seed, n_prompts=args.n_prompts,
                      n_eval_prompts=args.n_eval_prompts, samples_per_prompt=args.samples_per_prompt,
                      gen_batch_size=args.gen_batch_size, labeller=args.labeller, llm_model=args.llm_model,
                      llm_base_url=args.llm_base_url,
                      data_dir=str(Path(data_dir).resolve()) if data_dir else None)
        values.update(parse_overrides(args.set))
        cfg = preset_config(args.preset, **values)
        if cfg.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError(f"--device {cfg.device} requested but torch sees no CUDA device; use --device cpu")
        if cfg.labeller == "openai" and not os.environ.get("OPENAI_API_KEY"):
            raise ValueError("--labeller openai needs an API key in the OPENAI_API_KEY environment variable "
                             "(nothing was computed); or use --labeller offline")
        if args.rebuild and db_path(out).exists():
            moved = _move_aside(db_path(out))
            log.info("moved the old %s aside to %s", DB_NAME, moved)
        outcome = run_pipeline(cfg, out, until=args.until)
    except (ModelLoadError, StoreError, FileNotFoundError, ValueError, LLMError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished stages and chunks are kept; re-run the same command to resume", file=sys.stderr)
        return 130
    log.info("run %s: %s", out, ", ".join(f"{k} {v}" for k, v in outcome.items()))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
