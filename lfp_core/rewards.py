"""Reward plug-ins: what scores a (prompt, completion) pair in every stage that needs a reward.

A run's reward is named by one spec string (``reward.spec``, ``--reward SPEC``):

``vader`` (the default)
    The paper's VADER lexicon reward of the completion (:func:`lfp_core.reward.reward`: the summed
    lexicon valences of its words / 5, clipped to ±10); the prompt is not read. Kind ``"lexicon"``:
    every per-word reading of the pipeline (lexicon words, raw scores, word shifts, the per-token
    probe, the offline labeller's valence relevance, the policy's expected next-token valence) applies.
``classifier:PATH_OR_ID[:LABEL][@prob]``
    A Hugging Face sequence classifier (``AutoModelForSequenceClassification`` and its tokenizer, from
    a local directory or a hub id; offline, only a hub id already in the HF cache resolves). The score
    of a pair is the classifier's **logit** of ``LABEL`` on the text ``prompt + completion`` (tokenized
    with the tokenizer's own special tokens); with ``@prob`` it is the label's softmax probability
    instead. ``LABEL`` is a name from the model's ``config.id2label`` (or its integer id); without it,
    a model with exactly two labels (or one) uses its last label (e.g. ``POSITIVE`` of a sentiment
    model), and one with more must be told.
``reward-model:PATH_OR_ID``
    A scalar-head preference model (``AutoModelForSequenceClassification`` with ``num_labels`` 1), as
    the ``reward_model`` stage trains with trl's ``RewardTrainer`` and saves (``save_pretrained`` of the
    model and the tokenizer in one directory). The score is its scalar output on ``BOS + prompt +
    completion`` (BOS prepended when the tokenizer has one and does not add it itself, which is how
    that stage trains and scores).
``python:MODULE:FUNCTION``
    ``MODULE`` is a dotted module on ``sys.path`` or a path to a ``.py`` file; ``FUNCTION(prompts:
    list[str], completions: list[str])`` returns one number per pair.

Every reward other than ``vader`` is of kind ``"sequence"``: one number per text, no per-word table, so
the lexicon readings above are skipped (each stage records why in its summary's ``not_applicable``).

HF rewards (:mod:`lfp_core.reward_hf`) score in batches of equal token length (no padding, so a batched
score equals the model's score of that one text alone), on the given device, without gradients. Every
score is checked: one finite float per pair, else :class:`RewardError` naming the rows. :func:`check_reward` loads the run's
reward and scores two tiny probe pairs before a run touches its directory, so a broken plug-in is refused
(exit status 2) before any heavy work.

Importable without torch (the settings validate a spec with :func:`parse_spec`; the stage registry
hashes a plug-in's files with :func:`reward_fingerprint`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from lfp_core.errors import BadInputError, ConfigError

if TYPE_CHECKING:
    from lfp_core.settings import RunConfig

Kind = Literal["lexicon", "sequence"]
Form = Literal["vader", "classifier", "reward-model", "python"]
ACCEPTED = (
    "vader · classifier:PATH_OR_ID[:LABEL][@prob] · reward-model:PATH_OR_ID · python:MODULE:FUNCTION "
    "(MODULE a dotted module on sys.path or a path to a .py file)"
)
PROBE_PAIRS = (
    ("The movie was", " great fun and I loved it."),
    ("I watched this film", " and it was awful, boring and far too long."),
)
MAX_ROWS_NAMED = 10


class RewardSpecError(ConfigError):
    """A reward spec that does not parse, or names something that does not exist or cannot score."""


class RewardError(BadInputError):
    """A reward returned the wrong number of values, non-numbers or non-finite values (rows named)."""


# --- the spec -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RewardSpec:
    """A parsed spec. ``target``: the model path/id or the module; ``label``: the classifier's label or
    the python function; ``prob``: score the label's probability instead of its logit."""

    spec: str
    form: Form
    target: str = ""
    label: str | None = None
    prob: bool = False

    @property
    def kind(self) -> Kind:
        return "lexicon" if self.form == "vader" else "sequence"

    @property
    def name(self) -> str:
        """A short human name (a classifier's default label is resolved only on loading)."""
        short = Path(self.target).name if self.target and Path(self.target).expanduser().exists() else self.target
        if self.form == "vader":
            return "VADER lexicon"
        if self.form == "classifier":
            return f"classifier {short} ({self.label or 'default label'} {'probability' if self.prob else 'logit'})"
        if self.form == "reward-model":
            return f"reward model {short}"
        return f"python {short}:{self.label}"


def _bad(spec: str, why: str) -> RewardSpecError:
    return RewardSpecError(f"reward spec {spec!r} {why}; accepted forms: {ACCEPTED}")


