"""The live ablation engine behind the dashboard's Ablation lab.

Given a text, a feature set and the number of completions, it samples completions of the text from the
tuned policy with and without the features zeroed (error term kept, same seeds), scores them with the
run's reward plug-in (:mod:`lfp_core.rewards`, VADER by default; the text is the prompt), and reports
the change in the next-token distribution and the chosen features' per-token activations. The model and
SAEs are loaded once per engine; the dashboard keeps one engine per run, shared by every browser session.

Thread safety: a request splices SAEs and zeroing hooks into the engine's one model for its duration,
so two requests at once would see each other's ablations. Each engine therefore serves one request at
a time (a lock around the whole request); a second user waits for the first request to finish rather
than getting a copy of the model per session.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lfp_core import ablation, saes
from lfp_core.errors import BadInputError
from lfp_core.models import continuation_decoder
from lfp_core.rewards import Reward, VaderReward, load_reward
from lfp_core.settings import reward_settings_of, run_settings_of
from lfp_core.store import RunReader, artifacts_dir

MAX_FEATURES = 64  # features one live request may zero
MAX_COMPLETIONS = 32
MAX_NEW_TOKENS = 64


class LiveInputError(BadInputError):
    """A request the engine refuses; the message says what to change."""


@dataclass
class LiveResult:
    """What one request returns (all lists are per completion, in seed order)."""

    prompt_tokens: list[str]
    truncated: int  # tokens dropped from the start of an over-long text (0: none)
    clean: list[str]
    ablated: list[str]
    reward_clean: list[float]
    reward_ablated: list[float]
    next_tokens: list[dict]  # token, p_clean, p_ablated, change; the union of both top-k, by |change|
    activations: dict[tuple[int, int], list[float]] = field(
        default_factory=dict
    )  # (layer, feature) -> per prompt token

    @property
    def mean_clean(self) -> float:
        return float(np.mean(self.reward_clean)) if self.reward_clean else float("nan")

    @property
    def mean_ablated(self) -> float:
        return float(np.mean(self.reward_ablated)) if self.reward_ablated else float("nan")


class LiveEngine:
    """The run's tuned policy and its main SAEs at the selected layers, ready for live ablations.

    Raises:
        RuntimeError: the run has no tuned policy or SAEs yet (the message names the stage).
    """

    run_dir: Path | None  # None for an engine built with from_parts
    policy: object | None

    def __init__(self, run_dir: str | Path, device: str = "cpu"):
        from lfp_core.models import load_model
        from lfp_core.rlhf import load_policy

        run_dir = self.run_dir = Path(run_dir)
        r = RunReader(run_dir)
        info = r.run_info()
        if not info:
            raise RuntimeError(f"{run_dir} has no run configuration; run precompute first")
        main = r.saes("main")
        # the layers of the tuned model's main SAEs (the harvested layers: the divergence stage's choice or
        # the given SAEs' layers), each SAE spliced at the hook its record names
        self.layers = sorted({int(x) for x in main.layer[main.role == "tuned"]}) if not main.empty else []
        if not self.layers:
            raise RuntimeError("the run has no SAEs of the tuned model yet: run the saes stage")
        base = load_model(run_settings_of(info["config"]).model, device=device)
        policy = self.policy = load_policy(artifacts_dir(run_dir) / "policy", base)
        model = policy.hooked()
        self._attach(
            model,
            policy.tokenizer,
            saes.main_saes(run_dir, main, "tuned", self.layers, model.cfg.d_model, device=device),
            device,
            load_reward(reward_settings_of(info["config"]).spec, device=device),
        )

    def _attach(self, model, tokenizer, sae_of: dict, device: str, reward: Reward | None = None) -> None:
        self.reward = reward if reward is not None else VaderReward()
        self.model = model
        self.tokenizer = tokenizer
        self.saes = sae_of
        self.device = device
        self.bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        self._lock = threading.Lock()  # one request at a time: a request splices SAEs and hooks into the model

    @classmethod
    def from_parts(
        cls, model, tokenizer, sae_of: Mapping[int, object], device: str = "cpu", reward: Reward | None = None
    ) -> LiveEngine:
        """An engine on a HookedSAETransformer and its SAEs ({layer: sae}) already in memory (no run);
        ``reward`` defaults to VADER."""
        eng = cls.__new__(cls)
        eng.run_dir, eng.policy, eng.layers = None, None, sorted(sae_of)
        eng._attach(model, tokenizer, dict(sae_of), device, reward)
        return eng

    def d_sae(self, layer: int) -> int:
        return int(self.saes[layer].cfg.d_sae)

    def check(self, text: str, features: Mapping[int, Sequence[int]], n: int, new_tokens: int) -> None:
        """Refuse a request the engine cannot serve, with a message saying what to change."""
        if not text or not text.strip():
            raise LiveInputError("the text is empty: type a prompt or pick one")
        total = sum(len(set(v)) for v in features.values())
        if total > MAX_FEATURES:
            raise LiveInputError(
                f"{total} features selected; the live lab zeroes at most {MAX_FEATURES} at once "
                "(the ablation stage handles larger sets)"
            )
        if not 1 <= n <= MAX_COMPLETIONS:
            raise LiveInputError(f"completions must be between 1 and {MAX_COMPLETIONS}, got {n}")
        if not 1 <= new_tokens <= MAX_NEW_TOKENS:
            raise LiveInputError(f"new tokens must be between 1 and {MAX_NEW_TOKENS}, got {new_tokens}")
        try:
            ablation.check_features(self.saes, features)
        except ValueError as exc:
            raise LiveInputError(str(exc)) from exc

    def encode(self, text: str, new_tokens: int) -> tuple[list[int], int]:
        """BOS + the text's tokens, keeping the last ones that leave room for ``new_tokens`` in the
        context; and how many were dropped."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        room = int(self.model.cfg.n_ctx) - len(self.bos) - new_tokens
        dropped = max(0, len(ids) - room)
        return self.bos + ids[dropped:], dropped

    @torch.no_grad()
    def run(
        self,
        text: str,
        features: Mapping[int, Sequence[int]],
        n: int = 8,
        new_tokens: int = 20,
        seed: int = 0,
        top_k: int = 10,
    ) -> LiveResult:
        """Completions and rewards with and without ``features`` ({layer: ids}) zeroed, the next-token
        change and the features' activations on the text."""
        feats = {int(k): sorted({int(i) for i in v}) for k, v in features.items() if len(v)}
        self.check(text, feats, n, new_tokens)
        with self._lock:  # the model is shared by every session: no other request's SAEs or hooks meanwhile
            return self._run(text, feats, n, new_tokens, seed, top_k)

    def _run(
        self, text: str, features: dict[int, list[int]], n: int, new_tokens: int, seed: int, top_k: int
    ) -> LiveResult:
        ids, dropped = self.encode(text, new_tokens)
        piece = continuation_decoder(self.tokenizer)  # tokens and completions with their leading spaces
        toks = torch.tensor([ids], dtype=torch.long, device=self.device)
        names = [f"{ablation._hook_point(self.saes[layer])}" for layer in features]
        clean_logits, cache = ablation.run_with_ablation(self.model, self.saes, {}, toks, names)
        abl_logits, _ = ablation.run_with_ablation(self.model, self.saes, features, toks)
        p0 = torch.softmax(clean_logits[0, -1], -1)
        p1 = torch.softmax(abl_logits[0, -1], -1)
        cand = torch.unique(torch.cat([p0.topk(top_k).indices, p1.topk(top_k).indices]))
        changes: list[dict[str, Any]] = [
            {
                "token": piece([int(t)]),
                "p_clean": float(p0[t]),
                "p_ablated": float(p1[t]),
                "change": float(p1[t] - p0[t]),
            }
            for t in cand
        ]
        next_tokens = sorted(changes, key=lambda d: -abs(d["change"]))
        acts = {}
        for layer, name in zip(features, names):
            a = cache[name][0]  # [pos, d_sae]
            for f in features[layer]:
                acts[(layer, f)] = [float(x) for x in a[:, f]]
        clean, abl = ablation.coupled_rows(self.model, self.saes, features, toks.repeat(n, 1), new_tokens, seed)
        clean_t, abl_t = [piece(c) for c in clean], [piece(c) for c in abl]
        return LiveResult(
            prompt_tokens=[piece([t]) for t in ids],
            truncated=dropped,
            clean=clean_t,
            ablated=abl_t,
            reward_clean=[float(x) for x in self.reward.score([text] * len(clean_t), clean_t)],
            reward_ablated=[float(x) for x in self.reward.score([text] * len(abl_t), abl_t)],
            next_tokens=next_tokens[: 2 * top_k],
            activations=acts,
        )


