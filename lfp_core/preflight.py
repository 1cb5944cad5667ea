"""Settings checked against the model before any work (issue 20): what ``--set`` can ask for that no
setting's own range check can see, because the bound is the model's.

* ``sae_k`` (TopK's k) must not exceed the dictionary it picks from, ``d_sae = expansion × d_model``,
  of every TopK SAE the run trains (the main SAEs when ``sae_arch`` is topk, the MFR and independent
  TopK SAEs, TopK variants); before, the saes stage deleted the run's SAE rows and then died.
* ``n_selected_layers`` must not exceed the model's layers (it was clamped without a word), and
  explicit ``rm_layers`` must be layers the model has.

The model's shape comes from its config.json alone (:func:`lfp_core.models.model_shape`); when it
cannot be read that way, nothing is checked here and the stages check what they load.
"""

from __future__ import annotations

from lfp_core.errors import ConfigError
from lfp_core.settings import RunConfig


def check_against_model(cfg: RunConfig) -> None:
    """Raise :class:`ConfigError` (one line naming the setting, its value and the model's bound) when
    ``cfg`` asks for more SAE features, layers or reward-model layers than its model has."""
    from lfp_core.models import model_shape
    from lfp_core.stages import stage_names

    shape = model_shape(cfg.run.model)
    if shape is None:
        return
    stages = set(stage_names(cfg.run.task))
    n, d = shape.n_layers, shape.d_model
    if cfg.divergence.n_layers > n:
        raise ConfigError(
            f"divergence.n_layers (n_selected_layers) = {cfg.divergence.n_layers}, but the model {shape.name} has "
            f"{n} layers; choose n_selected_layers <= {n}"
        )
    if "saes" in stages:
        topk = []  # (what, expansion) of every TopK SAE the saes stage trains
        if cfg.sae.arch == "topk":
            topk.append(("the main SAEs", cfg.sae.expansion))
        if cfg.sae_suite.mfr_n >= 2:
            topk.append(("the MFR and independent TopK SAEs", cfg.sae.expansion))
        topk += [(f"the {v.name} variant", v.expansion) for v in cfg.sae_suite.variants if v.arch == "topk"]
        for what, expansion in sorted(topk, key=lambda t: t[1]):
            d_sae = expansion * d
            if cfg.sae.k > d_sae:
                raise ConfigError(
                    f"sae.k (sae_k) = {cfg.sae.k} is more than the {d_sae} features of {what} (expansion "
                    f"{expansion} × d_model {d} of {shape.name}); TopK keeps k of d_sae features: choose "
                    f"sae_k <= {d_sae}"
                )
    if "reward_model" in stages and cfg.rm.layers != "auto":
        bad = [x for x in cfg.rm.layers if x >= n]
        if bad:
            raise ConfigError(
                f"rm.layers (rm_layers) names layer {bad[0]}, but the model {shape.name} has {n} layers (0–{n - 1})"
            )
    if "crosscoders" in stages:
        d_sae = cfg.diffing.expansion * d
        if cfg.diffing.arch == "batchtopk" and cfg.diffing.k > d_sae:
            raise ConfigError(
                f"diffing.k (cc_k) = {cfg.diffing.k} is more than the crosscoder's {d_sae} latents (cc_expansion "
                f"{cfg.diffing.expansion} × d_model {d}); choose cc_k <= {d_sae}"
            )
        if cfg.diffing.layers != "auto":
            bad = [x for x in cfg.diffing.layers if x >= n]
            if bad:
                raise ConfigError(
                    f"diffing.layers (cc_layers) names layer {bad[0]}, but the model {shape.name} has {n} layers "
                    f"(0–{n - 1})"
                )


def check_diffing_layers(cfg: RunConfig, run_dir) -> None:
    """An existing run's crosscoder layers against the layers it harvested (both models on the same tokens), so
    a refused ``diffing.layers`` loses none of the run's crosscoders (the stage would clear them first)."""
    from pathlib import Path

    from lfp_core.store import RunReader
    from lfp_core.store.connection import db_path
    from lfp_core.store.summaries import ActivationsSummary

    if cfg.diffing.layers == "auto" or not db_path(Path(run_dir)).exists():
        return
    try:
        h = RunReader(run_dir).summary(ActivationsSummary)
    except Exception:  # an unreadable run is the precompute's to report
        return
    if h is None or not h.layers:
        return
    missing = [int(x) for x in cfg.diffing.layers if int(x) not in h.layers]
    if missing:
        raise ConfigError(
            f"diffing.layers (cc_layers) asks for layer(s) {missing} but this run harvested base and tuned "
            f"activations ({h.hook or 'hook_mlp_out'}) only at layers {sorted(h.layers)}: a crosscoder needs both "
            "models' activations on the same tokens; choose among those layers (nothing was changed)"
        )