def parse_spec(spec: str) -> RewardSpec:
    """Parse a reward spec (no loading, no imports).

    Raises:
        RewardSpecError: the spec does not parse (the message lists the accepted forms).
    """
    if not isinstance(spec, str):
        raise _bad(repr(spec), "is not a string")
    text = spec.strip()
    if text == "vader":
        return RewardSpec(text, "vader")
    form, sep, rest = text.partition(":")
    if not sep or form not in ("classifier", "reward-model", "python"):
        raise _bad(spec, "does not parse")
    if not rest.strip():
        raise _bad(spec, f"names no {'module' if form == 'python' else 'model'} after '{form}:'")
    if form == "python":
        module, sep, fn = rest.rpartition(":")
        if not sep or not module or not fn.isidentifier():
            raise _bad(spec, "needs python:MODULE:FUNCTION with FUNCTION a Python identifier")
        return RewardSpec(text, "python", module, fn)
    if form == "reward-model":
        return RewardSpec(text, "reward-model", rest)
    prob = False
    for suffix, is_prob in (("@prob", True), ("@logit", False)):
        if rest.endswith(suffix):
            rest, prob = rest[: -len(suffix)], is_prob
            break
    target, label = rest, None
    if ":" in rest and not Path(rest).expanduser().exists():
        target, _, label = rest.rpartition(":")
        if not target or not label:
            raise _bad(spec, "needs classifier:PATH_OR_ID[:LABEL][@prob] with a non-empty path and label")
    if "@" in (label or ""):
        raise _bad(spec, "has an unknown '@' suffix (only @prob or @logit, at the very end)")
    return RewardSpec(text, "classifier", target, label, prob)


def reward_kind(spec: str) -> Kind:
    """``"lexicon"`` (VADER) or ``"sequence"`` (every other plug-in), from the spec alone."""
    return parse_spec(spec).kind


def reward_name(spec: str) -> str:
    """The reward's short name from the spec alone (for pages and reports)."""
    return parse_spec(spec).name


# --- rewards --------------------------------------------------------------------------------------------
class Reward:
    """A loaded reward. ``score(prompts, completions)`` gives one finite float64 per pair.

    Attributes:
        name: what pages and reports call it.
        spec: the spec it was loaded from.
        kind: ``"lexicon"`` (VADER: per-word readings apply) or ``"sequence"``.
    """

    name: str
    spec: str
    kind: Kind

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        """Rewards of the pairs ``(prompts[i], completions[i])``.

        Raises:
            RewardError: unequal input lengths, or the scorer gave the wrong count or non-finite values.
        """
        prompts, completions = list(prompts), list(completions)
        if len(prompts) != len(completions):
            raise RewardError(f"reward {self.name}: {len(prompts)} prompts but {len(completions)} completions")
        if not completions:
            return np.zeros(0, dtype=np.float64)
        return checked_values(self._score(prompts, completions), len(completions), self.name)

    def _score(self, prompts: list[str], completions: list[str]) -> Any:
        raise NotImplementedError


def checked_values(values: Any, n: int, what: str) -> np.ndarray:
    """``values`` as a float64 vector of length ``n``, all finite.

    Raises:
        RewardError: not numbers, the wrong count, or non-finite values (the first rows are named).
    """
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise RewardError(
            f"reward {what} returned {type(values).__name__}, not a sequence of numbers ({exc})"
        ) from None
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1 or len(arr) != n:
        raise RewardError(
            f"reward {what} returned {arr.size if arr.ndim != 1 else len(arr)} values "
            f"(shape {tuple(arr.shape)}) for {n} (prompt, completion) pairs; it must return one number per pair"
        )
    bad = np.nonzero(~np.isfinite(arr))[0]
    if len(bad):
        rows = ", ".join(str(int(i)) for i in bad[:MAX_ROWS_NAMED]) + (", …" if len(bad) > MAX_ROWS_NAMED else "")
        raise RewardError(
            f"reward {what} returned non-finite values ({', '.join(sorted({str(arr[i]) for i in bad}))}) "
            f"at {len(bad)} of {n} rows: {rows}"
        )
    return arr


class VaderReward(Reward):
    """The paper's VADER lexicon reward of the completion (the prompt is not read)."""

    def __init__(self, spec: str = "vader"):
        self.spec, self.name, self.kind = spec, "VADER lexicon", "lexicon"

    def _score(self, prompts: list[str], completions: list[str]) -> list[float]:
        from lfp_core import reward

        return [reward.reward(c) for c in completions]


class PythonReward(Reward):
    """``FUNCTION(prompts, completions)`` of a user's module."""

    def __init__(self, parsed: RewardSpec):
        self.spec, self.kind = parsed.spec, "sequence"
        self.module_name, self.function_name = parsed.target, str(parsed.label)
        self.fn = _import_function(parsed)
        self.name = parsed.name

    def _score(self, prompts: list[str], completions: list[str]) -> Any:
        try:
            return self.fn(list(prompts), list(completions))
        except BadInputError:
            raise
        except Exception as exc:
            raise RewardError(
                f"reward python:{self.module_name}:{self.function_name} raised {type(exc).__name__}: {exc}"
            ) from exc


