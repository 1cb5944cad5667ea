"""Given SAEs: SAEs a researcher brings, used instead of the ones the ``saes`` stage trains.

A source (``--saes [ROLE=]SRC``; the settings ``sae_source.tuned`` and ``sae_source.base``) is

* a directory holding one sae-lens SAE (``cfg.json`` + ``sae_weights.safetensors``, as
  ``sae_lens.SAE.save_model`` writes them), or one SAE per subdirectory, one per hook;
* the ``artifacts/saes`` folder of a run of this tool, or that run's directory: its
  ``<role>-L<layer>-main`` SAEs of the role they are given for (the run's other SAEs, its other-seed
  references and variants, are left alone);
* ``sae-lens:RELEASE`` (every SAE of the release) or ``sae-lens:RELEASE:SAE_ID[,SAE_ID...]``: SAEs of
  sae-lens's pretrained registry, loaded with ``SAE.from_pretrained(release, sae_id)``. The registry
  (release and SAE ids) ships with sae-lens and is checked offline; the SAEs' configs and weights come
  from the Hugging Face hub, so with ``HF_HUB_OFFLINE=1`` such a source is refused with a message
  saying how to save the SAEs into a directory instead.

Every given SAE must read one block's d_model-wide stream (``blocks.L.<hook>`` with a hook of
:data:`lfp_core.settings.SAEHook`), the hook the run harvests (``sae_source.hook``), at a layer the model
has, with ``d_in`` equal to the model's d_model; one SAE per layer per model, and when both models' SAEs
are given, at the same layers. :func:`check_saes` checks this from the ``cfg.json`` files (and the
model's config) before a run writes anything; the saes stage checks it again against the loaded model.
The layers the later stages study are then the given SAEs' layers, not the divergence stage's choice.

Light: imports no torch until a model's config or an SAE is loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from lfp_core.errors import BadInputError, MissingInputError
from lfp_core.settings import RunConfig, SAEHook, SAESourceSettings

log = logging.getLogger(__name__)

HOOKS: tuple[str, ...] = get_args(SAEHook)
DEFAULT_HOOK = "hook_mlp_out"
RELEASE_PREFIX = "sae-lens:"
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
_BLOCK_HOOK = re.compile(r"blocks\.(\d+)\.(hook_\w+)")
_RUN_SAE = re.compile(r"(base|tuned)-L(\d+)-main")


class GivenSAEError(BadInputError):
    """A given SAE that cannot be used: missing, malformed, or not fitting the model or the hook."""


@dataclass(frozen=True)
class GivenSAE:
    """One given SAE, as its config describes it.

    Attributes:
        role: the model it is given for (``tuned`` or ``base``).
        where: its directory, or ``sae-lens:RELEASE:SAE_ID``.
        hook_name: the hook point it reads, ``blocks.L.<hook>``.
        layer: ``L``; hook: ``<hook>``.
        d_in, d_sae: input width and dictionary size.
        cfg: its configuration as read.
        release, sae_id: the registry entry of a pretrained SAE (None for a directory).
    """

    role: str
    where: str
    hook_name: str
    layer: int
    hook: str
    d_in: int
    d_sae: int
    cfg: dict
    release: str | None = None
    sae_id: str | None = None


@dataclass(frozen=True)
class ModelShape:
    """What given SAEs are checked against: the model's width, its layers and its blocks' stream hooks."""

    name: str
    d_model: int
    n_layers: int
    hooks: frozenset[str]


def hook_name(layer: int, hook: str = DEFAULT_HOOK) -> str:
    return f"blocks.{int(layer)}.{hook}"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


# --- reading sources ---------------------------------------------------------------------------------
def parse_release(src: str) -> tuple[str, list[str] | None]:
    """``sae-lens:RELEASE[:ID,ID...]`` -> (release, ids or None for every SAE of the release)."""
    body = src[len(RELEASE_PREFIX) :] if src.startswith(RELEASE_PREFIX) else src
    release, _, ids = body.partition(":")
    release = release.strip()
    if not release:
        raise GivenSAEError(
            f"--saes {src!r}: name a sae-lens release, e.g. sae-lens:pythia-70m-deduped-mlp-sm or "
            "sae-lens:pythia-70m-deduped-mlp-sm:blocks.3.hook_mlp_out"
        )
    picked = [x.strip() for x in ids.split(",") if x.strip()] if ids.strip() else None
    return release, picked


def _read_cfg(where: Path) -> dict:
    cfg_file = where / CFG_FILE
    if not cfg_file.is_file():
        raise MissingInputError(
            f"SAE at {where}: no {CFG_FILE} (a sae-lens SAE folder holds {CFG_FILE} + {WEIGHTS_FILE})"
        )
    if not (where / WEIGHTS_FILE).is_file():
        raise MissingInputError(f"SAE at {where}: {CFG_FILE} but no {WEIGHTS_FILE}")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GivenSAEError(f"SAE at {where}: {CFG_FILE} is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise GivenSAEError(f"SAE at {where}: {CFG_FILE} holds a {type(cfg).__name__}, not a JSON object")
    return cfg


def describe(role: str, where: str, cfg: dict, release: str | None = None, sae_id: str | None = None) -> GivenSAE:
    """A :class:`GivenSAE` from its config (sae-lens 6: ``metadata.hook_name``; older: ``hook_name``).

    Raises:
        GivenSAEError: a field is missing or of the wrong kind, or the hook is not a block's d_model stream.
    """
    fields: dict[str, Any] = {}
    for name in ("d_in", "d_sae"):
        value = cfg.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise GivenSAEError(f"SAE at {where}: field {name} is {value!r} in its config; expected a positive integer")
        fields[name] = value
    raw_meta = cfg.get("metadata")
    meta: dict = raw_meta if isinstance(raw_meta, dict) else {}
    hn = meta.get("hook_name") or cfg.get("hook_name")
    if not isinstance(hn, str) or not hn:
        raise GivenSAEError(f"SAE at {where}: field hook_name is missing from its config (metadata.hook_name)")
    m = _BLOCK_HOOK.fullmatch(hn)
    if m is None or m.group(2) not in HOOKS or cfg.get("hook_head_index") is not None:
        raise GivenSAEError(
            f"SAE at {where}: field hook_name is {hn!r}, not a block's d_model-wide stream; supported: "
            f"blocks.L.{{{', '.join(HOOKS)}}}"
        )
    return GivenSAE(role, where, hn, int(m.group(1)), m.group(2), fields["d_in"], fields["d_sae"], cfg, release, sae_id)


def _sae_dirs(role: str, root: Path) -> list[Path]:
    """The SAE folders a directory source names for ``role`` (see the module docstring)."""
    if not root.exists():
        raise MissingInputError(f"--saes {role}={root}: no such directory")
    if not root.is_dir():
        raise GivenSAEError(f"--saes {role}={root}: a file; give a directory of sae-lens SAEs or sae-lens:RELEASE")
    if (root / CFG_FILE).exists():
        return [root]
    if (root / "artifacts" / "saes").is_dir():  # a run directory of this tool
        root = root / "artifacts" / "saes"
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.endswith(".partial"))
    own = [p for p in subdirs if _RUN_SAE.fullmatch(p.name)]
    if own:  # a run's artifacts/saes: its main SAEs of this role
        mine = [p for p in own if p.name.startswith(f"{role}-")]
        if not mine:
            raise GivenSAEError(
                f"--saes {role}={root}: a run's SAE folder without {role} SAEs (it holds {', '.join(p.name for p in own)})"
            )
        return mine
    found = [p for p in subdirs if (p / CFG_FILE).exists() or (p / WEIGHTS_FILE).exists()]
    if not found:
        raise MissingInputError(
            f"--saes {role}={root}: no SAE in it (expected {CFG_FILE} + {WEIGHTS_FILE} in the directory or in each "
            "of its subdirectories, one per hook)"
        )
    return found


def _registry_entry(src: str):
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    release, ids = parse_release(src)
    directory = get_pretrained_saes_directory()
    if release not in directory:
        import difflib

        near = difflib.get_close_matches(release, list(directory), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise GivenSAEError(f"--saes {src}: {release!r} is not a release of sae-lens's pretrained registry{hint}")
    lookup = directory[release]
    unknown = [i for i in ids or [] if i not in lookup.saes_map]
    if unknown:
        some = ", ".join(list(lookup.saes_map)[:6])
        raise GivenSAEError(
            f"--saes {src}: release {release} has no SAE id {unknown[0]!r}; its ids include {some}"
            + (" ..." if len(lookup.saes_map) > 6 else "")
        )
    return release, (ids or list(lookup.saes_map)), lookup


def _release_saes(role: str, src: str) -> list[GivenSAE]:
    release, ids, lookup = _registry_entry(src)
    if _offline():
        raise GivenSAEError(
            f"--saes {src}: sae-lens:{release} ({len(ids)} SAE(s), model {lookup.model}) is loaded from the Hugging "
            "Face hub, which is offline here (HF_HUB_OFFLINE=1). On a machine with network, load each with "
            f"sae_lens.SAE.from_pretrained({release!r}, SAE_ID) and save it with sae.save_model(DIR/SAE_ID), then "
            f"pass --saes {role}=DIR"
        )
    from sae_lens.loading.pretrained_sae_loaders import load_sae_config_from_huggingface

    out = []
    for sae_id in ids:
        where = f"{RELEASE_PREFIX}{release}:{sae_id}"
        try:
            cfg = load_sae_config_from_huggingface(release, sae_id)
        except Exception as exc:  # the hub unreachable, a repository gone: the user's input cannot be read
            raise GivenSAEError(f"SAE at {where}: could not fetch its config from the hub ({exc})") from exc
        out.append(describe(role, where, cfg, release, sae_id))
    return out


def resolve(role: str, src: str) -> list[GivenSAE]:
    """The SAEs a source gives ``role``, by layer, one per layer.

    Raises:
        MissingInputError: the directory or an SAE file is missing.
        GivenSAEError: a malformed config, an unknown release or id, a pretrained source offline, or two
            SAEs at one hook.
    """
    if src.startswith(RELEASE_PREFIX):
        found = _release_saes(role, src)
    else:
        found = [describe(role, str(p), _read_cfg(p)) for p in _sae_dirs(role, Path(src).expanduser())]
    by_hook: dict[str, GivenSAE] = {}
    for g in found:
        if g.hook_name in by_hook:
            raise GivenSAEError(
                f"--saes {role}={src}: two SAEs read {g.hook_name} ({by_hook[g.hook_name].where} and {g.where}); "
                "give one SAE per hook (one subdirectory each)"
            )
        by_hook[g.hook_name] = g
    return sorted(found, key=lambda g: g.layer)


def resolve_all(s: SAESourceSettings) -> dict[str, list[GivenSAE]]:
    """``{role: SAEs}`` of every role whose SAEs are given, checked to share one set of layers."""
    given = {role: resolve(role, src) for role, src in s.given().items()}
    layer_sets = {role: [g.layer for g in v] for role, v in given.items()}
    if len({tuple(v) for v in layer_sets.values()}) > 1:
        raise GivenSAEError(
            f"the given base SAEs read layers {layer_sets['base']} but the tuned SAEs read layers "
            f"{layer_sets['tuned']}: give both models' SAEs at the same layers (the comparisons are per layer)"
        )
    return given


def given_layers(s: SAESourceSettings) -> list[int] | None:
    """The layers of the given SAEs (the layers the run then studies); None when none are given."""
    given = resolve_all(s)
    return [g.layer for g in next(iter(given.values()))] if given else None


# --- checks --------------------------------------------------------------------------------------------
def shape_of_hooked(hooked, name: str = "the model") -> ModelShape:
    """The :class:`ModelShape` of a loaded transformer-lens model."""
    hooks = {n.split(".", 2)[2] for n in hooked.hook_dict if n.startswith("blocks.0.") and n.count(".") == 2}
    return ModelShape(name, int(hooked.cfg.d_model), int(hooked.cfg.n_layers), frozenset(hooks & set(HOOKS)))


def model_shape(model: str) -> ModelShape:
    """The :class:`ModelShape` of ``model`` (a ``--model`` value) from its config alone: one of its blocks
    is built on the meta device (no memory, no weights) to list the hook points transformer-lens gives it."""
    import torch
    from transformer_lens.components import TransformerBlock

    from lfp_core.models import hooked_config

    cfg = hooked_config(model)
    with torch.device("meta"):
        block = TransformerBlock(cfg, 0)
    hooks = {n for n, _ in block.named_children() if n in HOOKS}
    return ModelShape(str(model), int(cfg.d_model), int(cfg.n_layers), frozenset(hooks))


def check_hook(shape: ModelShape, hook: str) -> None:
    """The harvested hook must be one of the model's blocks' stream hooks (e.g. a model whose attention and
    MLP run in parallel has no ``hook_resid_mid``)."""
    if hook not in shape.hooks:
        raise GivenSAEError(
            f"--hook {hook}: the blocks of {shape.name} have no {hook} (they have {', '.join(sorted(shape.hooks))})"
            + (
                "; its attention and MLP run in parallel, so there is no stream between them"
                if hook == "hook_resid_mid"
                else ""
            )
        )


def check_given(given: dict[str, list[GivenSAE]], shape: ModelShape, hook: str) -> None:
    """Each given SAE against the model and the harvested hook.

    Raises:
        GivenSAEError: naming the SAE, the field, its value and the model's.
    """
    for sae_list in given.values():
        for g in sae_list:
            if g.hook != hook:
                raise GivenSAEError(
                    f"SAE at {g.where}: field hook_name is {g.hook_name} ({g.hook}) but this run harvests {hook}; "
                    f"pass --hook {g.hook} to harvest the hook the SAE reads"
                )
            if g.hook not in shape.hooks:
                check_hook(shape, g.hook)
            if not 0 <= g.layer < shape.n_layers:
                raise GivenSAEError(
                    f"SAE at {g.where}: field hook_name is {g.hook_name}, layer {g.layer}, but {shape.name} has "
                    f"n_layers {shape.n_layers} (layers 0..{shape.n_layers - 1})"
                )
            if g.d_in != shape.d_model:
                raise GivenSAEError(
                    f"SAE at {g.where}: field d_in is {g.d_in} but {shape.name} has d_model {shape.d_model}: it "
                    "reads another model's activations"
                )


def check_saes(cfg: RunConfig) -> None:
    """Pre-flight: the given SAEs and the hook fit the run's model. Reads the SAEs' ``cfg.json`` files
    (or, for ``sae-lens:`` sources, sae-lens's registry and the configs on the hub) and the model's config;
    loads no weights and writes nothing. Nothing to check for a run that trains its SAEs on MLP outputs.

    Raises:
        BadInputError: a source, an SAE or the hook that cannot be used (the message names which and why).
    """
    s = cfg.sae_source
    if not s.given() and s.hook == DEFAULT_HOOK:
        return
    if cfg.run.task != "vader":
        raise GivenSAEError(
            f"--saes/--hook: the {cfg.run.task} task has no SAE stages (its pipeline ends with the divergence "
            "stage); give SAEs to a vader run"
        )
    given = resolve_all(s)  # the SAEs' own errors first: they need no model
    shape = model_shape(cfg.run.model)
    check_hook(shape, s.hook)
    check_given(given, shape, s.hook)
    for role, sae_list in given.items():
        log.info(
            "given %s SAEs (%s): %d at layers %s, %s",
            role,
            s.given()[role],
            len(sae_list),
            [g.layer for g in sae_list],
            s.hook,
        )


# --- hashing and loading ----------------------------------------------------------------------------------
def _fingerprint_source(role: str, src: str) -> str:
    if src.startswith(RELEASE_PREFIX):
        from importlib.metadata import version

        return f"{src}|sae-lens {version('sae-lens')}"
    try:
        dirs = _sae_dirs(role, Path(src).expanduser())
    except BadInputError as exc:
        return f"unreadable {src}: {exc}"
    h = hashlib.sha256()
    for d in dirs:
        h.update(d.name.encode())
        cfg_file = d / CFG_FILE
        h.update(cfg_file.read_bytes() if cfg_file.is_file() else b"<no cfg>")
        for f in sorted(p for p in d.iterdir() if p.is_file() and p.name != CFG_FILE):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def fingerprint(settings: Any) -> str | None:
    """What the hash of a stage holding ``sae_source`` adds for given SAEs: each source's SAE configs
    (``cfg.json`` content) and file sizes, or a pretrained source's name and the sae-lens version; None
    when no SAEs are given (the hash is then what it was before SAEs could be given)."""
    s: SAESourceSettings = settings.sae_source
    given = s.given()
    if not given:
        return None
    return "given-saes:" + ";".join(f"{role}={_fingerprint_source(role, src)}" for role, src in given.items())


def load_given(g: GivenSAE, device: str = "cpu"):
    """Load a given SAE with sae-lens (from its directory, or ``SAE.from_pretrained``), in eval mode."""
    import warnings

    from sae_lens import SAE

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if g.release is not None:
            sae = SAE.from_pretrained(g.release, g.sae_id, device=device)
        else:
            sae = SAE.load_from_disk(g.where, device=device)
    sae.eval()
    if sae.cfg.metadata.hook_name != g.hook_name or int(sae.cfg.d_in) != g.d_in:
        raise GivenSAEError(
            f"SAE at {g.where}: sae-lens loaded it as {sae.cfg.metadata.hook_name} with d_in {sae.cfg.d_in}, but its "
            f"config says {g.hook_name} with d_in {g.d_in}"
        )
    return sae


__all__ = [
    "GivenSAE",
    "GivenSAEError",
    "HOOKS",
    "ModelShape",
    "check_given",
    "check_hook",
    "check_saes",
    "describe",
    "fingerprint",
    "given_layers",
    "load_given",
    "model_shape",
    "parse_release",
    "resolve",
    "resolve_all",
    "shape_of_hooked",
]
