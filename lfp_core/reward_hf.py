"""The Hugging Face reward plug-ins of :mod:`lfp_core.rewards`: a sequence classifier's label
(``classifier:PATH_OR_ID[:LABEL][@prob]``) and a scalar-head preference model (``reward-model:PATH_OR_ID``).

Texts are tokenized, grouped by token length and scored batch by batch with no padding, so a batched
score equals the model's score of that one text alone; on the given device, without gradients.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from lfp_core.rewards import Reward, RewardSpec, RewardSpecError


class HFSequenceReward(Reward):
    """A Hugging Face sequence-classification model as a reward (the base of the classifier and the
    preference-model plug-ins): texts are tokenized, grouped by token length and scored batch by batch
    with no padding; ``_pick`` turns each batch's logits [batch, num_labels] into scores."""

    prepend_bos = False

    def __init__(self, parsed: RewardSpec, device: str = "cpu", batch_size: int | None = None):
        import torch
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        from lfp_core.config import inference_batch

        self.spec, self.kind, self.device = parsed.spec, "sequence", device
        self.location = resolve_location(parsed)
        self.config = AutoConfig.from_pretrained(self.location)
        self._check_config(parsed)
        archs = list(getattr(self.config, "architectures", None) or [])
        if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
            raise RewardSpecError(
                f"reward {parsed.spec!r}: {self.location} holds a {archs[0]}, not a sequence classifier "
                "(…ForSequenceClassification); its classification head would be random"
            )
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.location)
        except (OSError, ValueError, TypeError) as exc:
            raise RewardSpecError(f"reward {parsed.spec!r}: no usable tokenizer at {self.location} ({exc})") from None
        model, info = AutoModelForSequenceClassification.from_pretrained(
            self.location, dtype=torch.float32, output_loading_info=True
        )
        if info.get("missing_keys"):
            missing = sorted(info["missing_keys"])
            raise RewardSpecError(
                f"reward {parsed.spec!r}: {self.location} lacks trained weights for {', '.join(missing[:5])}"
                + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
                + " (they would be random)"
            )
        self.model = model.to(device).eval()
        if self.model.config.pad_token_id is None:
            # only equal-length texts are batched (no padding), so no token is padding: an id that never
            # occurs makes the decoder heads pool the last position, as they do for one unpadded text
            self.model.config.pad_token_id = -1
        self.max_len = _max_length(self.config, self.tokenizer)
        self.batch_size = batch_size or inference_batch(device, 32)
        bos = self.tokenizer.bos_token_id
        self.bos = [bos] if self.prepend_bos and bos is not None else []

    def _check_config(self, parsed: RewardSpec) -> None:
        raise NotImplementedError

    def encode(self, prompt: str, completion: str) -> list[int]:
        """The token ids the model scores for one pair (its last ``max_len`` tokens)."""
        ids = list(self.tokenizer(prompt + completion)["input_ids"])
        if not ids:  # an empty text: score one special token rather than an empty sequence
            tok = self.tokenizer
            ids = [next((t for t in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if t is not None), 0)]
        if self.bos and (not ids or ids[0] != self.bos[0]):
            ids = self.bos + ids
        if len(ids) > self.max_len:  # keep the end (the completion), and a leading special token if any
            head = ids[:1] if ids[0] in self.tokenizer.all_special_ids else []
            ids = head + ids[len(ids) - self.max_len + len(head) :]
        return ids

    def logits(self, seqs: list[list[int]]) -> np.ndarray:
        """Logits [n, num_labels] of token sequences, batched by equal length (nothing padded)."""
        import torch

        out = np.zeros((len(seqs), int(self.model.config.num_labels)), dtype=np.float64)
        by_len: dict[int, list[int]] = {}
        for i, s in enumerate(seqs):
            by_len.setdefault(len(s), []).append(i)
        with torch.inference_mode():
            for _, rows in sorted(by_len.items()):
                for b in range(0, len(rows), self.batch_size):
                    chunk = rows[b : b + self.batch_size]
                    ids = torch.tensor([seqs[i] for i in chunk], dtype=torch.long, device=self.device)
                    out[chunk] = self.model(input_ids=ids).logits.float().cpu().numpy()
        return out

    def _score(self, prompts: list[str], completions: list[str]) -> np.ndarray:
        return self._pick(self.logits([self.encode(p, c) for p, c in zip(prompts, completions)]))

    def _pick(self, logits: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class ClassifierReward(HFSequenceReward):
    """The logit (or ``@prob``: softmax probability) of one label of a sequence classifier."""

    def _check_config(self, parsed: RewardSpec) -> None:
        id2label = {int(k): str(v) for k, v in (getattr(self.config, "id2label", None) or {}).items()}
        n = int(getattr(self.config, "num_labels", len(id2label)) or len(id2label))
        labels = [id2label.get(i, f"LABEL_{i}") for i in range(n)]
        if parsed.label is None:
            if n > 2:
                raise RewardSpecError(
                    f"reward {parsed.spec!r}: the classifier has {n} labels ({', '.join(labels)}); name one: "
                    f"classifier:{parsed.target}:LABEL"
                )
            self.label_id = n - 1
        else:
            label2id = {str(k): int(v) for k, v in (getattr(self.config, "label2id", None) or {}).items()}
            by_name = {name: i for i, name in enumerate(labels)} | label2id
            if parsed.label in by_name:
                self.label_id = by_name[parsed.label]
            elif parsed.label.isdigit() and int(parsed.label) < n:
                self.label_id = int(parsed.label)
            else:
                raise RewardSpecError(
                    f"reward {parsed.spec!r}: label {parsed.label!r} is not in the classifier's config; "
                    f"its labels: {', '.join(labels)}"
                )
        if parsed.prob and n < 2:
            raise RewardSpecError(f"reward {parsed.spec!r}: @prob needs a classifier with >= 2 labels, this has {n}")
        self.label = labels[self.label_id]
        self.prob = parsed.prob
        short = RewardSpec(parsed.spec, "classifier", parsed.target).name.split(" (")[0]
        self.name = f"{short} ({self.label} {'probability' if self.prob else 'logit'})"

    def _pick(self, logits: np.ndarray) -> np.ndarray:
        if self.prob:
            z = logits - logits.max(axis=1, keepdims=True)
            p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
            return p[:, self.label_id]
        return logits[:, self.label_id]


class PreferenceModelReward(HFSequenceReward):
    """The scalar output of a preference (reward) model on ``BOS + prompt + completion``."""

    prepend_bos = True

    def _check_config(self, parsed: RewardSpec) -> None:
        n = int(getattr(self.config, "num_labels", 0) or 0)
        if n != 1:
            raise RewardSpecError(
                f"reward {parsed.spec!r}: a preference model has one scalar output (num_labels 1); "
                f"{self.location} has {n} labels — for a classifier use classifier:{parsed.target}:LABEL"
            )
        self.name = parsed.name

    def _pick(self, logits: np.ndarray) -> np.ndarray:
        return logits[:, 0]


def resolve_location(parsed: RewardSpec) -> str:
    """A local model directory (absolute) or a hub id that resolves (offline: from the HF cache).

    Raises:
        RewardSpecError: a file, a directory without config.json, or neither a directory nor a hub id
            that resolves.
    """
    target = parsed.target
    p = Path(target).expanduser()
    if p.exists():
        if not p.is_dir():
            raise RewardSpecError(f"reward {parsed.spec!r}: {p} is a file; give the model's directory")
        if not (p / "config.json").exists():
            raise RewardSpecError(f"reward {parsed.spec!r}: the directory {p} has no config.json")
        return str(p.resolve())
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(target)
    except (OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
        raise RewardSpecError(
            f"reward {parsed.spec!r}: {target!r} is neither a local directory nor a hub id that resolves"
            + (" (offline: HF_HUB_OFFLINE is set and it is not in the Hugging Face cache)" if offline else "")
            + f" ({type(exc).__name__})"
        ) from None
    return target


def _max_length(config: Any, tokenizer: Any) -> int:
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    m = getattr(tokenizer, "model_max_length", None)
    return int(m) if isinstance(m, int) and 0 < m < 1_000_000 else 512