def load_reward(spec: str, *, device: str = "cpu") -> Reward:
    """The reward a spec names, loaded (models on ``device``, eval mode).

    Raises:
        RewardSpecError: the spec does not parse, or its model, module or function does not exist,
            or the classifier's label is not in its config.
    """
    parsed = parse_spec(spec)
    if parsed.form == "vader":
        return VaderReward(parsed.spec)
    if parsed.form == "python":
        return PythonReward(parsed)
    from lfp_core.reward_hf import ClassifierReward, PreferenceModelReward  # torch, transformers

    if parsed.form == "classifier":
        return ClassifierReward(parsed, device=device)
    return PreferenceModelReward(parsed, device=device)


def check_reward(cfg: RunConfig) -> None:
    """Pre-flight: load the run's reward and score :data:`PROBE_PAIRS`, before the run directory is
    touched, so a broken plug-in is refused (BadInputError, exit 2) before any heavy work.

    Raises:
        RewardSpecError, RewardError: what is wrong with the plug-in; ConfigError: a non-VADER reward
            with the HH task (which trains on preference pairs, not on a reward).
    """
    spec = cfg.reward.spec
    if cfg.run.task == "hh":
        if parse_spec(spec).form != "vader":
            raise ConfigError(f"--reward {spec}: the hh task trains DPO on preference pairs and reads no reward")
        return
    rw = load_reward(spec, device=cfg.run.device)
    rw.score([p for p, _ in PROBE_PAIRS], [c for _, c in PROBE_PAIRS])


def lexicon_only(what: str, name: str) -> str:
    """The reason a lexicon reading is skipped under a sequence reward (a stage's ``not_applicable``)."""
    return f"{what}: needs the VADER lexicon's per-word valences, and the run's reward ({name}) scores whole texts"


# --- where a plug-in lives, and its identity ------------------------------------------------------------
def _hf_dir(location: str) -> Path | None:
    p = Path(location).expanduser()
    return p.resolve() if p.is_dir() else None


def _module_file(parsed: RewardSpec) -> Path | None:
    target = parsed.target
    if target.endswith(".py") or os.sep in target:
        return Path(target).expanduser().resolve()
    try:
        found = importlib.util.find_spec(target)
    except (ImportError, ValueError):
        return None
    return Path(found.origin) if found is not None and found.origin and os.path.isfile(found.origin) else None


def _import_function(parsed: RewardSpec) -> Callable[..., Any]:
    target, fn_name = parsed.target, str(parsed.label)
    if target.endswith(".py") or os.sep in target:
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise RewardSpecError(f"reward {parsed.spec!r}: the module file {path} does not exist")
        name = f"lfp_reward_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
        mod_spec = importlib.util.spec_from_file_location(name, path)
        if mod_spec is None or mod_spec.loader is None:
            raise RewardSpecError(f"reward {parsed.spec!r}: {path} cannot be imported as a Python module")
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module
        try:
            mod_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise RewardSpecError(
                f"reward {parsed.spec!r}: importing {path} raised {type(exc).__name__}: {exc}"
            ) from exc
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            if exc.name and (target == exc.name or target.startswith(exc.name + ".")):
                raise RewardSpecError(
                    f"reward {parsed.spec!r}: no module named {target!r} on sys.path (give a dotted module "
                    "importable from the working directory or PYTHONPATH, or a path to a .py file)"
                ) from None
            raise RewardSpecError(f"reward {parsed.spec!r}: importing {target} failed: {exc}") from exc
        except Exception as exc:
            raise RewardSpecError(
                f"reward {parsed.spec!r}: importing {target} raised {type(exc).__name__}: {exc}"
            ) from exc
    fn = getattr(module, fn_name, None)
    if fn is None:
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise RewardSpecError(
            f"reward {parsed.spec!r}: module {target} has no function {fn_name!r}"
            + (f" (its functions: {', '.join(public[:12])})" if public else "")
        )
    if not callable(fn):
        raise RewardSpecError(f"reward {parsed.spec!r}: {target}.{fn_name} is a {type(fn).__name__}, not a function")
    return fn


def spec_fingerprint(spec: str) -> str | None:
    """The identity of a plug-in's files, beyond its spec: a local model directory's config.json content
    and weight file sizes (as :func:`lfp_core.pipeline.base.model_fingerprint`), a hub id as is, a python
    module's source file content (not the modules it imports); None for VADER (the spec says it all)."""
    parsed = parse_spec(spec)
    if parsed.form == "vader":
        return None
    h = hashlib.sha256(parsed.form.encode())
    if parsed.form == "python":
        f = _module_file(parsed)
        h.update(f.read_bytes() if f is not None and f.is_file() else f"missing:{parsed.target}".encode())
        return h.hexdigest()[:16]
    d = _hf_dir(parsed.target)
    if d is None:
        return f"hub:{parsed.target}"
    cfg = d / "config.json"
    h.update(cfg.read_bytes() if cfg.is_file() else b"no config.json")
    for f in sorted(d.glob("*.safetensors")) + sorted(d.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def reward_fingerprint(settings: Any) -> str | None:
    """A stage's fingerprint (:attr:`lfp_core.stages.StageSpec.fingerprint`): its reward plug-in's
    files (:func:`spec_fingerprint`), so changing the classifier, the preference model or the python
    module recomputes the stages that score with it."""
    return spec_fingerprint(settings.reward.spec)
