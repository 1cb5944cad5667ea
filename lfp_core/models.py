"""Load language models: the shipped demo model, a local HF directory, or a hub id.

Every model is available in two forms that share weights' values:

* the HF ``PreTrainedModel`` (the RL stage trains in HF space; generation uses its KV cache), and
* a transformer-lens ``HookedSAETransformer`` (hooks, SAE splicing), built from the HF weights.

No weight processing is applied on conversion (no LayerNorm folding, no centring), so
``blocks.L.hook_mlp_out`` equals the HF model's MLP output and log-probs match the HF model's
to float precision. ``HookedTransformer.from_pretrained(<local dir>)`` does not work offline, so
the hooked model is assembled from transformer-lens's config and state-dict converters.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lfp_core.config import DEMO_MODEL_DIR
from lfp_core.errors import BadInputError

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = {
    "GPTNeoXForCausalLM": "GPT-NeoX / Pythia",
    "GPTNeoForCausalLM": "GPT-Neo",
    "GPT2LMHeadModel": "GPT-2",
    "LlamaForCausalLM": "Llama",
    "GemmaForCausalLM": "Gemma",
}
ACCEPTED_FORMS = (
    "'demo' (the shipped IMDB model), a local Hugging Face model directory (config.json + "
    "weights) of a supported architecture (" + ", ".join(SUPPORTED_ARCHITECTURES.values()) + "), "
    "or a hub id such as EleutherAI/pythia-70m (needs network)"
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_TL_ALIASES = {"pythia-70m", "pythia-160m", "gpt-neo-125m", "gemma-2b", "gpt2"}


class ModelLoadError(BadInputError):
    """A model spec that cannot be loaded; the message says why and what is accepted."""


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from. ``source`` is 'demo', 'local' or 'hub'."""

    source: str
    location: str  # absolute directory for demo/local, hub id for hub
    name: str


@dataclass
class LoadedModel:
    """An HF model with its tokenizer; :meth:`hooked` builds (once) the transformer-lens view."""

    spec: ModelSpec
    hf: Any  # transformers.PreTrainedModel, eval mode
    tokenizer: Any
    device: str = "cpu"
    _hooked: Any = None

    def hooked(self):
        """The HookedSAETransformer with the HF model's current weights (built on first use)."""
        if self._hooked is None:
            self._hooked = to_hooked(self.hf, self.tokenizer, self.spec, self.device)
        return self._hooked

    def info(self) -> dict:
        """Size and shape of the model, as stored in the run and shown in reports."""
        c = self.hf.config
        return {
            "name": self.spec.name,
            "source": self.spec.source,
            "location": self.spec.location,
            "architecture": (c.architectures or [type(self.hf).__name__])[0],
            "n_params": int(sum(p.numel() for p in self.hf.parameters())),
            "n_layers": int(getattr(c, "num_hidden_layers", getattr(c, "n_layer", 0))),
            "d_model": int(getattr(c, "hidden_size", getattr(c, "n_embd", 0))),
            "vocab_size": int(c.vocab_size),
        }


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def resolve_spec(spec: str | os.PathLike | None) -> ModelSpec:
    """Turn a user's model argument into a :class:`ModelSpec`, or raise ModelLoadError."""
    if spec is None or str(spec) == "demo":
        if not (DEMO_MODEL_DIR / "config.json").exists():
            raise ModelLoadError(
                f"the shipped demo model is missing from {DEMO_MODEL_DIR}; restore it with git "
                "(git checkout -- data/models) or retrain it with scripts/train_demo_lm.py"
            )
        return ModelSpec("demo", str(DEMO_MODEL_DIR), "imdb-neox-5m (demo)")
    text = str(spec)
    path = Path(text).expanduser()
    if path.exists():
        path = path.resolve()
        if not path.is_dir():
            raise ModelLoadError(f"model path {path} is a file; expected a directory. Accepted: {ACCEPTED_FORMS}")
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise ModelLoadError(f"model directory {path} has no config.json. Accepted: {ACCEPTED_FORMS}")
        try:
            arch = (json.loads(cfg_file.read_text()).get("architectures") or ["<none given>"])[0]
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"{cfg_file} is not valid JSON ({exc})") from exc
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"model directory {path} holds architecture {arch!r}, which LFP Explorer does not "
                f"support; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        generic = path.name.lower() in {"hf", "model", "final", "checkpoint", "policy"}
        return ModelSpec("local", str(path), f"{path.parent.name}/{path.name}" if generic else path.name)
    looks_like_path = text.startswith((".", "/", "~")) or os.sep * 2 in text or text.count("/") > 1
    if not looks_like_path and (_HUB_ID.match(text) or text.lower() in _TL_ALIASES):
        return ModelSpec("hub", text, text)
    raise ModelLoadError(f"model path {path} does not exist. Accepted: {ACCEPTED_FORMS}")