class PreferenceScorer:
    """The run's preference model with its residual-stream SAEs: score a text with features switched off
    (zeroed at every position, error term kept) — the post's "jailbreak" workflow."""

    def __init__(self, run_dir: str | Path, device: str = "cpu"):
        from lfp_core.models import load_model
        from lfp_core.reward_model import RewardModel

        self.run_dir = Path(run_dir)
        r = RunReader(self.run_dir)
        info = r.run_info()
        table = r.saes()
        table = table[table.kind == "rm"] if len(table) else table
        if not info or table.empty:
            raise RuntimeError("the run has no preference model SAEs yet: run the reward_model stage")
        base = load_model(run_settings_of(info["config"]).model, device=device)
        self.reward = load_reward(reward_settings_of(info["config"]).spec, device=device)  # the oracle
        self.rm = RewardModel(artifacts_dir(self.run_dir) / "reward_model", base, device=device)
        self.saes = saes.main_saes(
            self.run_dir,
            table,
            "rm",
            sorted(int(x) for x in table.layer),
            self.rm.hooked.cfg.d_model,
            hook_of=lambda layer: f"blocks.{layer}.hook_resid_post",
            device=device,
            kind="rm",
        )
        self._lock = threading.Lock()  # one request at a time: scoring splices SAEs and hooks into the shared model

    @torch.no_grad()
    def score(self, text: str, features: Mapping[int, Sequence[int]]) -> dict:
        """{clean, ablated, oracle, truncated}: the reward of ``text`` without and with ``features``
        ({layer: ids}) zeroed, the run's reward of it (the oracle; the whole text as the completion, no
        prompt), and how many leading tokens did not fit the context."""
        features = {int(k): sorted({int(i) for i in v}) for k, v in features.items() if len(v)}
        if not text or not text.strip():
            raise LiveInputError("the text is empty")
        if sum(len(v) for v in features.values()) > MAX_FEATURES:
            raise LiveInputError(f"at most {MAX_FEATURES} features can be switched off at once")
        try:
            ablation.check_features(self.saes, features)
        except ValueError as exc:
            raise LiveInputError(str(exc)) from exc
        with self._lock:  # shared by every session: no other request's SAEs or hooks while we score
            ids = self.rm.tokenizer(text, add_special_tokens=False)["input_ids"]
            room = int(self.rm.hooked.cfg.n_ctx) - len(self.rm.bos)
            dropped = max(0, len(ids) - room)
            toks, last = self.rm.batch([self.rm.bos + ids[dropped:]])
            clean = float(self.rm.score_tokens(toks, last)[0])
            with ablation.ablated(self.rm.hooked, self.saes, features):
                abl = float(self.rm.score_tokens(toks, last)[0])
        oracle = float(self.reward.score([""], [text])[0])
        return {"clean": clean, "ablated": abl, "oracle": oracle, "truncated": dropped}
