"""Precompute CLI: run the pipeline's stages in order into a run directory, resumably.

    python -m lfp_core.precompute --preset quick|demo|paper --model demo --out data/runs/NAME

A stage whose config hash matches a finished record is skipped; a stage whose inputs changed is
cleared and recomputed (and so is everything downstream, whose hashes include it); a stage that
was interrupted resumes (chunked stages from their last committed chunk). Exit status: 0 on
success, 2 on bad input (with a one-line reason), 1 on a failure inside a stage.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import sys
import time
import typing
from pathlib import Path
from typing import Any

from lfp_core.config import default_data_dir
from lfp_core.errors import BadInputError, ConfigError, MissingInputError, StageFailure
from lfp_core.resources import Meter
from lfp_core.settings import LAYOUT, PRESETS, RunConfig, Task, preset_config, resolve_name, settings_hash
from lfp_core.stages import STAGES, stages_for
from lfp_core.store import DB_NAME, RunWriter, StoreError, db_path

log = logging.getLogger("lfp_core.precompute")


def stage_hashes(cfg: RunConfig) -> dict[str, str]:
    """Every stage's hash for ``cfg``: its settings object, its version, its upstream stages' hashes
    and (the model stage) the model files' fingerprint."""
    hashes: dict[str, str] = {}
    for stage in stages_for(cfg.run.task):
        settings: Any = cfg.stage_settings(stage.settings)
        upstream = tuple(hashes[u] for u in stage.after) + (f"v{stage.version}",)
        fp = stage.fingerprint_of(settings)
        if fp is not None:
            upstream += (fp,)
        hashes[stage.name] = settings_hash(settings, upstream)
    return hashes


def check_layout(writer: RunWriter, out: Path) -> None:
    """Refuse to extend a run whose stored config predates the typed settings (layout 1): its stage
    hashes were computed another way, so none of them can be trusted to match today's settings."""
    info = writer.reader().run_info()
    if not info:
        return
    layout = RunConfig.layout_of(info["config"])
    if layout < LAYOUT and any(status == "done" for status, _ in (writer.stage_record(s.name) for s in STAGES)):
        raise ConfigError(
            f"the run at {out} was made by an older version of LFP Explorer (settings layout {layout}); "
            f"its stage hashes cannot be checked against today's settings. The dashboard and the report "
            f"still read it. To recompute it, re-run the same command with --rebuild (the old "
            f"{DB_NAME} is moved aside, not deleted)."
        )


