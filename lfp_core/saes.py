"""Sparse autoencoders with sae-lens: train, save/load with checks, evaluate, compare.

Training goes through sae-lens's ``SAETrainer`` (one SAE) and ``MultiSAETrainer`` (SAEs trained
in lockstep), fed from harvested activations (:mod:`lfp_core.activations`). Architectures:

* ``topk``  — sae-lens TopK (the default: sparsity fixed at k, no coefficient to tune);
* ``relu``  — the paper's L1-penalised ReLU SAE (sae-lens "standard"), dictionary 1x or 2x d_model;
* ``tied``  — the paper's tied-decoder ReLU SAE (encoder = decoder transposed), registered with
  sae-lens's registry as a training architecture; saved as a "standard" SAE with the encoder
  written out, which is the same function at inference (the input scaling sae-lens trains with is
  folded into the biases, :meth:`TiedTrainingSAE.fold_activation_norm_scaling_factor`);
* ``mfr_topk`` — TopK members of a Mutual Feature Regularization group (Marks et al. 2024, "Enhancing
  Neural Network Interpretability with Feature-Aligned Sparse Autoencoders"): each member's loss
  adds ``mfr * (1 - MMCS)`` between its decoder and its peers' (linear warm-up), trained jointly.

Every architecture, saved and loaded, computes the features and reconstruction of the SAE as trained
(tests/test_saes.py). Each SAE is initialised from its own seed (:func:`derive_seed`): dictionaries
that are compared must not share an initialisation.

Metrics (:func:`reconstruction_metrics`, :func:`ce_metrics`) are computed on held-out documents.
FVU divides by the per-dimension variance, Σ‖x − x̂‖² / Σ‖x − mean‖², not by the variance of the
flattened activations (which counts the mean offset as "explained" and flatters bad SAEs).
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from sae_lens import SAE
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY, register_sae_training_class
from sae_lens.saes.sae import TrainCoefficientConfig, TrainStepInput
from sae_lens.saes.standard_sae import StandardSAEConfig, StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.saes.topk_sae import TopKSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.multi_sae_trainer import MultiSAETrainer
from sae_lens.training.sae_trainer import SAETrainer
from torch import nn

from lfp_core.activations import NonFiniteActivationError
from lfp_core.errors import BadInputError, ConfigError, MissingInputError
from lfp_core.settings import SAESettings

log = logging.getLogger(__name__)

ARCHS = ("topk", "relu", "tied")


class SAEMismatchError(BadInputError):
    """An SAE file that does not fit the model or hook it is used with."""


class CorpusTooSmallError(BadInputError):
    """Fewer harvested training tokens than requested."""


# --- architectures sae-lens lacks, registered through its registry ---------------------------------
@dataclass
class TiedTrainingSAEConfig(StandardTrainingSAEConfig):
    """L1 ReLU SAE whose encoder is the transposed decoder (the paper's SAE)."""

    @classmethod
    def architecture(cls) -> str:
        return "tied"

    def get_inference_config_class(self):
        return StandardSAEConfig


class TiedTrainingSAE(StandardTrainingSAE):
    """Encoder weights are ``W_dec.T`` (a view, not a parameter); saved with the encoder written out."""

    def initialize_weights(self) -> None:
        # as sae-lens's standard initialisation, minus the encoder parameter (tied to the decoder)
        c, kw = self.cfg, {"dtype": self.dtype, "device": self.device}
        self.b_dec = nn.Parameter(torch.zeros(c.d_in, **kw))
        w = torch.empty(c.d_sae, c.d_in, **kw)
        nn.init.kaiming_uniform_(w)
        if c.decoder_init_norm is not None:
            w = w / w.norm(dim=-1, keepdim=True) * c.decoder_init_norm
        self.W_dec = nn.Parameter(w)
        self.b_enc = nn.Parameter(torch.zeros(c.d_sae, **kw))

    @property
    def W_enc(self) -> torch.Tensor:
        return self.W_dec.T

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        """Fold the input scaling ``s`` (training saw ``s·x``) into the biases, keeping the SAE tied.

        sae-lens's fold multiplies ``W_enc`` by ``s`` and divides ``W_dec`` by ``s``; with ``W_enc``
        a view of ``W_dec`` the two cancel and only ``b_dec`` is divided, which leaves the encoder
        bias ``s``× too strong against the input (a different SAE after saving). The tied fold:
        ``relu((s·x − b_dec)·W + b_enc) = s·relu((x − b_dec/s)·W + b_enc/s)``, so dividing both biases
        by ``s`` gives the same features divided by ``s``, and decoding them with the same ``W`` gives
        the trained reconstruction divided by ``s`` — the trained SAE in the input's own units, with
        each feature's contribution ``f_i·W_i`` unchanged (the convention of sae-lens's TopK fold).
        """
        self.b_enc.data /= scaling_factor
        self.b_dec.data /= scaling_factor
        self.cfg.normalize_activations = "none"

    def fold_and_get_W_dec_norm(self) -> torch.Tensor:
        raise NotImplementedError("a tied SAE cannot fold its decoder norms into the encoder and stay tied")

    def fold_activation_whitening(self, *args, **kwargs) -> None:
        raise NotImplementedError("a tied SAE cannot fold a whitening transform and stay tied")

    def process_state_dict_for_saving_inference(self, state_dict: dict) -> None:
        state_dict["W_enc"] = self.W_dec.detach().T.contiguous().clone()


@dataclass
class MFRTopKTrainingSAEConfig(TopKTrainingSAEConfig):
    """A TopK member of a Mutual Feature Regularization group."""

    mfr_coefficient: float = 1.0
    mfr_warm_up_steps: int = 0

    @classmethod
    def architecture(cls) -> str:
        return "mfr_topk"

    def get_inference_config_class(self):
        return TopKSAEConfig


class MFRTopKTrainingSAE(TopKTrainingSAE):
    """TopK SAE whose loss adds ``mfr * (1 − MMCS(self, peer))`` averaged over its peers.

    Peers are the other members of the group (set with :func:`link_peers`); their decoders enter
    detached, so each member's gradient is exactly the gradient of the group's summed penalty
    with respect to that member's weights, and stepping the members in lockstep trains the group
    jointly.
    """

    def __init__(self, cfg, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self._peers: list = []  # a plain list: peers must not become submodules

    def get_coefficients(self):
        return {
            **super().get_coefficients(),
            "mfr": TrainCoefficientConfig(value=self.cfg.mfr_coefficient, warm_up_steps=self.cfg.mfr_warm_up_steps),
        }

    def calculate_aux_loss(self, step_input: TrainStepInput, feature_acts, hidden_pre, sae_out):
        losses = super().calculate_aux_loss(step_input, feature_acts, hidden_pre, sae_out)
        if self._peers:
            pen = torch.stack([1 - soft_mmcs(self.W_dec, p.W_dec.detach()) for p in self._peers]).mean()
            losses["mfr_loss"] = step_input.coefficients["mfr"] * pen
        return losses


def _register() -> None:
    for arch, cls, cfg_cls in (
        ("tied", TiedTrainingSAE, TiedTrainingSAEConfig),
        ("mfr_topk", MFRTopKTrainingSAE, MFRTopKTrainingSAEConfig),
    ):
        if arch not in SAE_TRAINING_CLASS_REGISTRY:
            register_sae_training_class(arch, cls, cfg_cls)


_register()


def link_peers(saes: list[MFRTopKTrainingSAE]) -> None:
    for s in saes:
        s._peers = [p for p in saes if p is not s]


# --- comparing dictionaries -------------------------------------------------------------------------
def _unit_rows(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def soft_mmcs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Differentiable symmetric MMCS (mean over both dictionaries of each row's best cosine)."""
    c = _unit_rows(a) @ _unit_rows(b).T
    return 0.5 * (c.max(dim=1).values.mean() + c.max(dim=0).values.mean())


def mmcs(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> dict:
    """Mean max cosine similarity between two dictionaries' decoder rows.

    Returns:
        ``hungarian``: mean cosine over a one-to-one matching (Hungarian algorithm) that maximises
        total similarity — each feature of the smaller dictionary is paired with a distinct
        feature of the larger; ``max``: mean over the smaller dictionary's rows of their best cosine
        in the other (no one-to-one constraint), as often reported.
    """
    from scipy.optimize import linear_sum_assignment

    a, b = torch.as_tensor(np.asarray(a, dtype=np.float32)), torch.as_tensor(np.asarray(b, dtype=np.float32))
    if a.shape[1] != b.shape[1]:
        raise SAEMismatchError(f"dictionaries live in different spaces (d_in {a.shape[1]} vs {b.shape[1]})")
    if a.shape[0] > b.shape[0]:
        a, b = b, a
    c = (_unit_rows(a) @ _unit_rows(b).T).cpu().numpy().astype(np.float64)
    rows, cols = linear_sum_assignment(c, maximize=True)
    return {"hungarian": float(c[rows, cols].mean()), "max": float(c.max(axis=1).mean())}


def derive_seed(seed: int, *parts) -> int:
    """A seed in [0, 2³¹) derived from a run seed and labels (e.g. an SAE's id). SAEs whose
    dictionaries are compared must not share their initialisation: with one seed, sae-lens draws
    identical decoders for the base and tuned SAEs, and the 1× dictionary's initial rows are the
    first rows of the 2×'s — both bias MMCS upwards."""
    import hashlib

    digest = hashlib.sha256(":".join(str(x) for x in (seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


# --- data ---------------------------------------------------------------------------------------------
class ActivationSource:
    """Shuffled float32 batches of selected rows of a (memory-mapped) activation array.

    Epochs repeat so sae-lens may draw a few batches for its normalisation estimate; the training
    budget itself is checked against the rows available (see :func:`train_sae`).
    """

    def __init__(self, acts: np.ndarray, rows: np.ndarray, batch_size: int, seed: int, layer: int | str = "?"):
        self.acts, self.rows, self.batch_size, self.layer = acts, np.asarray(rows), batch_size, layer
        self.rng = np.random.default_rng(seed)
        self.batch_no = 0

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            perm = self.rows[self.rng.permutation(len(self.rows))]
            for start in range(0, len(perm) - self.batch_size + 1, self.batch_size):
                idx = np.sort(perm[start : start + self.batch_size])
                x = torch.from_numpy(np.asarray(self.acts[idx], dtype=np.float32))
                if not torch.isfinite(x).all():
                    raise NonFiniteActivationError(
                        f"non-finite activations (NaN/inf) in SAE training data at layer {self.layer}, "
                        f"batch {self.batch_no} (rows {idx[:4].tolist()}...)"
                    )
                self.batch_no += 1
                yield x


# --- training -----------------------------------------------------------------------------------------
_SAE_DEFAULTS = SAESettings()


@dataclass
class SAESpec:
    """What to train: one SAE. ``d_sae`` is the dictionary size; ``k`` is used by topk, ``l1`` by
    relu/tied. A run builds its specs from its :class:`lfp_core.settings.SAESettings` with
    :meth:`from_settings`; the defaults here are that class's, so the two cannot drift apart."""

    arch: str = _SAE_DEFAULTS.arch
    d_sae: int = 512
    k: int = _SAE_DEFAULTS.k
    l1: float = _SAE_DEFAULTS.l1
    lr: float = _SAE_DEFAULTS.lr
    train_tokens: int = _SAE_DEFAULTS.train_tokens
    batch_size: int = _SAE_DEFAULTS.batch_size
    seed: int = 0
    device: str = "cpu"
    mfr: float = 0.0
    mfr_warm_up_frac: float = 0.2
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_settings(
        cls,
        s: SAESettings,
        d_model: int,
        seed: int,
        device: str,
        arch: str | None = None,
        expansion: int | None = None,
        **kw,
    ) -> SAESpec:
        """The spec of an SAE of a run: ``s`` with an optional other architecture/expansion."""
        return cls(
            arch=arch or s.arch,
            d_sae=(expansion or s.expansion) * d_model,
            k=s.k,
            l1=s.l1,
            lr=s.lr,
            train_tokens=s.train_tokens,
            batch_size=s.batch_size,
            seed=seed,
            device=device,
            **kw,
        )

    def describe(self) -> str:
        sparsity = f"k={self.k}" if self.arch == "topk" else f"l1={self.l1:g}"
        return f"{self.arch} d_sae={self.d_sae} {sparsity}"


def _steps(spec: SAESpec) -> int:
    return spec.train_tokens // spec.batch_size


def _training_cfg(spec: SAESpec, d_in: int, hook: str, model_name: str, arch: str | None = None):
    arch = arch or spec.arch
    common = dict(d_in=d_in, d_sae=spec.d_sae, device=spec.device, normalize_activations="expected_average_only_in")
    if arch in ("topk", "mfr_topk"):
        cfg = (
            TopKTrainingSAEConfig(k=spec.k, **common)
            if arch == "topk"
            else MFRTopKTrainingSAEConfig(
                k=spec.k,
                mfr_coefficient=spec.mfr,
                mfr_warm_up_steps=int(spec.mfr_warm_up_frac * _steps(spec)),
                **common,
            )
        )
    elif arch == "relu":
        cfg = StandardTrainingSAEConfig(l1_coefficient=spec.l1, l1_warm_up_steps=_steps(spec) // 10, **common)
    elif arch == "tied":
        cfg = TiedTrainingSAEConfig(l1_coefficient=spec.l1, l1_warm_up_steps=_steps(spec) // 10, **common)
    else:
        raise ConfigError(f"unknown SAE architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    cfg.metadata.hook_name = hook
    cfg.metadata.model_name = model_name
    return cfg


def _trainer_cfg(spec: SAESpec) -> SAETrainerConfig:
    steps = _steps(spec)
    return SAETrainerConfig(
        total_training_samples=steps * spec.batch_size,
        train_batch_size_samples=spec.batch_size,
        lr=spec.lr,
        lr_end=spec.lr / 10,
        lr_scheduler_name="cosineannealing" if steps >= 20 else "constant",
        lr_warm_up_steps=steps // 20,
        device=spec.device,
        dead_feature_window=max(10, steps // 10),
        feature_sampling_window=max(10, steps // 5),
        n_batches_for_norm_estimate=min(20, max(1, steps)),
        logger=LoggingConfig(log_to_wandb=False),
    )


def _check_budget(spec: SAESpec, source: ActivationSource) -> None:
    if _steps(spec) < 1:
        raise ConfigError(f"sae_train_tokens {spec.train_tokens} is less than one batch ({spec.batch_size})")
    if spec.train_tokens > len(source):
        raise CorpusTooSmallError(
            f"requested {spec.train_tokens:,} SAE training tokens but the corpus has only {len(source):,} training "
            f"tokens at layer {source.layer}; lower sae_train_tokens or enlarge the corpus (sae_corpus_docs)"
        )


def _to_inference(training_sae) -> SAE:
    """The inference SAE (sae-lens's own conversion: save the inference model, load it back)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        training_sae.save_inference_model(tmp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sae = SAE.load_from_disk(tmp, device=str(training_sae.device))
    sae.eval()
    return sae


def _quiet():
    import contextlib
    import os

    return contextlib.redirect_stderr(open(os.devnull, "w"))  # noqa: SIM115 - sae-lens's tqdm bars


def train_sae(spec: SAESpec, source: ActivationSource, hook: str, model_name: str = "") -> tuple[SAE, dict]:
    """Train one SAE with sae-lens's SAETrainer. Returns (inference SAE, {seconds, l0_train})."""
    _check_budget(spec, source)
    torch.manual_seed(spec.seed)
    from sae_lens.registry import get_sae_training_class

    cls, _ = get_sae_training_class({"relu": "standard"}.get(spec.arch, spec.arch))
    sae = cls(_training_cfg(spec, source.acts.shape[1], hook, model_name))
    t0 = time.time()
    with _quiet():
        trainer = SAETrainer(_trainer_cfg(spec), sae, iter(source))
        trained = trainer.fit()
    secs = time.time() - t0
    return _to_inference(trained), {"seconds": secs, "tokens_per_s": spec.train_tokens / max(secs, 1e-9)}


def mfr_member_seeds(spec: SAESpec, n: int) -> list[int]:
    """The initialisation seed of each of the ``n`` members of an MFR group: the first is the
    group's seed, the others derived from it (all distinct)."""
    return [spec.seed] + [derive_seed(spec.seed, "mfr-member", i) for i in range(1, n)]


def train_mfr(
    spec: SAESpec, source: ActivationSource, hook: str, n: int = 2, model_name: str = ""
) -> tuple[list[SAE], dict]:
    """Train ``n`` TopK SAEs jointly with Mutual Feature Regularization (sae-lens MultiSAETrainer),
    each initialised from its own seed (:func:`mfr_member_seeds`)."""
    _check_budget(spec, source)
    saes = []
    for seed in mfr_member_seeds(spec, n):
        torch.manual_seed(seed)
        saes.append(MFRTopKTrainingSAE(_training_cfg(spec, source.acts.shape[1], hook, model_name, "mfr_topk")))
    link_peers(saes)
    names = {f"m{i}": hook for i in range(n)}

    def multi() -> Iterator[dict[str, torch.Tensor]]:
        for x in source:
            yield {hook: x}

    t0 = time.time()
    with _quiet():
        trainer = MultiSAETrainer(_trainer_cfg(spec), dict(zip(names, saes)), names, multi())
        trained = trainer.fit()
    for s in saes:
        s._peers = []
    return [_to_inference(trained[k]) for k in names], {"seconds": time.time() - t0}


# --- saving and loading -------------------------------------------------------------------------------
def save_sae(sae: SAE, path: Path) -> Path:
    """Save in sae-lens's format (cfg.json + safetensors) via a temp dir and an atomic rename."""
    import shutil

    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    sae.save_model(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def load_sae(path: str | Path, d_in: int | None = None, hook: str | None = None, device: str = "cpu") -> SAE:
    """Load an SAE saved by :func:`save_sae` (or any sae-lens SAE folder), checking that it fits.

    Raises:
        FileNotFoundError: no SAE at ``path``.
        SAEMismatchError: its input width or hook differs from the model/hook it is meant for.
    """
    path = Path(path)
    cfg_file = path / "cfg.json"
    if not cfg_file.exists():
        raise MissingInputError(f"no SAE at {path} (expected cfg.json and sae_weights.safetensors)")
    cfg = json.loads(cfg_file.read_text())
    their_hook = (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name")
    if d_in is not None and int(cfg["d_in"]) != int(d_in):
        raise SAEMismatchError(
            f"SAE at {path} reads d_in={cfg['d_in']} but the model's {hook or 'hook'} has "
            f"width {d_in}: it was trained on another model"
        )
    if hook is not None and their_hook is not None and their_hook != hook:
        raise SAEMismatchError(f"SAE at {path} was trained on {their_hook}, not {hook}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae = SAE.load_from_disk(str(path), device=device)
    sae.eval()
    return sae


def main_saes(
    run_dir: str | Path,
    table,
    role: str,
    layers: list[int],
    d_in: int,
    hook_of=None,
    device: str = "cpu",
    kind: str = "main",
) -> dict[int, SAE]:
    """``{layer: SAE}`` of ``role``'s main SAEs listed in ``table`` (the store's ``saes`` rows), each
    checked to read that layer's hook (``hook_of(layer)``; by default the hook its row records) and to come
    from that model.

    Raises:
        RuntimeError: a layer has no main SAE of ``role`` or its SAE came from another model.
    """
    out = {}
    for layer in sorted(layers):
        sel = table[(table.kind == kind) & (table.role == role) & (table.layer == layer)]
        if sel.empty:
            raise RuntimeError(f"no main SAE for {role} layer {layer}; run the saes stage")
        path = sel.path.iloc[0]
        stored = sel.hook_name.iloc[0] if "hook_name" in sel else None
        if hook_of is not None:
            hook = hook_of(layer)
        else:
            hook = stored if isinstance(stored, str) and stored else f"blocks.{layer}.hook_mlp_out"
        sae = load_sae(Path(run_dir) / path, d_in=d_in, hook=hook, device=device)
        if not str(sae.cfg.metadata.model_name or "").endswith(f":{role}"):
            raise RuntimeError(f"SAE {path} was trained on {sae.cfg.metadata.model_name}, not the {role} model")
        out[layer] = sae
    return out


# --- metrics ------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_batches(
    sae: SAE, acts: np.ndarray, rows: np.ndarray | None = None, batch_size: int = 8192
) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """Yield (row indices, x, feature activations) over ``rows`` (all rows when None), in order."""
    rows = np.arange(acts.shape[0]) if rows is None else np.asarray(rows)
    for start in range(0, len(rows), batch_size):
        idx = rows[start : start + batch_size]
        x = torch.from_numpy(np.asarray(acts[idx], dtype=np.float32)).to(sae.device)
        yield idx, x, sae.encode(x)


@torch.no_grad()
def reconstruction_metrics(
    sae: SAE, acts: np.ndarray, eval_rows: np.ndarray, all_rows: np.ndarray | None = None
) -> dict:
    """MSE, FVU (per-dimension variance), L0, mean cos(x, x̂), mean ‖x̂‖/‖x‖ on ``eval_rows``;
    dead fraction (features that never fire) over ``all_rows`` (all harvested rows by default)."""
    d = acts.shape[1]
    s1 = torch.zeros(d, dtype=torch.float64)
    s2 = torch.zeros(d, dtype=torch.float64)
    err = l0 = cos = ratio = 0.0
    n = 0
    for _, x, f in encode_batches(sae, acts, eval_rows):
        xh = sae.decode(f)
        x64 = x.double()
        s1 += x64.sum(0)
        s2 += (x64**2).sum(0)
        err += float(((x - xh).double() ** 2).sum())
        l0 += float((f > 0).sum())
        xn, xhn = x.norm(dim=-1), xh.norm(dim=-1)
        cos += float((torch.nn.functional.cosine_similarity(x, xh, dim=-1)).double().sum())
        ratio += float((xhn / xn.clamp_min(1e-8)).double().sum())
        n += x.shape[0]
    if n == 0:
        raise ValueError("no held-out activations to evaluate the SAE on")
    total_var = float((s2 - s1**2 / n).sum())  # Σ_rows ‖x − mean‖², mean per dimension
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    n_all = 0
    for _, _, f in encode_batches(sae, acts, all_rows):
        fired |= (f > 0).any(0).cpu()
        n_all += f.shape[0]
    return {
        "mse": err / (n * d),
        "fvu": err / total_var,
        "l0": l0 / n,
        "cos_sim": cos / n,
        "l2_ratio": ratio / n,
        "dead_frac": float((~fired).float().mean()),
        "dead_tokens": n_all,
        "n_eval_tokens": n,
    }


def _ce_batches(sequences: list[list[int]], batch_size: int, device) -> Iterator[torch.Tensor]:
    """Token batches of the sequences of >= 2 tokens, grouped by length (nothing padded)."""
    from collections import defaultdict

    by_len: dict[int, list[list[int]]] = defaultdict(list)
    for s in sequences:
        if len(s) >= 2:
            by_len[len(s)].append(s)
    for length in sorted(by_len):
        group = by_len[length]
        for start in range(0, len(group), batch_size):
            yield torch.tensor(group[start : start + batch_size], device=device)


def _nll(logits: torch.Tensor, toks: torch.Tensor) -> float:
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return float(-lp.gather(-1, toks[:, 1:, None]).sum())


@torch.no_grad()
def ce_baselines(hooked, layer: int, sequences: list[list[int]], batch_size: int = 32, hook: str | None = None) -> dict:
    """The SAE-independent half of :func:`ce_metrics`: next-token cross-entropy clean and with the hook
    ``hook`` (default ``blocks.L.hook_mlp_out``) zero-ablated, computed once per model and hook and shared
    by its SAEs.

    The baseline is zero ablation of the hook the SAE reads, at every position, as sae-lens's own
    evaluation computes it. For the MLP output (or the attention output) that removes one sublayer's
    contribution; for a residual-stream hook (``hook_resid_pre``/``_mid``/``_post``) it removes the whole
    stream at that point, everything the layers before it wrote (the later layers then see nothing but
    their own biases and position-independent terms). That baseline is far worse than an MLP output's, so
    the same reconstruction error reads as a higher loss recovered: compare loss recovered between SAEs
    of one hook, not across hooks.
    """
    hook = hook or f"blocks.{layer}.hook_mlp_out"

    def zero(x, hook):  # noqa: ARG001
        return torch.zeros_like(x)

    clean = zeroed = 0.0
    n = 0
    for toks in _ce_batches(sequences, batch_size, hooked.cfg.device):
        clean += _nll(hooked(toks), toks)
        zeroed += _nll(hooked.run_with_hooks(toks, fwd_hooks=[(hook, zero)]), toks)
        n += toks[:, 1:].numel()
    if n == 0:
        raise ValueError("no sequences of at least two tokens to measure the loss on")
    return {"ce_clean": clean / n, "ce_zero": zeroed / n, "ce_tokens": n}


@torch.no_grad()
def ce_metrics(
    hooked, sae: SAE, layer: int, sequences: list[list[int]], batch_size: int = 32, baseline: dict | None = None
) -> dict:
    """Next-token cross-entropy on ``sequences`` (BOS + tokens): clean, with the SAE spliced in at the
    hook it reads (``sae.cfg.metadata.hook_name``, e.g. ``blocks.L.hook_mlp_out``: its reconstruction
    replaces the MLP output), and with that hook zero-ablated (see :func:`ce_baselines` for what the
    baseline means at a residual-stream hook); loss recovered = (zero − spliced) / (zero − clean).
    ``baseline``: the :func:`ce_baselines` of the same model, hook and sequences, when already computed."""
    hook = sae.cfg.metadata.hook_name or f"blocks.{layer}.hook_mlp_out"
    out = dict(baseline or ce_baselines(hooked, layer, sequences, batch_size, hook=hook))
    spliced, n = 0.0, 0
    for toks in _ce_batches(sequences, batch_size, hooked.cfg.device):
        spliced += _nll(hooked.run_with_saes(toks, saes=[sae], use_error_term=False), toks)
        n += toks[:, 1:].numel()
    if n != out["ce_tokens"]:
        raise ValueError(f"the baseline was measured on {out['ce_tokens']} tokens, these sequences have {n}")
    out["ce_spliced"] = spliced / n
    gap = out["ce_zero"] - out["ce_clean"]
    out["ce_loss_recovered"] = (out["ce_zero"] - out["ce_spliced"]) / gap if gap > 0 else float("nan")
    return out


def decoder(sae: SAE) -> np.ndarray:
    return sae.W_dec.detach().float().cpu().numpy()


def sae_record(sae: SAE, spec: SAESpec) -> dict:
    return {
        "arch": spec.arch,
        "d_sae": int(sae.cfg.d_sae),
        "k": spec.k if spec.arch in ("topk", "mfr_topk") else None,
        "l1_coefficient": spec.l1 if spec.arch in ("relu", "tied") else None,
    }


def with_arch(spec: SAESpec, **kw) -> SAESpec:
    return replace(spec, **kw)


__all__ = [
    "ARCHS",
    "ActivationSource",
    "CorpusTooSmallError",
    "SAEMismatchError",
    "SAESpec",
    "ce_baselines",
    "ce_metrics",
    "decoder",
    "derive_seed",
    "load_sae",
    "mfr_member_seeds",
    "mmcs",
    "reconstruction_metrics",
    "save_sae",
    "train_mfr",
    "train_sae",
]
