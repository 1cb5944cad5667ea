"""Precompute CLI: run the pipeline's stages in order into a run directory, resumably.

    python -m lfp_core.precompute --preset quick|demo|paper --model demo --out data/runs/NAME

A stage whose config hash matches a finished record is skipped; a stage whose inputs changed is
cleared and recomputed (and so is everything downstream, whose hashes include it); a stage that
was interrupted resumes (chunked stages from their last committed chunk). Exit status: 0 on
success, 2 on bad input (with a one-line reason), 1 on a failure inside a stage.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import logging
import os
import re
import sys
import time
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lfp_core import texts
from lfp_core.config import default_data_dir
from lfp_core.errors import BadInputError, ConfigError, MissingInputError, StageFailure
from lfp_core.preflight import check_against_model, check_diffing_layers
from lfp_core.resources import Meter
from lfp_core.rewards import check_reward
from lfp_core.sae_sources import check_saes
from lfp_core.seqprobes import check_sequence_probe
from lfp_core.settings import LAYOUT, PRESETS, RunConfig, Task, preset_config, resolve_name, settings_hash
from lfp_core.stages import STAGES, stages_for
from lfp_core.store import DB_NAME, RunWriter, StoreError, db_path
from lfp_core.tuned import check_null, check_tuned

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


LOCK_NAME = ".precompute.lock"


def _holder(lock: Path) -> str | None:
    """The PID written in a run's lock file if a live process holds the lock, else None."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _refuse_if_busy(out: Path) -> None:
    pid = _holder(out / LOCK_NAME)
    if pid is not None:
        raise StoreError(
            f"another precompute (PID {pid}) is writing the run at {out}; wait for it to finish (or stop it) and "
            f"re-run this command, which then resumes"
        )


@contextlib.contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """Hold the run's precompute lock (an advisory flock on ``out/.precompute.lock`` holding our PID; the
    kernel releases it when the process dies, even by SIGKILL). A second precompute is refused with the PID."""
    _refuse_if_busy(out)
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another one started between the check and here
            os.close(fd)
            fd = -1
            _refuse_if_busy(out)
            raise StoreError(f"another precompute is writing the run at {out}; re-run when it has finished") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        if fd >= 0:
            os.close(fd)


def run_pipeline(cfg: RunConfig, out: str | Path, until: str | None = None) -> dict[str, str]:
    """Run every stage (or up to and including ``until``) into ``out``.

    Each stage receives only its settings object (``cfg.stage_settings(stage.settings)``) and is
    hashed on it, so it is recomputed exactly when a setting it reads (or an upstream stage) changes.

    Returns:
        ``{stage: 'skipped' | 'done'}`` for the stages considered.
    """
    _refuse_if_busy(Path(out))  # before the health check, which would only see a locked file
    writer = RunWriter(out)
    with exclusive(Path(out)):
        return _run_stages(cfg, writer, Path(out), until)