def run_pipeline(cfg: RunConfig, out: str | Path, until: str | None = None) -> dict[str, str]:
    """Run every stage (or up to and including ``until``) into ``out``.

    Each stage receives only its settings object (``cfg.stage_settings(stage.settings)``) and is
    hashed on it, so it is recomputed exactly when a setting it reads (or an upstream stage) changes.

    Returns:
        ``{stage: 'skipped' | 'done'}`` for the stages considered.
    """
    writer = RunWriter(out)
    check_layout(writer, Path(out))
    writer.set_config(cfg.preset, cfg.to_json())
    from lfp_core.pipeline.core import Context  # torch, transformer-lens: only once a run starts

    ctx = Context(run=cfg.run, writer=writer)
    hashes = stage_hashes(cfg)
    outcome: dict[str, str] = {}
    for pos, stage in enumerate(stages_for(cfg.run.task)):
        settings: Any = cfg.stage_settings(stage.settings)
        h = hashes[stage.name]
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
                    stage.load()(ctx, settings, h)
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


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``["rl_steps=300", "rl.beta=0.2"]`` -> ``{"rl.steps": "300", "rl.beta": "0.2"}`` (dotted names;
    the values are typed by :meth:`RunConfig.with_values`). An unknown name is refused, naming it."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set rl_steps=300 or --set rl.steps=300")
        try:
            group, name = resolve_name(key)
        except ConfigError as exc:
            raise ConfigError(f"--set {item!r}: {exc}") from None
        out[f"{group}.{name}"] = raw.strip()
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
    ap.add_argument(
        "--task", choices=typing.get_args(Task), default=None, help="vader (GRPO on the VADER reward) or hh (DPO)"
    )
    ap.add_argument("--model", default="demo", help="'demo', a local HF directory, or a hub id")
    ap.add_argument("--out", required=True, type=Path, help="run directory (created if missing)")
    ap.add_argument(
        "--data-dir", default=None, help="public data sets folder (default: $LFP_DATA_DIR or ../shared/data)"
    )
    ap.add_argument("--device", default=None, help="cpu or cuda")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--n-prompts", type=int, default=None, help="RL (training) prompts")
    ap.add_argument("--n-eval-prompts", type=int, default=None, help="held-out evaluation prompts")
    ap.add_argument("--samples-per-prompt", type=int, default=None)
    ap.add_argument("--gen-batch-size", type=int, default=None, help="prompts per generation batch")
    ap.add_argument(
        "--labeller",
        choices=("offline", "openai"),
        default=None,
        help="labels stage: the offline labeller (default) or an OpenAI-compatible endpoint (key from $OPENAI_API_KEY)",
    )
    ap.add_argument("--llm-model", default=None, help="model name for --labeller openai (default gpt-4o)")
    ap.add_argument(
        "--llm-base-url", default=None, help="OpenAI-compatible base URL (default: $OPENAI_BASE_URL or OpenAI)"
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override any setting by its dotted or flat name, e.g. --set rl.steps=300 --set rl_beta=0.2 "
        "(repeatable; lists comma-separated: --set sae_sweep_l1=0.5,2)",
    )
    ap.add_argument("--until", choices=sorted({s.name for s in STAGES}), default=None, help="stop after this stage")
    ap.add_argument(
        "--rebuild",
        action="store_true",
        help="move an existing run.duckdb aside (kept as run.duckdb.old-*) and start afresh",
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run config the command line asks for: the preset, then the named flags, then ``--set``.

    Raises:
        ConfigError: an unknown or invalid setting; MissingInputError: ``--data-dir`` does not exist.
    """
    data_dir = args.data_dir or default_data_dir()
    if args.data_dir and not Path(args.data_dir).is_dir():
        raise MissingInputError(f"--data-dir {args.data_dir} does not exist")
    values = dict(
        model=args.model,
        task=args.task,
        device=args.device,
        seed=args.seed,
        n_prompts=args.n_prompts,
        n_eval_prompts=args.n_eval_prompts,
        samples_per_prompt=args.samples_per_prompt,
        gen_batch_size=args.gen_batch_size,
        labeller=args.labeller,
        llm_model=args.llm_model,
        llm_base_url=args.llm_base_url,
        data_dir=str(Path(data_dir).resolve()) if data_dir else None,
    )
    try:
        values.update(parse_overrides(args.set))
        return preset_config(args.preset, **values)
    except ValueError as exc:  # a setting given on the command line: bad input, whatever raised it
        raise ConfigError(str(exc)) from exc


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out: Path = args.out
    try:
        if out.exists() and not out.is_dir():
            raise StoreError(f"--out {out} is a file; give a directory for the run")
        cfg = config_from_args(args)
        if cfg.run.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(
                    f"--device {cfg.run.device} requested but torch sees no CUDA device; use --device cpu"
                )
        if cfg.labels.labeller == "openai" and not os.environ.get("OPENAI_API_KEY"):
            raise ConfigError(
                "--labeller openai needs an API key in the OPENAI_API_KEY environment variable "
                "(nothing was computed); or use --labeller offline"
            )
        from lfp_core.seqprobes import check_sequence_probe

        check_sequence_probe(cfg)
        if args.rebuild and db_path(out).exists():
            moved = _move_aside(db_path(out))
            log.info("moved the old %s aside to %s", DB_NAME, moved)
        outcome = run_pipeline(cfg, out, until=args.until)
    except KeyboardInterrupt:
        print("interrupted: finished stages and chunks are kept; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:
        cause = exc.cause if isinstance(exc, StageFailure) else exc
        if isinstance(cause, BadInputError):  # the user's input: one line, exit 2
            print(f"error: {cause}", file=sys.stderr)
            return 2
        # anything else is a failure (a bug, a crash inside a stage, which run_pipeline marked failed)
        log.exception("precompute of %s failed; finished stages are kept, re-run the same command to resume", out)
        return 1
    log.info("run %s: %s", out, ", ".join(f"{k} {v}" for k, v in outcome.items()))
    return 0


if __name__ == "__main__":
    from lfp_core.runtime import apply_thread_policy

    apply_thread_policy()  # before a stage imports torch; nothing above does (tests/test_runtime.py checks)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
