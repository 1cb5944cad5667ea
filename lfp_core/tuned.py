"""A tuned model given by the researcher (``--tuned PATH_OR_HUB_ID``) instead of one trained here.

The rlhf stage then trains nothing: it copies the given model's files into the run
(``artifacts/policy``, where every later stage and the dashboard's live lab load the tuned policy
from) and records that the pair was given, and where it came from. ``rl_eval``, divergence and
everything downstream run on the given pair exactly as on a trained one (the same held-out prompts,
lengths and seeds for both models).

:func:`check_tuned` refuses, before a run starts, a tuned model that cannot be a fine-tune of the
base model: it reads only the two models' ``config.json`` and tokenizer files (no weights) and names
every field that differs with both values. :func:`tuned_fingerprint` puts the given model's files into
the rlhf stage's hash, so a different or re-saved model recomputes the run from that stage on.

Importable without torch (the precompute's pre-flight and the stage registry use it).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from lfp_core.errors import BadInputError

log = logging.getLogger(__name__)

# files of a training checkpoint that are not part of the model
_NOT_MODEL = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "trainer_state.json", "CONFIG_HASH"}
_WHOLE_FILE_BYTES = 512 << 20  # larger weight files are fingerprinted by size and 16 sampled 1 MiB blocks
# (config attribute, name in messages); transformers maps GPT-2's n_layer/n_embd/n_head onto these names
_SHAPE = (
    ("vocab_size", "vocab_size"),
    ("num_hidden_layers", "n_layers"),
    ("hidden_size", "d_model (hidden_size)"),
    ("num_attention_heads", "attention heads"),
    ("num_key_value_heads", "key/value heads"),
    ("intermediate_size", "MLP width (intermediate_size)"),
)
_SHOWN = 3  # differences spelled out with both values; the rest are named


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _spec(path: str, role: str):
    from lfp_core.models import ModelLoadError, resolve_spec

    try:
        return resolve_spec(path)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{role}: {exc}") from None


def _config_and_tokenizer(spec, role: str) -> tuple[Any, Any]:
    """A model's config and tokenizer (config.json and the tokenizer files only; no weights)."""
    from transformers import AutoConfig, AutoTokenizer

    from lfp_core.models import ModelLoadError

    kwargs: dict[str, Any] = {"local_files_only": True} if spec.source == "hub" and _offline() else {}
    try:
        config = AutoConfig.from_pretrained(spec.location, **kwargs)
        tok = AutoTokenizer.from_pretrained(spec.location, **kwargs)
    except (OSError, ValueError) as exc:
        if kwargs:
            raise ModelLoadError(
                f"{role} {spec.location} is a hub id but the hub is offline (HF_HUB_OFFLINE=1) and it is not in the "
                f"local cache; on a machine with network run `hf download {spec.location} --local-dir "
                f"models/{spec.location.split('/')[-1]}` and pass that directory"
            ) from None
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]  # one line
        raise ModelLoadError(f"{role} {spec.location}: could not read its config and tokenizer: {first}") from None
    if tok.pad_token is None:  # as lfp_core.models.load_model does, so a saved policy compares equal
        tok.pad_token = tok.eos_token
    return config, tok


def _architecture(config) -> str:
    return (getattr(config, "architectures", None) or [config.model_type])[0]


def differences(base_cfg, tuned_cfg, base_tok, tuned_tok) -> list[tuple[str, Any, Any]]:
    """(field, tuned value, base value) of every architecture, shape or tokenizer field that differs."""
    out: list[tuple[str, Any, Any]] = []
    a, b = _architecture(tuned_cfg), _architecture(base_cfg)
    if a != b:
        out.append(("architecture", a, b))
    elif tuned_cfg.model_type != base_cfg.model_type:
        out.append(("model_type", tuned_cfg.model_type, base_cfg.model_type))
    for attr, name in _SHAPE:
        a, b = getattr(tuned_cfg, attr, None), getattr(base_cfg, attr, None)
        if a != b:
            out.append((name, a, b))
    va, vb = tuned_tok.get_vocab(), base_tok.get_vocab()
    if va != vb:
        moved = sum(1 for t, i in va.items() if vb.get(t) != i)
        out.append(
            (
                "tokenizer vocabulary",
                f"{len(va)} tokens ({moved} not in the base's at the same id)",
                f"{len(vb)} tokens",
            )
        )
    for special in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        a, b = getattr(tuned_tok, special, None), getattr(base_tok, special, None)
        if a != b:
            out.append((special, a, b))
    return out