def _run_stages(cfg: RunConfig, writer: RunWriter, out: Path, until: str | None) -> dict[str, str]:
    check_layout(writer, out)
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
                writer.stage = stage.name
                with Meter() as meter:
                    stage.load()(ctx, settings, h)
                writer.stage = None
            except BaseException as exc:
                writer.stage = None
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
    ap.add_argument(
        "--reward",
        default=None,
        metavar="SPEC",
        help="the reward (sets reward.spec): vader (default) | classifier:PATH_OR_ID[:LABEL][@prob] | "
        "reward-model:PATH_OR_ID | python:MODULE:FUNCTION (see lfp_core/rewards.py)",
    )
    ap.add_argument(
        "--tuned",
        default=None,
        metavar="PATH_OR_HUB_ID",
        help="a tuned model of the base model (local HF directory or hub id): the rlhf stage takes it instead of "
        "training one (same architecture, shape and tokenizer as --model; checked before anything runs)",
    )
    ap.add_argument(
        "--null",
        default=None,
        metavar="PATH_OR_HUB_ID",
        help="the null fine-tune control, given: a model fine-tuned from --model by the tuned model's recipe with an "
        "uninformative (shuffled or constant) reward; the model-diffing stages compare it with the base model "
        "beside the tuned model (default: trained here by the rlhf recipe with shuffled rewards, or none with --tuned)",
    )
    ap.add_argument(
        "--prompts",
        default=None,
        metavar="SRC",
        help="your own prompts instead of IMDB prefixes: a JSONL file with a 'text' field (optional 'split': "
        "train/eval) or hf:NAME_OR_PATH[:SPLIT[:COLUMN]]; each text is one whole prompt",
    )
    ap.add_argument(
        "--corpus",
        default=None,
        metavar="SRC",
        help="your own documents instead of the held-out IMDB reviews of the activation corpus (and the "
        "ablation prefixes): a JSONL file with a 'text' field or hf:NAME_OR_PATH[:SPLIT[:COLUMN]]",
    )
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
    ap.add_argument(
        "--saes",
        action="append",
        default=[],
        metavar="[ROLE=]SRC",
        help="use these SAEs of the tuned (default) or base model instead of training them: a directory of "
        "sae-lens SAEs (one subdirectory per hook; or another run's directory: its main SAEs) or "
        "sae-lens:RELEASE[:SAE_ID,...] (sae-lens's pretrained registry; needs the hub). Repeatable, once per "
        "role, e.g. --saes tuned=DIR --saes base=DIR",
    )
    ap.add_argument(
        "--hook",
        default=None,
        metavar="NAME",
        help="the block hook to harvest and give SAEs: hook_mlp_out (default), hook_resid_pre, hook_resid_mid, "
        "hook_resid_post or hook_attn_out",
    )
    ap.add_argument("--until", choices=sorted({s.name for s in STAGES}), default=None, help="stop after this stage")
    ap.add_argument(
        "--rebuild",
        action="store_true",
        help="move an existing run.duckdb aside (kept as run.duckdb.old-*) and start afresh",
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def _absolute_model(spec: str | None) -> str | None:
    """A local model directory as an absolute path (the run records where the model came from); a hub id as is."""
    if spec is None or not Path(spec).expanduser().exists():
        return spec
    return str(Path(spec).expanduser().resolve())


def preflight(cfg: RunConfig) -> None:
    """The checks of the researcher's inputs that need no heavy work, before anything is written:
    a given tuned model against the base (config and tokenizer files), the given prompts and corpus, the
    given SAEs and hook (their cfg.json files against the model's config), the reward plug-in.

    Raises:
        BadInputError: the first input that is wrong, with a one-line reason.
    """
    check_tuned(cfg)
    check_null(cfg)  # a null control for a given tuned model needs a given null model
    texts.check_texts(cfg)
    check_saes(cfg)  # the given SAEs and the hook against the model's config
    check_sequence_probe(cfg)  # a reward that is not a lexicon needs enough held-out prompts
    check_reward(cfg)  # loads the plug-in and scores two probe pairs (the heaviest check: last)


def parse_saes(items: list[str]) -> dict[str, str]:
    """``["tuned=DIR", "base=sae-lens:REL"]`` (ROLE= optional, default tuned) -> ``{"sae_source.tuned":
    "DIR", "sae_source.base": "sae-lens:REL"}``; a role given twice or an unknown role is refused."""
    out: dict[str, str] = {}
    for item in items:
        role, sep, src = item.partition("=")
        if not sep or not re.fullmatch(r"\w+", role.strip()):  # no ROLE= prefix (a path may hold '=')
            role, src = "tuned", item
        role, src = role.strip(), src.strip()
        if role not in ("base", "tuned"):
            raise ConfigError(f"--saes {item!r}: ROLE must be base or tuned (--saes [ROLE=]SRC)")
        if not src:
            raise ConfigError(f"--saes {item!r}: name a directory of sae-lens SAEs or sae-lens:RELEASE")
        key = f"sae_source.{role}"
        if key in out:
            raise ConfigError(
                f"--saes gives the {role} model's SAEs twice ({out[key]} and {src}); put them in one directory, "
                "one subdirectory per hook"
            )
        out[key] = src
    return out


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
        reward=args.reward,
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
        tuned=_absolute_model(args.tuned),
        diff_null_path=_absolute_model(args.null),
        prompts_source=texts.absolute_spec(args.prompts),
        corpus_source=texts.absolute_spec(args.corpus),
    )
    try:
        values.update(parse_saes(args.saes))
        if args.hook is not None:
            values["sae_source.hook"] = args.hook
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
        check_against_model(cfg)  # sae_k, n_selected_layers, rm_layers against the model's config.json
        preflight(cfg)
        if not args.rebuild:
            check_diffing_layers(cfg, out)  # an existing run: its crosscoders are not cleared for a refused layer
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
