"""The saes stage with given SAEs (:mod:`lfp_core.sae_sources`): which SAEs are loaded instead of
trained, what their stored records hold, and which of the stage's comparisons no longer apply and why.

A given SAE becomes its role's ``main`` SAE of its layer, saved in the run's own format under
``artifacts/saes/<role>-L<layer>-main`` (sae-lens's ``save_model``), so every later stage reads it as it
reads an SAE trained here. Its sae-lens metadata keeps where it came from (``given_from``) and the model
name its config gave (``given_model_name``); ``model_name`` becomes the run's ``<model>:<role>``, which the
later stages check an SAE against.
"""

from __future__ import annotations

from lfp_core.sae_sources import GivenSAE
from lfp_core.settings import SAESourceSettings, SAESuiteSettings

# sae-lens architecture names -> this tool's names (the store's ``arch`` column)
_ARCH = {"standard": "relu"}


def given_jobs(given: dict[str, list[GivenSAE]]) -> list[dict]:
    """One ``main`` job per given SAE (tuned first, then base; by layer): loaded, not trained."""
    return [
        {"kind": "main", "role": role, "layer": g.layer, "given": g}
        for role in ("tuned", "base")
        for g in given.get(role, [])
    ]


def adopt(sae, g: GivenSAE, model_name: str) -> None:
    """Mark a loaded given SAE as the run's: ``model_name`` ``<model>:<role>``, the source kept beside it."""
    meta = sae.cfg.metadata
    meta.given_from = g.where
    meta.given_model_name = meta.model_name
    meta.model_name = f"{model_name}:{g.role}"


def record(sae, g: GivenSAE) -> dict:
    """The SAE-describing columns of a given SAE's ``saes`` row (nothing about training: it had none here)."""
    arch = str(g.cfg.get("architecture") or sae.cfg.architecture())
    k = getattr(sae.cfg, "k", None)
    return {
        "arch": _ARCH.get(arch, arch),
        "d_sae": int(sae.cfg.d_sae),
        "k": int(k) if k is not None else None,
        "l1_coefficient": None,
        "seed": None,
        "train_tokens": None,
        "seconds": None,
    }


def usage_line(source: SAESourceSettings, given: dict[str, list[GivenSAE]], trained: list[str], layers) -> str:
    """The stage's log line saying what it loads and what it trains."""
    n = sum(len(v) for v in given.values())
    src = ", ".join(f"{role}={source.given()[role]}" for role in given)
    if not trained:
        return f"saes: using {n} given SAEs from {src}, training none"
    others = " and ".join(f"the {r} model's" for r in trained)
    return (
        f"saes: using {n} given SAEs from {src}; training {others} SAEs here as usual (main and other-seed "
        f"reference at layers {list(layers)})"
    )


def not_applicable(given: dict[str, list[GivenSAE]], trained: list[str], suite: SAESuiteSettings) -> dict[str, str]:
    """``{what: why}`` for the stage's SAEs and comparisons that only mean something for SAEs trained here."""
    out: dict[str, str] = {}
    for role in given:
        out[f"{role} other-seed reference SAEs"] = (
            f"the {role} SAEs were given, not trained here: there is no second SAE of their recipe from another "
            f"seed, so the seed-to-seed MMCS that base vs tuned is read against is not measured for the {role} model"
        )
    if "tuned" in given:
        why = "the tuned SAEs were given"
        if suite.variants:
            out["paper SAE variants (" + ", ".join(v.name for v in suite.variants) + ")"] = (
                f"{why}: the paper's variants are trained here beside the run's own tuned SAEs, to compare "
                "dictionaries of one training recipe across architectures and sizes"
            )
        if suite.sweep_l1:
            out["L1 sweep"] = f"{why}: the sweep is the sparsity/reconstruction curve of SAEs trained here"
        if suite.mfr_n >= 2:
            out["Mutual Feature Regularization"] = (
                f"{why}: MFR compares SAEs trained here jointly with SAEs trained here independently"
            )
    if given and trained:
        out["base vs tuned MMCS"] = (
            f"the {' and '.join(given)} SAEs were given and the {' and '.join(trained)} SAEs trained here: "
            "dictionaries from different training differ for that reason alone, so their similarity does not "
            "measure what RL changed"
        )
    return out
