"""Harvest hook activations (``blocks.L.hook_mlp_out``, or another d_model-wide stream hook of each block,
``sae_source.hook``) of a model over a corpus, to disk.

A corpus is a list of documents (token ids without BOS). Each document is run with BOS
prepended; the BOS position and any special-token position (the demo tokenizer's pad = BOS =
EOS id) are masked out, and documents are batched by length so no batch holds padding. Rows are
streamed into a memory-mapped ``.npy`` per layer (float16: MLP outputs are O(1), and a value beyond
float16's range is refused, not clipped; the SAEs train in float32 on batches cast up), so memory stays
bounded by one batch.

Layout of a harvest directory::

    index.npz        doc_id, pos (position in the document, 0 = first real token), token_id,
                     is_eval (the document is held out from SAE training) — one entry per row
    {role}/L{layer}.npy   rows x d_model activations of that model role at that layer
"""

from __future__ import annotations

import logging
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lfp_core.errors import BadInputError, LFPError, MissingInputError

log = logging.getLogger(__name__)

HOOK = "blocks.{layer}.{hook}"
DEFAULT_HOOK = "hook_mlp_out"


class NonFiniteActivationError(LFPError, RuntimeError):
    """NaN or inf activations: the message names the layer and the batch."""


class LayerRangeError(BadInputError):
    """A layer index the model does not have."""


def hook_name(layer: int, hook: str = DEFAULT_HOOK) -> str:
    """``blocks.{layer}.{hook}``: the hook point of one block (the MLP output by default)."""
    return HOOK.format(layer=layer, hook=hook)


def check_layers(layers: list[int], n_layers: int) -> None:
    bad = [layer for layer in layers if not 0 <= int(layer) < n_layers]
    if bad:
        raise LayerRangeError(f"layer {bad[0]} is out of range: the model has {n_layers} layers (0..{n_layers - 1})")


@dataclass
class Doc:
    """One corpus document: ``source`` (imdb, base_completion, tuned_completion, ...) and split."""

    doc_id: int
    source: str
    split: str  # 'train' (SAE training) or 'eval' (held out for metrics)
    token_ids: list[int]
    label: str | None = None  # e.g. an IMDB review's pos/neg
    prompt_id: int | None = None  # completions: the held-out prompt and sample they come from
    sample_idx: int | None = None
    n_prefix: int = 0  # completions: how many leading tokens are the prompt


@dataclass
class Harvest:
    """A harvest directory opened for reading (arrays are memory-mapped)."""

    root: Path

    def index(self) -> dict[str, np.ndarray]:
        with np.load(self.root / "index.npz") as z:
            return {k: z[k] for k in z.files}

    def path(self, role: str, layer: int) -> Path:
        return self.root / role / f"L{layer}.npy"

    def acts(self, role: str, layer: int) -> np.ndarray:
        p = self.path(role, layer)
        if not p.exists():
            raise MissingInputError(
                f"no harvested activations for role {role!r} layer {layer} at {p}; run the activations stage"
            )
        return np.load(p, mmap_mode="r")

    def n_rows(self) -> int:
        return int(self.index()["doc_id"].shape[0])


def _mask(ids: list[int], special: set[int]) -> np.ndarray:
    """Positions (within the document, BOS excluded) that become rows: not special tokens."""
    return np.array([t not in special for t in ids], dtype=bool)


def _groups(docs: list[Doc]) -> list[list[Doc]]:
    """Documents grouped by length, in the harvest order (length, then position in ``docs``)."""
    by_len: dict[int, list[Doc]] = defaultdict(list)
    for d in docs:
        by_len[len(d.token_ids)].append(d)
    return [by_len[n] for n in sorted(by_len)]


def write_index(root: Path, docs: list[Doc], special: set[int]) -> dict[str, np.ndarray]:
    """Row index in harvest order: documents grouped by length (the batching order)."""
    doc_id, pos, tok, ev = [], [], [], []
    for d in (d for group in _groups(docs) for d in group):
        m = _mask(d.token_ids, special)
        p = np.nonzero(m)[0]
        doc_id.append(np.full(len(p), d.doc_id, dtype=np.int32))
        pos.append(p.astype(np.int32))
        tok.append(np.asarray(d.token_ids, dtype=np.int32)[p])
        ev.append(np.full(len(p), d.split == "eval"))
    idx = {
        "doc_id": np.concatenate(doc_id),
        "pos": np.concatenate(pos),
        "token_id": np.concatenate(tok),
        "is_eval": np.concatenate(ev),
    }
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "index.npz", allow_pickle=False, **idx)
    return idx


@torch.no_grad()
def harvest_role(
    hooked,
    docs: list[Doc],
    layers: list[int],
    out_dir: Path,
    role: str,
    bos: list[int],
    special: set[int],
    batch_size: int = 32,
    device: str = "cpu",
    hook_of=None,
) -> dict:
    """Run ``hooked`` over ``docs`` and write ``out_dir/role/L{layer}.npy`` for each layer.

    Written to a temporary folder and renamed at the end, so an interrupted harvest leaves nothing
    that looks complete. ``hook_of(layer)`` names the hook read (default: the MLP output); it must be
    a d_model-wide stream.
    Returns {rows, tokens_per_s}.
    """
    import time

    check_layers(layers, hooked.cfg.n_layers)
    n_rows = sum(int(_mask(d.token_ids, special).sum()) for d in docs)
    tmp = out_dir / f".{role}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    d_model = hooked.cfg.d_model
    arrays = {
        layer: np.lib.format.open_memmap(tmp / f"L{layer}.npy", mode="w+", dtype=np.float16, shape=(n_rows, d_model))
        for layer in layers
    }
    names = [(hook_of or hook_name)(layer) for layer in layers]
    row, batch_no, t0, n_tok = 0, 0, time.time(), 0
    for group in _groups(docs):
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            toks = torch.tensor([bos + d.token_ids for d in chunk], device=device)
            _, cache = hooked.run_with_cache(toks, names_filter=names, stop_at_layer=max(layers) + 1)
            mask = np.stack([_mask(d.token_ids, special) for d in chunk])
            n = int(mask.sum())
            for layer, name in zip(layers, names):
                a = cache[name][:, len(bos) :].float().cpu().numpy()[mask]
                if not np.isfinite(a).all():
                    raise NonFiniteActivationError(
                        f"non-finite activations (NaN/inf) at layer {layer} ({name}), role {role}, harvest batch "
                        f"{batch_no} (documents {[d.doc_id for d in chunk][:8]}...): the model's weights or inputs "
                        "are broken"
                    )
                if np.abs(a).max(initial=0.0) > 6e4:
                    raise NonFiniteActivationError(
                        f"activations beyond float16 range at layer {layer}, role {role}, batch {batch_no}"
                    )
                arrays[layer][row : row + n] = a.astype(np.float16)
            row += n
            n_tok += toks.numel()
            batch_no += 1
    for a in arrays.values():
        a.flush()
    del arrays
    final = out_dir / role
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    secs = time.time() - t0
    log.info(
        "harvested %d rows x %d layers for %s in %.1fs (%.0f tokens/s)",
        row,
        len(layers),
        role,
        secs,
        n_tok / max(secs, 1e-9),
    )
    return {"rows": row, "seconds": secs, "tokens_per_s": n_tok / max(secs, 1e-9)}
