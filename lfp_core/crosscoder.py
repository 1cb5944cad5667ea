"""Crosscoders for model diffing: one sparse dictionary over two models' activations at one hook.

A crosscoder (Lindsey et al. 2024, "Sparse Crosscoders for Cross-Layer Features and Model Diffing")
encodes the pair (x⁰, x¹) of one token's activations in model 0 (the base) and model 1 (the other:
the tuned policy or a null fine-tune) into one code f = σ(Σ_m x^m W_enc^m + b_enc) and decodes it
with a decoder per model, x̂^m = f W_dec^m + b_dec^m. Each latent i has a decoder vector per model,
d_i⁰ and d_i¹; its relative decoder norm r_i = ‖d_i¹‖ / (‖d_i⁰‖ + ‖d_i¹‖) reads 0 for a base-only
latent, 0.5 for a shared one and 1 for an other-only one.

Sparsity, ``arch``:

* ``batchtopk`` (the default) — BatchTopK (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders"), as
  the crosscoder of Minder, Dumas et al. 2025 ("Overcoming sparsity artifacts in crosscoders to
  interpret chat-tuning") uses it: over a batch of B tokens keep the k·B largest scores
  f_i·(‖d_i⁰‖ + ‖d_i¹‖) (a latent counts by what it writes into both models) and zero the rest, so
  tokens hold k latents on average. At inference one scalar threshold θ replaces the batch selection
  (a latent is kept where its score exceeds θ), so a token's code does not depend on its batch; θ is
  the running average, during training, of the smallest score each batch kept. An auxiliary loss
  (Gao et al. 2024) lets dead latents reconstruct the residual.
* ``l1`` — Lindsey et al.'s ReLU crosscoder with the L1 penalty Σ_i f_i (‖d_i⁰‖ + ‖d_i¹‖), which
  Minder, Dumas et al. show produces spurious model-specific latents (see :mod:`lfp_core.latent_scaling`).

Input normalisation: each model's activations are multiplied by a constant s_m chosen on the training
data so that E‖s_m x^m‖ = √d_in; the constants live in the module (buffer ``scale``) and :meth:`encode`
/ :meth:`decode` apply and undo them, so the module computes on raw activations. Decoder norms,
relative norms, cosines and latent scaling are read in the normalised space (both models at the same
mean norm, so a model whose activations are uniformly larger does not look "model-specific").

Written by hand because no maintained library has it: sae-lens has no crosscoder (its crosscoder pull
request is open) and there is no maintained PyPI package for BatchTopK crosscoders; the method was
learnt from the public research code of Minder & Dumas (science-of-finetuning/dictionary_learning and
diffing-toolkit), not copied. The difference SAE (an SAE on other − base activations) needs no new
code: :class:`DifferenceSource` feeds :func:`lfp_core.saes.train_sae` (sae-lens) unchanged. Per-latent
statistics, FVU and loss recovered are in :mod:`lfp_core.crosscoder_metrics`.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lfp_core.errors import BadInputError, ConfigError, MissingInputError
from lfp_core.saes import ActivationSource, CorpusTooSmallError

ARCHS = ("batchtopk", "l1")
FORMAT = "lfp-crosscoder"
SLOTS = ("base", "other")


# --- data ---------------------------------------------------------------------------------------------
def _check_pair(acts_base, acts_other) -> None:
    sb, so = tuple(acts_base.shape), tuple(acts_other.shape)
    if len(sb) != 2 or len(so) != 2:
        raise BadInputError(f"paired activations must be [rows, d_model] arrays; got base {sb} and other {so}")
    if sb[1] != so[1]:
        raise BadInputError(f"base and other activations differ in d_model: base {sb} vs other {so}")
    if sb[0] != so[0]:
        raise BadInputError(
            f"base and other activations differ in row count: base {sb} vs other {so}; a crosscoder needs "
            "the same tokens through both models (a paired harvest)"
        )


def _check_rows(rows: np.ndarray, n: int) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= n):
        raise BadInputError(f"row indices out of range [0, {n}): min {rows.min()}, max {rows.max()}")
    return rows


class _PairView:
    """``view[idx]`` = float32 [len(idx), 2, d]: slot 0 the base's rows, slot 1 the other's."""

    def __init__(self, a, b):
        _check_pair(a, b)
        self.a, self.b = a, b
        self.shape = (a.shape[0], 2, a.shape[1])

    def __getitem__(self, idx) -> np.ndarray:
        return np.stack([np.asarray(self.a[idx], np.float32), np.asarray(self.b[idx], np.float32)], axis=1)


class _DifferenceView:
    """``view[idx]`` = float32 (other − base) rows, subtracted in float32 (not in the arrays' float16)."""

    def __init__(self, a, b):
        _check_pair(a, b)
        self.a, self.b = a, b
        self.shape = tuple(a.shape)

    def __getitem__(self, idx) -> np.ndarray:
        return np.asarray(self.b[idx], np.float32) - np.asarray(self.a[idx], np.float32)


class PairedSource(ActivationSource):
    """Shuffled float32 [B, 2, d] batches of the same rows (tokens) of two activation arrays.

    ``acts_base`` and ``acts_other`` are (memory-mapped) [rows, d_model] arrays of one paired harvest:
    row r of both is the same token through the base and the other model.

    Raises:
        BadInputError: the two arrays differ in shape (naming both), or ``rows`` is out of range.
    """

    def __init__(self, acts_base, acts_other, rows, batch_size: int, seed: int, layer: int | str = "?"):
        view = _PairView(acts_base, acts_other)
        super().__init__(view, _check_rows(rows, view.shape[0]), batch_size, seed, layer)  # type: ignore[arg-type]

    @property
    def d_in(self) -> int:
        return int(self.acts.shape[2])


class DifferenceSource(ActivationSource):
    """Shuffled float32 (other − base) [B, d] batches, an :class:`lfp_core.saes.ActivationSource` in all
    that :func:`lfp_core.saes.train_sae` reads (``acts.shape[1]``, ``len``, ``iter``, ``layer``), so a
    difference SAE trains through sae-lens unchanged."""

    def __init__(self, acts_base, acts_other, rows, batch_size: int, seed: int, layer: int | str = "?"):
        view = _DifferenceView(acts_base, acts_other)
        super().__init__(view, _check_rows(rows, view.shape[0]), batch_size, seed, layer)  # type: ignore[arg-type]


def pair_batches(acts_base, acts_other, rows=None, batch_size: int = 4096) -> Iterator[torch.Tensor]:
    """float32 [B, 2, d] tensors of ``rows`` (all rows when None) in order, for evaluation."""
    view = _PairView(acts_base, acts_other)
    rows = np.arange(view.shape[0]) if rows is None else _check_rows(rows, view.shape[0])
    for start in range(0, len(rows), batch_size):
        yield torch.from_numpy(view[np.sort(rows[start : start + batch_size])])


# --- the module ---------------------------------------------------------------------------------------
class Crosscoder(nn.Module):
    """Two-model crosscoder. Shapes: ``W_enc`` [2, d_in, d_sae], ``b_enc`` [d_sae], ``W_dec``
    [d_sae, 2, d_in], ``b_dec`` [2, d_in]; buffers ``scale`` [2] (input normalisation, raw × scale) and
    ``threshold`` (BatchTopK's inference threshold on scores; −1 until estimated).

    ``encode``/``decode``/``forward`` take and return raw activations; the ``*_n`` methods work in the
    normalised space (what the weights see)."""

    scale: torch.Tensor
    threshold: torch.Tensor

    def __init__(self, d_in: int, d_sae: int, arch: str = "batchtopk", k: int = 32):
        super().__init__()
        if arch not in ARCHS:
            raise ConfigError(f"unknown crosscoder architecture {arch!r}; choose one of {', '.join(ARCHS)}")
        self.d_in, self.d_sae, self.arch, self.k = int(d_in), int(d_sae), arch, int(k)
        self.W_enc = nn.Parameter(torch.zeros(2, d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, 2, d_in))
        self.b_dec = nn.Parameter(torch.zeros(2, d_in))
        self.register_buffer("scale", torch.ones(2))
        self.register_buffer("threshold", torch.tensor(-1.0))

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    def config(self) -> dict:
        return {"format": FORMAT, "version": 1, "d_in": self.d_in, "d_sae": self.d_sae, "arch": self.arch, "k": self.k}

    def dec_norms(self) -> torch.Tensor:
        """[d_sae, 2]: ‖d_i^m‖ in the normalised space."""
        return self.W_dec.norm(dim=-1)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(1, 2, 1)

    def pre_acts_n(self, xn: torch.Tensor) -> torch.Tensor:
        """ReLU(Σ_m x^m W_enc^m + b_enc) for normalised ``xn`` [B, 2, d_in] -> [B, d_sae]."""
        return torch.relu(torch.einsum("bmd,mds->bs", xn, self.W_enc) + self.b_enc)

    def sparsify(self, f: torch.Tensor, batch_topk: bool | None = None) -> torch.Tensor:
        """The kept code: identity for ``l1``; BatchTopK over the batch or the inference threshold for
        ``batchtopk`` (default: the batch selection while training or before a threshold exists)."""
        if self.arch == "l1":
            return f
        score = f * self.dec_norms().sum(-1)
        if batch_topk is None:
            batch_topk = self.training or float(self.threshold) < 0
        if not batch_topk:
            return f * (score > self.threshold)
        n_keep = min(self.k * f.shape[0], f.numel())
        idx = score.flatten().topk(n_keep, sorted=False).indices
        mask = torch.zeros(f.numel(), dtype=torch.bool, device=f.device).scatter_(0, idx, True)
        return f * mask.view_as(f)

    def encode_n(self, xn: torch.Tensor, batch_topk: bool | None = None) -> torch.Tensor:
        return self.sparsify(self.pre_acts_n(xn), batch_topk)

    def decode_n(self, f: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bs,smd->bmd", f, self.W_dec) + self.b_dec

    def encode(self, x: torch.Tensor, batch_topk: bool | None = None) -> torch.Tensor:
        """Raw activations [B, 2, d_in] -> code [B, d_sae] (in eval mode, per-token via the threshold)."""
        return self.encode_n(self.normalize(x.to(self.W_enc.dtype)), batch_topk)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Code [B, d_sae] -> raw-unit reconstruction [B, 2, d_in] (slot 0 base, slot 1 other)."""
        return self.decode_n(f) / self.scale.view(1, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


# --- training -----------------------------------------------------------------------------------------
@dataclass
class CrosscoderSpec:
    """What to train. ``k``: mean active latents per token (BatchTopK); ``l1``: the L1 variant's
    coefficient (linear warm-up over the first 5% of steps, as Lindsey et al.); ``dec_init_norm``: the
    norm of each model's initial decoder vectors (random directions; the encoder starts as the decoder
    transposed; default 1.0 for batchtopk as the reference code, 0.1 for l1 as Lindsey et al.); ``aux_coef``: weight of the dead-latent auxiliary loss (Gao et al.'s 1/32, 0 = off),
    a latent is dead after ``dead_steps`` steps without firing (default max(20, steps/20));
    ``threshold_beta``: the running-average factor of the inference threshold."""

    d_sae: int = 512
    k: int = 32
    lr: float = 1e-3
    batch_size: int = 1024
    train_tokens: int = 200_000
    seed: int = 0
    arch: str = "batchtopk"
    l1: float = 1.0
    dec_init_norm: float | None = None
    aux_coef: float = 1 / 32
    dead_steps: int | None = None
    threshold_beta: float = 0.99
    norm_batches: int = 10
    device: str = "cpu"

    def steps(self) -> int:
        return self.train_tokens // self.batch_size

    def describe(self) -> str:
        sparsity = f"k={self.k}" if self.arch == "batchtopk" else f"l1={self.l1:g}"
        return f"crosscoder {self.arch} d_sae={self.d_sae} {sparsity}"


def _check_spec(spec: CrosscoderSpec, source: PairedSource) -> None:
    if spec.arch not in ARCHS:
        raise ConfigError(f"unknown crosscoder architecture {spec.arch!r}; choose one of {', '.join(ARCHS)}")
    if spec.steps() < 1:
        raise ConfigError(f"crosscoder train_tokens {spec.train_tokens} is less than one batch ({spec.batch_size})")
    if spec.train_tokens > len(source):
        raise CorpusTooSmallError(
            f"requested {spec.train_tokens:,} crosscoder training tokens but the paired harvest has only "
            f"{len(source):,} training tokens at layer {source.layer}; lower cc_train_tokens or enlarge the corpus "
            "(sae_corpus_docs)"
        )
    if spec.arch == "batchtopk" and not 0 < spec.k <= spec.d_sae:
        raise ConfigError(f"crosscoder k must be in [1, d_sae={spec.d_sae}], got {spec.k}")


def _init(cc: Crosscoder, spec: CrosscoderSpec, sample: torch.Tensor) -> None:
    """Scale constants and mean decoder bias from ``sample`` (raw [N, 2, d]); random decoder directions of
    norm ``dec_init_norm`` drawn from ``spec.seed``; encoder = decoder transposed."""
    g = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        mean_norm = sample.norm(dim=-1).mean(0).clamp_min(1e-8)  # [2]
        cc.scale.copy_(math.sqrt(cc.d_in) / mean_norm)
        w = torch.randn(cc.d_sae, 2, cc.d_in, generator=g)
        norm = spec.dec_init_norm if spec.dec_init_norm is not None else (1.0 if spec.arch == "batchtopk" else 0.1)
        w = w / w.norm(dim=-1, keepdim=True) * norm
        cc.W_dec.copy_(w)
        cc.W_enc.copy_(w.permute(1, 2, 0))
        cc.b_dec.copy_(cc.normalize(sample).mean(0))
        cc.b_enc.zero_()


def _aux_loss(cc: Crosscoder, pre: torch.Tensor, resid: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """Gao et al.'s auxiliary loss: the dead latents' top-k_aux pre-activations (per token, k_aux = d_in/2)
    reconstruct the (detached) residual of both models, normalised by the residual's variance."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    k_aux = min(max(cc.d_in // 2, 1), n_dead)
    pre_dead = pre[:, dead]
    top = pre_dead.topk(k_aux, dim=1)
    f_aux = torch.zeros_like(pre_dead).scatter_(1, top.indices, top.values)
    e_hat = torch.einsum("bs,smd->bmd", f_aux, cc.W_dec[dead])
    denom = (resid - resid.mean(0)).pow(2).sum().clamp_min(1e-8)
    return (resid - e_hat).pow(2).sum() / denom


def train_crosscoder(spec: CrosscoderSpec, source: PairedSource) -> tuple[Crosscoder, dict]:
    """Train a crosscoder with Adam on ``spec.train_tokens // spec.batch_size`` batches of ``source``.

    The loss is Σ_m ‖x^m − x̂^m‖² per token (normalised space), mean over the batch, plus the L1 penalty
    (``l1``) or the auxiliary dead-latent loss (``batchtopk``). The learning rate warms up over the first
    5% of steps and decays linearly to 0 over the last 20%; gradients are clipped at norm 1.

    Returns:
        (crosscoder in eval mode, {seconds, tokens_per_s, final_loss (mean reconstruction loss of the
        last 10% of steps, normalised space), final_fvu (that loss over the batches' variance),
        steps, threshold}).
    """
    _check_spec(spec, source)
    torch.manual_seed(spec.seed)
    steps, dev = spec.steps(), torch.device(spec.device)
    cc = Crosscoder(source.d_in, spec.d_sae, spec.arch, spec.k)
    t0 = time.time()
    batches = iter(source)
    sample = torch.cat([next(batches) for _ in range(max(1, min(spec.norm_batches, steps)))])
    _init(cc, spec, sample)
    cc.to(dev).train()
    opt = torch.optim.Adam(cc.parameters(), lr=spec.lr)
    warm, decay_from = max(1, steps // 20), int(steps * 0.8)

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if step >= decay_from:
            return max(0.0, (steps - step) / max(1, steps - decay_from))
        return 1.0

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    dead_steps = spec.dead_steps or max(20, steps // 20)
    since_fired = torch.zeros(spec.d_sae, dtype=torch.long, device=dev)
    thr_start, beta = steps // 10, spec.threshold_beta
    tail, tail_var, n_tail = 0.0, 0.0, 0
    for step in range(steps):
        xn = cc.normalize(next(batches).to(dev))
        pre = cc.pre_acts_n(xn)
        f = cc.sparsify(pre, batch_topk=True)
        xh = cc.decode_n(f)
        recon = (xn - xh).pow(2).sum(dim=(1, 2)).mean()
        loss = recon
        norms = cc.dec_norms().sum(-1)
        if spec.arch == "l1":
            loss = loss + spec.l1 * min(1.0, (step + 1) / max(1, steps // 20)) * (f * norms).sum(-1).mean()
        elif spec.aux_coef > 0:
            dead = since_fired > dead_steps
            if bool(dead.any()):
                loss = loss + spec.aux_coef * _aux_loss(cc, pre, (xn - xh).detach(), dead)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(cc.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            fired = (f > 0).any(0)
            since_fired = torch.where(fired, torch.zeros_like(since_fired), since_fired + 1)
            if spec.arch == "batchtopk" and step >= thr_start:
                kept = (f * norms)[f > 0]
                if kept.numel():
                    m = kept.min()
                    cc.threshold.copy_(m if float(cc.threshold) < 0 else beta * cc.threshold + (1 - beta) * m)
            if step >= steps - max(1, steps // 10):
                tail += float(recon)
                tail_var += float((xn - xn.mean(0)).pow(2).sum(dim=(1, 2)).mean())
                n_tail += 1
    secs = time.time() - t0
    cc.eval()
    info = {
        "seconds": secs,
        "tokens_per_s": steps * spec.batch_size / max(secs, 1e-9),
        "final_loss": tail / max(n_tail, 1),
        "final_fvu": tail / max(tail_var, 1e-12),
        "steps": steps,
        "threshold": float(cc.threshold),
    }
    return cc, info


# --- saving and loading -------------------------------------------------------------------------------
WEIGHTS, CONFIG = "crosscoder.safetensors", "cfg.json"


def save_crosscoder(cc: Crosscoder, path: str | Path, extra: dict | None = None) -> Path:
    """Save as a folder (``cfg.json`` + ``crosscoder.safetensors``: weights, ``scale``, ``threshold``)
    via a temporary folder and an atomic rename. ``extra``: JSON-able metadata kept in the config
    (e.g. hook, layer, the models' names)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in cc.state_dict().items()}, str(tmp / WEIGHTS))
    (tmp / CONFIG).write_text(json.dumps({**cc.config(), "metadata": extra or {}}, indent=1))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def crosscoder_metadata(path: str | Path) -> dict:
    """The ``extra`` metadata saved with the crosscoder at ``path``."""
    return _read_config(Path(path)).get("metadata") or {}


def _read_config(path: Path) -> dict:
    cfg_file = path / CONFIG
    if not cfg_file.exists() or not (path / WEIGHTS).exists():
        raise MissingInputError(f"no crosscoder at {path} (expected {CONFIG} and {WEIGHTS})")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInputError(f"crosscoder config {cfg_file} is damaged (not JSON: {e})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise BadInputError(
            f"{cfg_file} is not a crosscoder config (format {cfg.get('format') if isinstance(cfg, dict) else None!r})"
        )
    return cfg


def load_crosscoder(path: str | Path, device: str = "cpu", d_in: int | None = None) -> Crosscoder:
    """Load a crosscoder saved by :func:`save_crosscoder` (in eval mode).

    Raises:
        MissingInputError: nothing at ``path``.
        BadInputError: a damaged config or weights file (naming it), weights that do not match the
            config, or a width other than ``d_in``.
    """
    from safetensors.torch import load_file

    path = Path(path)
    cfg = _read_config(path)
    try:
        cc = Crosscoder(int(cfg["d_in"]), int(cfg["d_sae"]), str(cfg["arch"]), int(cfg["k"]))
    except (KeyError, TypeError, ValueError) as e:
        raise BadInputError(f"crosscoder config {path / CONFIG} is incomplete or invalid: {e}") from None
    if d_in is not None and cc.d_in != int(d_in):
        raise BadInputError(f"crosscoder at {path} reads d_in={cc.d_in}, not the model's {d_in}")
    try:
        state = load_file(str(path / WEIGHTS))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise BadInputError(f"crosscoder weights {path / WEIGHTS} are damaged ({type(e).__name__}: {e})") from None
    try:
        cc.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise BadInputError(f"crosscoder weights {path / WEIGHTS} do not match its config: {first}") from None
    return cc.to(device).eval()


def spec_record(spec: CrosscoderSpec) -> dict:
    return asdict(spec)


__all__ = [
    "ARCHS",
    "Crosscoder",
    "CrosscoderSpec",
    "DifferenceSource",
    "PairedSource",
    "crosscoder_metadata",
    "load_crosscoder",
    "pair_batches",
    "save_crosscoder",
    "spec_record",
    "train_crosscoder",
]