def check_tuned(cfg: Any) -> None:
    """Refuse a ``--tuned`` model that differs from the base model in architecture, shape or tokenizer.

    Reads the two models' config.json and tokenizer files only.

    Raises:
        ModelLoadError: the tuned (or base) model cannot be found or read.
        BadInputError: a field differs; the message names each one with both values, e.g. "the tuned
            model's vocab_size is 512, the base model's is 4096".
    """
    if cfg.tuned.path is not None:
        _check_finetune(cfg.run.model, cfg.tuned.path, "--tuned", "tuned")


def check_null(cfg: Any) -> None:
    """The null fine-tune control's inputs (``diffing``): a given null model (``--null``) is checked like
    ``--tuned``; a null to be trained (shuffled or constant reward) for a given tuned model is refused,
    because the recipe that made the tuned model is unknown here.

    Raises:
        BadInputError: the null control cannot be made as asked; the message says what to pass instead.
    """
    d = getattr(cfg, "diffing", None)
    if d is None:
        return
    if d.null_path is not None:
        _check_finetune(cfg.run.model, d.null_path, "--null", "null")
    elif cfg.tuned.path is not None and d.null in ("shuffled", "constant"):
        raise BadInputError(
            f"a {d.null}-reward null fine-tune repeats the recipe that made the tuned model, and --tuned "
            f"{cfg.tuned.path} was given, not trained here, so its recipe is unknown: pass --null PATH (a model "
            f"fine-tuned from the same base by the same recipe with an uninformative reward), or --set "
            f"diffing.null=auto (no null control for a given tuned model)"
        )


def _check_finetune(base: str, path: str, flag: str, what: str) -> None:
    base_spec, tuned_spec = _spec(base, "--model"), _spec(path, flag)
    base_cfg, base_tok = _config_and_tokenizer(base_spec, "--model")
    tuned_cfg, tuned_tok = _config_and_tokenizer(tuned_spec, flag)
    diffs = differences(base_cfg, tuned_cfg, base_tok, tuned_tok)
    if diffs:
        said = "; ".join(f"the {what} model's {n} is {a}, the base model's is {b}" for n, a, b in diffs[:_SHOWN])
        if len(diffs) > _SHOWN:
            said += "; also different: " + ", ".join(n for n, _, _ in diffs[_SHOWN:])
        raise BadInputError(
            f"{flag} {tuned_spec.location} is not a fine-tune of the base model {base_spec.name} "
            f"({base_spec.location}): {said}"
        )


def files_fingerprint(directory: Path) -> str:
    """Identity of a model directory's files: each file's name and bytes (weight files over 512 MiB:
    their size and 16 evenly spaced 1 MiB blocks)."""
    h = hashlib.sha256()
    for f in sorted(p for p in directory.iterdir() if p.is_file() and p.name not in _NOT_MODEL):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            if size <= _WHOLE_FILE_BYTES:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            else:
                for k in range(16):
                    fh.seek(k * (size - (1 << 20)) // 15)
                    h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def null_fingerprint(s: Any) -> str | None:
    """The null stage's extra hash input: the given null model's files (None: the stage trains one)."""
    if s.diffing.null_path is None:
        return None
    spec = _spec(s.diffing.null_path, "--null")
    return f"hub:{spec.location}" if spec.source == "hub" else files_fingerprint(Path(spec.location))


def tuned_fingerprint(s: Any) -> str | None:
    """The rlhf stage's extra hash input: the given tuned model's files (None: the stage trains one)."""
    if s.tuned.path is None:
        return None
    spec = _spec(s.tuned.path, "--tuned")
    return f"hub:{spec.location}" if spec.source == "hub" else files_fingerprint(Path(spec.location))


def _model_dir(spec) -> Path:
    """The local directory holding a model's files (a hub model: its snapshot in the HF cache)."""
    if spec.source != "hub":
        return Path(spec.location)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec.location, local_files_only=_offline()))
    except Exception as exc:  # hub errors come in many types
        raise BadInputError(f"--tuned {spec.location}: could not fetch the model ({exc})") from None


def install_given(path: str, artifacts: Path, name: str = "policy", flag: str = "--tuned") -> tuple[Path, Any]:
    """Copy the given tuned model's files into ``artifacts/<name>`` (``policy``; the given null model's:
    ``null_policy``) via a temporary directory renamed into place, so a later stage never sees a half-copied
    model.

    Returns:
        (the policy directory, the given model's :class:`lfp_core.models.ModelSpec`).
    """
    spec = _spec(path, flag)
    src = _model_dir(spec)
    final, tmp = artifacts / name, artifacts / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n = 0
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name not in _NOT_MODEL and f.suffix not in (".pt", ".pth"):
            shutil.copyfile(f, tmp / f.name)  # the run's own copy (a symlink would break when the source moves)
            n += 1
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    log.info("given %s model %s: %d files copied to %s; nothing is trained", flag.lstrip("-"), spec.location, n, final)
    return final, spec