@dataclass(frozen=True)
class ModelShape:
    """A model's layer count and residual width, read from its config.json (no weights loaded)."""

    name: str
    n_layers: int
    d_model: int


_N_LAYERS_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_D_MODEL_KEYS = ("hidden_size", "n_embd", "d_model")


def model_shape(spec: str | os.PathLike | None) -> ModelShape | None:
    """The shape of the model ``spec`` names, from its config.json alone: the file of a demo or local
    directory, or a hub id's from the local Hugging Face cache (downloaded, a few kB, only when online).
    None when it cannot be read without loading the model (a spec the model stage will refuse itself,
    a hub id offline and not cached, a config without these fields)."""
    try:
        ms = resolve_spec(spec)
    except ModelLoadError:
        return None
    cfg_file: str | os.PathLike | None = None
    if ms.source in ("demo", "local"):
        cfg_file = Path(ms.location) / "config.json"
    else:
        try:
            from huggingface_hub import hf_hub_download, try_to_load_from_cache

            cached = try_to_load_from_cache(ms.location, "config.json")
            if isinstance(cached, str):
                cfg_file = cached
            elif not _offline():
                cfg_file = hf_hub_download(ms.location, "config.json")
        except Exception as exc:  # noqa: BLE001  (no network, no such repo, ...: the model stage will say)
            log.debug("no config.json for %s before loading it: %s", ms.location, exc)
            return None
    if cfg_file is None:
        return None
    try:
        raw = json.loads(Path(cfg_file).read_text())
    except (OSError, ValueError):
        return None
    raw = {**raw.get("text_config", {}), **raw} if isinstance(raw.get("text_config"), dict) else raw
    n_layers = next((raw[k] for k in _N_LAYERS_KEYS if isinstance(raw.get(k), int)), None)
    d_model = next((raw[k] for k in _D_MODEL_KEYS if isinstance(raw.get(k), int)), None)
    if n_layers is None or d_model is None:
        return None
    return ModelShape(ms.name, int(n_layers), int(d_model))


