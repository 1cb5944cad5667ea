"""The null fine-tune control (model diffing): the rlhf stage's GRPO recipe — same settings, steps, prompts and
seed — with each step's rewards shuffled across its completions (or replaced by a constant), or the researcher's
given null model. Every diffing figure of the tuned model is shown beside the same figure of this model: a count
of "tuned-only" latents that a reward-blind fine-tune also produces is not a finding."""

from __future__ import annotations

import logging

import numpy as np

from lfp_core import rlhf
from lfp_core import tuned as tuned_models
from lfp_core.pipeline.core import Context
from lfp_core.pipeline.shared import reward_info, run_reward
from lfp_core.settings import NullStageSettings
from lfp_core.store import artifacts_dir

log = logging.getLogger(__name__)
NULL_DIR = "null_policy"


def null_dir(ctx: Context):
    return artifacts_dir(ctx.writer.run_dir) / NULL_DIR


def null_policy(ctx: Context):
    """The run's null model (loaded once per invocation), or None when the run has no null control."""
    from lfp_core.store.summaries import NullSummary

    if "null" not in ctx.cache:
        s = ctx.writer.reader().summary(NullSummary)
        if s is None or s.recipe in (None, "none"):
            ctx.cache["null"] = None
        else:
            ctx.cache["null"] = rlhf.load_policy(null_dir(ctx), ctx.model)
    return ctx.cache["null"]


def stage_null(ctx: Context, s: NullStageSettings, config_hash: str) -> None:
    """Train (or install) the null model; with no null control, record why (``not_applicable``)."""
    recipe = s.diffing.recipe(tuned_given=s.tuned.path is not None)
    ctx.cache.pop("null", None)
    if recipe == "none":
        why = (
            "the tuned model was given (--tuned), so its recipe is unknown here: pass --null PATH, a model "
            "fine-tuned from the same base by the same recipe with an uninformative reward"
            if s.tuned.path is not None
            else "diffing.null is 'none'"
        )
        log.info("null control: none (%s)", why)
        ctx.commit(lambda con: None, {"recipe": "none", "not_applicable": {"null control": why}})
        return
    if recipe == "given":
        assert s.diffing.null_path is not None
        path, spec = tuned_models.install_given(
            s.diffing.null_path, artifacts_dir(ctx.writer.run_dir), name=NULL_DIR, flag="--null"
        )
        ctx.cache["null"] = rlhf.load_policy(path, ctx.model)  # checked: the base's architecture, shape, tokenizer
        log.info("null model given: %s (not trained here)", spec.location)
        ctx.commit(lambda con: None, {"recipe": "given", "policy_dir": str(path), "steps": 0, "given": spec.location})
        return
    prompts = ctx.writer.reader().prompts("train")
    rw = run_reward(ctx, s.reward.spec)
    policy_dir, steps, _ = rlhf.train_policy(
        ctx.model,
        [list(t) for t in prompts.token_ids],
        s,
        artifacts_dir(ctx.writer.run_dir),
        config_hash,
        reward=rw,
        name=NULL_DIR,
        reward_transform=rlhf.null_reward_transform(recipe, s.run.seed),
    )
    ctx.cache["null"] = rlhf.load_policy(policy_dir, ctx.model)
    first = steps[0]["reward"] if steps else float("nan")
    last = float(np.mean([step["reward"] for step in steps[-10:]])) if steps else float("nan")
    log.info("null fine-tune (%s reward): %d steps; GRPO saw reward %.3f -> %.3f", recipe, len(steps), first, last)
    ctx.commit(
        lambda con: None,
        {
            "recipe": recipe,
            "policy_dir": str(policy_dir),
            "steps": len(steps),
            "first_reward": first,
            "last10_reward": last,
            "reward_info": reward_info(rw),
        },
    )
