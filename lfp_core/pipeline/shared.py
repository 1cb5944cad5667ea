"""Helpers that several stages share: the tuned policy, the layers studied and the hook read, the
activation harvest and each role's own SAEs (read from what earlier stages stored, never from settings)."""

from __future__ import annotations

from lfp_core import activations, rewards, rlhf, saes
from lfp_core.pipeline.core import Context
from lfp_core.store import artifacts_dir
from lfp_core.store.summaries import ActivationsSummary

ROLES = ("tuned", "base")


def divergence_layers(ctx: Context) -> list[int]:
    """The layers the divergence stage chose (the most changed by RL)."""
    df = ctx.writer.reader().layer_divergence()
    layers = sorted(int(x) for x in df.layer[df.selected])
    if not layers:
        raise RuntimeError("the divergence stage selected no layers; run it first")
    activations.check_layers(layers, ctx.model.hooked().cfg.n_layers)
    return layers


def harvest_summary(ctx: Context) -> ActivationsSummary | None:
    return ctx.writer.reader().summary(ActivationsSummary)


def selected_layers(ctx: Context) -> list[int]:
    """The layers the later stages study: those the activations stage harvested (the divergence stage's
    choice, or the given SAEs' layers); the divergence choice for a run not harvested yet."""
    h = harvest_summary(ctx)
    if h is None or not h.layers:
        return divergence_layers(ctx)
    layers = sorted(int(x) for x in h.layers)
    activations.check_layers(layers, ctx.model.hooked().cfg.n_layers)
    return layers


def harvest_hook(ctx: Context) -> str:
    """The block hook the harvest read (``hook_mlp_out`` for runs made before it could be chosen)."""
    h = harvest_summary(ctx)
    return (h.hook if h is not None else None) or activations.DEFAULT_HOOK


def role_model(ctx: Context, role: str):
    return ctx.model if role == "base" else tuned_policy(ctx)


def harvest_dir(ctx: Context) -> activations.Harvest:
    return activations.Harvest(artifacts_dir(ctx.writer.run_dir) / "activations")


def special_tokens(tok) -> set[int]:
    return {t for t in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if t is not None}


def tuned_policy(ctx: Context):
    """The run's tuned policy (loaded once per invocation, checked against the base model)."""
    if "tuned" not in ctx.cache:
        ctx.cache["tuned"] = rlhf.load_policy(artifacts_dir(ctx.writer.run_dir) / "policy", ctx.model)
    return ctx.cache["tuned"]


def own_saes(ctx: Context, role: str, layers: list[int]) -> dict:
    """``{layer: SAE}`` of ``role``'s main SAEs, checked to read the hook their records name and to come
    from that model."""
    return saes.main_saes(
        ctx.writer.run_dir,
        ctx.writer.reader().saes("main"),
        role,
        layers,
        ctx.model.hooked().cfg.d_model,
        device=ctx.run.device,
    )


def run_reward(ctx: Context, spec: str) -> rewards.Reward:
    """The reward plug-in ``spec`` names (:mod:`lfp_core.rewards`), loaded once per invocation."""
    key = ("reward", spec)
    if key not in ctx.cache:
        ctx.cache[key] = rewards.load_reward(spec, device=ctx.run.device)
    return ctx.cache[key]


def reward_info(rw: rewards.Reward) -> dict:
    """What a stage records about the reward it scored with (``reward_info`` of its summary)."""
    return {"spec": rw.spec, "name": rw.name, "kind": rw.kind}
