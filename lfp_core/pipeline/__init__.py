"""The precompute pipeline: every stage, in order.

Each stage is a function of (config, earlier stages' outputs) that writes its rows through the
store. A stage declares the config fields it reads; the runner in :mod:`lfp_core.precompute`
hashes them (with the upstream stages' hashes) to decide what to skip or recompute.
"""

from __future__ import annotations

from lfp_core.pipeline import ablation, base, labels, probes, reward_model, rl, saes
from lfp_core.pipeline.core import Context, Stage

STAGES: list[Stage] = [*base.STAGES, *rl.STAGES, *saes.STAGES, *probes.STAGES, *labels.STAGES, *ablation.STAGES, *reward_model.STAGES]


def stages_for(task: str = "vader") -> list[Stage]:
    """The stages of a task, in order."""
    return [s for s in STAGES if task in s.tasks]


def stage_names(task: str = "vader") -> list[str]:
    return [s.name for s in stages_for(task)]


def describe_stages(task: str = "vader") -> dict[str, str]:
    return {s.name: s.describe for s in stages_for(task)}


__all__ = ["STAGES", "Context", "Stage", "describe_stages", "stage_names", "stages_for"]