def load_model(spec: str | os.PathLike | None = "demo", device: str = "cpu") -> LoadedModel:
    """Load a model (HF weights in float32, eval mode) and its tokenizer.

    Args:
        spec: 'demo', a local HF directory, or a hub id (see :data:`ACCEPTED_FORMS`).
        device: torch device.

    Raises:
        ModelLoadError: the spec is wrong, the architecture unsupported, or a hub id is
            requested while offline.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ms = resolve_spec(spec)
    kwargs: dict[str, Any] = {}
    if ms.source == "hub" and _offline():
        kwargs["local_files_only"] = True
    try:
        tokenizer = AutoTokenizer.from_pretrained(ms.location, **kwargs)
        hf = AutoModelForCausalLM.from_pretrained(ms.location, dtype=torch.float32, **kwargs)
    except OSError as exc:
        if ms.source != "hub":
            raise ModelLoadError(f"could not load the model in {ms.location}: {exc}") from exc
        why = "the hub is offline (HF_HUB_OFFLINE=1)" if _offline() else f"the hub could not be reached ({exc})"
        raise ModelLoadError(
            f"{ms.location!r} is a hub id but {why} and it is not in the local cache. On a machine "
            f"with network, run `hf download {ms.location} --local-dir models/{ms.location.split('/')[-1]}` "
            "and pass that directory as --model"
        ) from exc
    arch = (hf.config.architectures or [type(hf).__name__])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"{ms.location} has architecture {arch!r}, which LFP Explorer does not support")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    hf.to(device).eval()  # type: ignore[arg-type]  # transformers types PreTrainedModel.to via functools.wraps
    return LoadedModel(spec=ms, hf=hf, tokenizer=tokenizer, device=device)


def strips_leading_space(tokenizer) -> bool:
    """Whether decoding drops the first token's leading space, so ``decode(a) + decode(b)`` is not
    ``decode(a + b)``: SentencePiece tokenizers such as Llama's decode ``"▁there"`` alone as ``"there"``.
    Byte-level BPE tokenizers (GPT-2, GPT-NeoX, the demo model) keep it (``"Ġthere"`` → ``" there"``)."""
    ids = tokenizer("one two three", add_special_tokens=False)["input_ids"]
    whole = tokenizer.decode(ids)
    return any(tokenizer.decode(ids[:i]) + tokenizer.decode(ids[i:]) != whole for i in range(1, len(ids)))


def continuation_decoder(tokenizer, **decode_kwargs: Any) -> Callable[[Sequence[int]], str]:
    """A function that decodes token ids as they read after earlier text: a completion keeps its
    leading space and a single token its own (``" there"``), so prompt text + completion text reads
    as the whole sequence does.

    For tokenizers that decode pieces faithfully this is ``tokenizer.decode`` itself; for those that
    strip a leading space (:func:`strips_leading_space`) the ids are decoded behind an anchor token
    whose text is then cut off.
    """
    if not strips_leading_space(tokenizer):
        return lambda ids: tokenizer.decode(list(ids), **decode_kwargs)
    anchor = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    head = len(tokenizer.decode(anchor, **decode_kwargs))
    return lambda ids: tokenizer.decode(anchor + list(ids), **decode_kwargs)[head:]


def _tl_name(location: str, hf_config, tmp: str) -> str:
    """The name transformer-lens reads ``location``'s config under (a config-only copy in ``tmp`` when
    it needs a field transformers no longer writes)."""
    if hf_config.model_type == "gpt2" and not hasattr(hf_config, "n_ctx"):
        # transformer-lens reads GPT-2's n_ctx, which transformers 5 no longer writes; give it a
        # config-only directory with the field (weights come from the HF model, not from disk).
        d = Path(tmp) / Path(location).name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({**hf_config.to_dict(), "n_ctx": hf_config.n_positions}))
        return str(d)
    return location


def hooked_config(spec: str | os.PathLike | None = "demo"):
    """transformer-lens's config of a model (d_model, n_layers, block layout) from its config file alone,
    without its weights: for checks made before a run loads the model.

    Raises:
        ModelLoadError: the model cannot be resolved or its config read.
    """
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoConfig

    ms = resolve_spec(spec)
    try:
        hf_config = AutoConfig.from_pretrained(ms.location, local_files_only=ms.source == "hub" and _offline())
        with tempfile.TemporaryDirectory() as tmp:
            name = _tl_name(ms.location, hf_config, tmp)
            return loading.get_pretrained_model_config(name, fold_ln=False, device="cpu", dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"could not read the config of model {ms.location}: {exc}") from exc


def to_hooked(hf, tokenizer, spec: ModelSpec, device: str = "cpu"):
    """Build a HookedSAETransformer holding ``hf``'s weights (no weight processing)."""
    from sae_lens import HookedSAETransformer
    from transformer_lens import loading_from_pretrained as loading

    with tempfile.TemporaryDirectory() as tmp:
        name = _tl_name(spec.location, hf.config, tmp)
        cfg = loading.get_pretrained_model_config(name, fold_ln=False, device=device, dtype=torch.float32)
        state_dict = loading.get_pretrained_state_dict(name, cfg, hf_model=hf, dtype=torch.float32)
    model = HookedSAETransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    model.move_model_modules_to_device()
    model.eval()
    return model


def load_hooked(spec: str | os.PathLike | None = "demo", device: str = "cpu"):
    """Shortcut: the HookedSAETransformer of a model spec."""
    return load_model(spec, device).hooked()
