"""A tiny run built without a model or any training, for fast tests of what reads a run: the report,
the dashboard pages and the store's readers.

Rows go in through :class:`lfp_core.store.RunWriter`'s public methods (one transaction per stage,
``put_rows``, ``mark_stage``), as the precompute writes them. The stage details that the pages and
the report read are computed by the library's own functions (``lfp_core.reward`` for the rewards,
``lfp_core.evaluation`` for the RL evaluation, the labels stage's agreement statistics) from the rows
written, so a test can compare what a page shows with what the run holds. Everything is
deterministic (seeded).

    run = TinyRun(tmp_path / "tiny").until("labels")     # or .model().prompts()... stage by stage
    run = sequence_run(tmp_path / "seq")                 # a reward that is not a lexicon: the sequence probe
    run = TinyRun(tmp_path / "d").until("features").diffing()  # the model-diffing stages (tests/tiny_diffing.py)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lfp_core import evaluation, reward
from lfp_core.store import RunWriter, put_rows

POSITIVE = ["great", "wonderful", "lovely", "good", "fun", "happy", "best", "nice"]
NEGATIVE = ["awful", "bad", "boring", "terrible", "sad", "worst", "ugly", "dull"]
NEUTRAL = ["film", "plot", "actor", "scene", "story", "ending", "the", "was", "and", "it", "this", "movie"]
VOCAB = NEUTRAL + POSITIVE + NEGATIVE  # token id = index; the run's ``vocab`` table holds " " + word
N_HARVEST_ROWS = 5_000  # the density denominator of the synthetic features
WINDOW = 4  # tokens on each side of an example's centre
BUILD_ORDER = ("model", "prompts", "base_samples", "rlhf", "rl_eval", "divergence", "features", "labels")


def _ids(words: list[str]) -> list[int]:
    return [VOCAB.index(w) for w in words]


def _text(words: list[str]) -> str:
    return "".join(" " + w for w in words)


class TinyRun:
    """Builds the stages of a VADER run, in pipeline order, with a handful of rows each.

    A subclass can put other text into the run: the base model's name (``MODEL_NAME``), a completion's
    words (``_completion``), a label's explanation (``_explanation``).

    Args:
        run_dir: the run directory (created).
        n_eval: held-out prompts (one base and one tuned completion each); n_train: RL prompts.
        n_layers: the model's layers; ``selected`` the layers the divergence stage picks (the
            feature stages analyse these, for both the base and the tuned model).
        d_sae: features per (model, layer); every 10th (ids 9, 19, ...) never fires.
        reward_spec: ``vader`` (completions scored by the VADER reward) or another spec, whose completions
            are scored by :func:`share_reward` (a whole-text score no per-word lexicon gives).
    """

    MODEL_NAME = "tiny-test-model"

    def __init__(
        self,
        run_dir: str | Path,
        n_eval: int = 12,
        n_train: int = 6,
        n_layers: int = 3,
        selected: tuple[int, ...] = (1, 2),
        d_sae: int = 40,
        seed: int = 0,
        reward_spec: str = "vader",
    ):
        self.run_dir = Path(run_dir)
        self.n_eval, self.n_train, self.n_layers, self.selected, self.d_sae = n_eval, n_train, n_layers, selected, d_sae
        self.rng = np.random.default_rng(seed)
        self.writer = RunWriter(self.run_dir)
        self.reward_spec = reward_spec
        self.config = {"model": "demo", "task": "vader", **({} if reward_spec == "vader" else {"reward": reward_spec})}
        self.writer.set_config("quick", json.dumps(self.config))

    # --- helpers ---------------------------------------------------------------------------
    def _done(self, con, name: str, detail: dict | None = None) -> None:
        from lfp_core.stages import stage_names

        self.writer.mark_stage(
            name, stage_names("vader").index(name), "tiny", "done", seconds=0.25, detail=detail or {}, con=con
        )

    def _reward(self, text: str) -> float:
        return reward.reward(text) if self.reward_spec == "vader" else share_reward(text)

    def until(self, last: str) -> Path:
        """Every stage of :data:`BUILD_ORDER` up to and including ``last``; the run directory."""
        for name in BUILD_ORDER[: BUILD_ORDER.index(last) + 1]:
            getattr(self, name)()
        return self.run_dir

    def _completion(self, prompt_id: int, role: str, words: list[str]) -> dict:
        text = _text(words)
        lex = [w for w in reward.segment(text) if w.in_lexicon]
        return {
            "role": role,
            "prompt_id": prompt_id,
            "sample_idx": 0,
            "seed": 1000 + prompt_id,
            "n_new": len(words),
            "token_ids": _ids(words),
            "text": text,
            "reward": self._reward(text),
            "raw_score": reward.raw_score(text),
            "lexicon_words": [w.text for w in lex],
            "lexicon_valences": [w.valence for w in lex],
        }

    # --- stages ----------------------------------------------------------------------------
    def model(self) -> TinyRun:
        info = {
            "name": self.MODEL_NAME,
            "source": "tests",
            "location": "-",
            "architecture": "GPTNeoXForCausalLM",
            "n_params": 1_234_567,
            "n_layers": self.n_layers,
            "d_model": 16,
            "vocab_size": len(VOCAB),
        }
        with self.writer.transaction() as con:
            RunWriter.put_model(con, "base", info)
            put_rows(con, "vocab", [{"token_id": i, "text": " " + w} for i, w in enumerate(VOCAB)])
            self._done(con, "model", {"model": info})
        return self

    def prompts(self) -> TinyRun:
        rows = []
        for i in range(self.n_eval + self.n_train):
            words = ["the", NEUTRAL[i % 6], "was"]
            rows.append(
                {
                    "prompt_id": i,
                    "split": "eval" if i < self.n_eval else "train",
                    "source": "imdb",
                    "doc_id": f"doc{i}",
                    "n_tokens": 3,
                    "token_ids": _ids(words),
                    "text": _text(words).strip(),
                }
            )
        with self.writer.transaction() as con:
            RunWriter.put_prompts(con, rows)
            self._done(con, "prompts", {"n_train": self.n_train, "n_eval": self.n_eval, "source": "imdb"})
        return self

    def base_samples(self) -> TinyRun:
        """One base completion per held-out prompt: 3 to 6 words, about as many negative as positive."""
        self.base_words = []
        for _ in range(self.n_eval):
            n = int(self.rng.integers(3, 7))
            pool = NEUTRAL + POSITIVE[:3] + NEGATIVE[:5]
            self.base_words.append([pool[int(j)] for j in self.rng.integers(len(pool), size=n)])
        rows = [self._completion(i, "base", w) for i, w in enumerate(self.base_words)]
        with self.writer.transaction() as con:
            RunWriter.put_completions(con, rows)
            self._done(con, "base_samples", {"reward": evaluation.reward_stats(np.array([r["reward"] for r in rows]))})
        return self

    def rlhf(self, steps: int = 6, given: str | None = None) -> TinyRun:
        """The GRPO stage's rows; with ``given`` (a path), a tuned model given instead: no steps or samples."""
        if given is not None:
            steps = 0
        step_rows = [
            {
                "step": s,
                "reward": 0.1 * s,
                "reward_std": 0.5,
                "kl": 0.01 * s,
                "mean_length": 5.0,
                "loss": 1.0 / (s + 1),
                "accuracy": None,
            }
            for s in range(steps)
        ]
        samples = [
            {"step": s, "idx": s, "prompt": "The film was", "completion": " great fun", "reward": 0.1 * s}
            for s in range(steps)
        ]
        with self.writer.transaction() as con:
            RunWriter.put_model(
                con,
                "tuned",
                {
                    "name": "tiny-test-model + GRPO (VADER)" if given is None else "tiny-tuned (given)",
                    "source": "tests" if given is None else "given",
                    "location": "artifacts/policy" if given is None else given,
                    "architecture": "GPTNeoXForCausalLM",
                    "n_params": 1_234_567,
                    "n_layers": self.n_layers,
                    "d_model": 16,
                    "vocab_size": len(VOCAB),
                },
            )
            put_rows(con, "rl_steps", step_rows)
            put_rows(con, "rl_samples", samples)
            said = (
                {"first_reward": 0.0, "last10_reward": float(np.mean([r["reward"] for r in step_rows]))}
                if given is None
                else {"given": given}
            )
            self._done(con, "rlhf", {"policy_dir": "artifacts/policy", "steps": steps, **said})
        return self

    def rl_eval(self) -> TinyRun:
        """Tuned completions of the same prompts with the base completions' lengths and seeds, more positive,
        and the stage's detail and word shifts computed as the rl_eval stage computes them."""
        tuned_words = []
        for words in self.base_words:
            pool = NEUTRAL[:4] + POSITIVE
            tuned_words.append([pool[int(j)] for j in self.rng.integers(len(pool), size=len(words))])
        rows = [self._completion(i, "tuned", w) for i, w in enumerate(tuned_words)]
        base = np.array([self._reward(_text(w)) for w in self.base_words])
        tuned = np.array([r["reward"] for r in rows])
        base_texts, tuned_texts = [_text(w) for w in self.base_words], [r["text"] for r in rows]
        detail = {
            "reward_base": evaluation.reward_stats(base),
            "reward_tuned": evaluation.reward_stats(tuned),
            "difference": evaluation.paired_difference(base, tuned),
            "kl_per_token": 0.0123,
            "distinct2_base": evaluation.distinct_n(base_texts),
            "distinct2_tuned": evaluation.distinct_n(tuned_texts),
        }
        with self.writer.transaction() as con:
            RunWriter.put_completions(con, rows)
            put_rows(con, "word_shifts", evaluation.word_shifts(base_texts, tuned_texts))
            self._done(con, "rl_eval", detail)
        return self

    def divergence(self) -> TinyRun:
        rows = [
            {
                "layer": i,
                "param": 0.5 + 0.1 * i,
                "act_cos": 0.01 * (1 + (i in self.selected)) + 0.001 * i,
                "act_rel_l2": 0.1 + 0.01 * i,
                "selected": i in self.selected,
            }
            for i in range(self.n_layers)
        ]
        with self.writer.transaction() as con:
            put_rows(con, "layer_divergence", rows)
            self._done(con, "divergence", {"selected_layers": list(self.selected), "measure": "activation"})
        return self

    def features(self) -> TinyRun:
        """Feature statistics, top and interval examples of both models' SAEs at the selected layers, and a
        probe weight for every firing feature (rank 0 = largest |weight × mean activation|, per model)."""
        feats, examples, probe = [], [], []
        for role in ("tuned", "base"):
            ranked = []
            for layer in self.selected:
                for f in range(self.d_sae):
                    row, ex = self._feature(role, layer, f)
                    feats.append(row)
                    examples += ex
                    if row["n_fired"]:
                        w = float(self.rng.normal(0, 0.1))
                        ranked.append(
                            {
                                "role": role,
                                "layer": layer,
                                "feature": f,
                                "weight": w,
                                "mean_act": row["mean_act"],
                                "importance": abs(w * row["mean_act"]),
                            }
                        )
            ranked.sort(key=lambda p: -p["importance"])
            probe += [{**p, "rank": i} for i, p in enumerate(ranked)]
        with self.writer.transaction() as con:
            put_rows(con, "features", feats)
            put_rows(con, "feature_examples", examples)
            put_rows(con, "probe_features", probe)
            self._done(con, "features", {"saes": [f"{r}_L{ly}" for r in ("tuned", "base") for ly in self.selected]})
        return self

    def _feature(self, role: str, layer: int, f: int) -> tuple[dict, list[dict]]:
        rng = self.rng
        tokens = [VOCAB[(3 * f + layer + k) % len(VOCAB)] for k in range(3)]  # distinct words the feature fires on
        logit_up = [" " + VOCAB[(f + k) % len(VOCAB)] for k in range(5)]
        logit_down = [" " + VOCAB[(f + 7 + k) % len(VOCAB)] for k in range(5)]
        row = {
            "role": role,
            "layer": layer,
            "feature": f,
            "density": 0.0,
            "n_fired": 0,
            "mean_act": 0.0,
            "max_act": 0.0,
            "hist_counts": [0] * 20,
            "top_tokens": [],
            "freq_base_text": 0.0,
            "freq_tuned_text": 0.0,
            "top_logit_tokens": logit_up,
            "top_logit_values": [1.0 - 0.1 * k for k in range(5)],
            "bottom_logit_tokens": logit_down,
            "bottom_logit_values": [-1.0 + 0.1 * k for k in range(5)],
            "neighbours": [(f + k) % self.d_sae for k in (1, 2, 3)],
            "neighbour_cos": [0.6, 0.5, 0.4],
        }
        if f % 10 == 9:
            return row, []
        n_fired = int(rng.integers(3, 500))
        max_act = round(float(rng.uniform(1, 10)), 3)
        row.update(
            density=n_fired / N_HARVEST_ROWS,
            n_fired=n_fired,
            max_act=max_act,
            mean_act=round(max_act * float(rng.uniform(0.2, 0.6)), 4),
            hist_counts=rng.multinomial(n_fired, np.full(20, 1 / 20)).tolist(),
            top_tokens=[" " + t for t in tokens],
            freq_base_text=round(float(rng.uniform(0, 0.2)), 4),
            freq_tuned_text=round(float(rng.uniform(0, 0.2)), 4),
        )
        ex = []
        for kind, picks in (
            ("top", [(r, -1, max_act * (1 - 0.2 * r)) for r in range(3)]),
            ("interval", [(0, iv, max_act * (iv + 0.5) / 10) for iv in (2, 5, 9)]),
        ):
            for rank, iv, act in picks:
                doc = 100 * f + 10 * (kind == "interval") + rank + iv
                words = [VOCAB[(doc + k) % len(VOCAB)] for k in range(2 * WINDOW + 1)]
                words[WINDOW] = tokens[rank % 3]
                acts = [0.0] * len(words)
                acts[WINDOW], acts[WINDOW + 1] = round(act, 4), round(act / 4, 4)
                ex.append(
                    {
                        "role": role,
                        "layer": layer,
                        "feature": f,
                        "kind": kind,
                        "rank": rank,
                        "interval": iv,
                        "doc_id": doc,
                        "pos": 10 + WINDOW,
                        "act": round(act, 4),
                        "center": WINDOW,
                        "tokens": [" " + w for w in words],
                        "token_ids": _ids(words),
                        "acts": acts,
                    }
                )
        return row, ex

    def diffing(self, null: bool = True, token: str | None = None) -> TinyRun:
        """The four model-diffing stages (tests/tiny_diffing.py); ``null=False``: a run without a null control."""
        from tests.tiny_diffing import diffing

        return diffing(self, null=null, token=token)

    def _explanation(self, words: list[str]) -> str:
        """The offline labeller's explanation of a feature whose top tokens are ``words``."""
        return "fires most on " + ", ".join(f"'{w}'" for w in words)

    def labels(self, n_probe_top: int = 8, n_random: int = 8) -> TinyRun:
        """Offline-labeller labels of the tuned model's ``n_probe_top`` probe-top and ``n_random`` other firing
        features (relevant: the feature's first top token is a VADER-lexicon word), and the stage's
        agreement detail computed by the labels stage's own functions from synthetic firing."""
        from lfp_core.autointerp import OFFLINE
        from lfp_core.pipeline.label_agreement import frequency_table, overlap

        r = self.writer.reader()
        firing_ids = r.firing_features("tuned")
        probe = r.probe_features("tuned", limit=10**6)
        top = [(int(a), int(b)) for a, b in zip(probe.layer, probe.feature)][:n_probe_top]
        rest = sorted({(ly, f) for ly, fs in firing_ids.items() for f in fs} - set(top))
        chosen = [(k, "probe_top") for k in top] + [
            (rest[int(i)], "random") for i in sorted(self.rng.choice(len(rest), n_random, replace=False))
        ]
        lex = reward.lexicon()
        rows = []
        for (layer, f), selection in chosen:
            words = [t.strip() for t in r.feature("tuned", layer, f)["top_tokens"]]
            rows.append(
                {
                    "role": "tuned",
                    "layer": layer,
                    "feature": f,
                    "labeller": OFFLINE,
                    "model": None,
                    "selection": selection,
                    "explanation": self._explanation(words),
                    "relevant": words[0] in lex,
                    "relevance_rho": 0.5 if words[0] in lex else 0.0,
                    "detection_acc": round(float(self.rng.uniform(0.5, 0.9)), 3),
                    "detection_f1": round(float(self.rng.uniform(0.4, 0.9)), 3),
                    "detection_n": 20,
                    "n_unparsed": 0,
                }
            )
        rewards = r.completions("tuned").reward.to_numpy()
        firing = {(ly, f): self.rng.random(len(rewards)) < 0.3 for ly, fs in firing_ids.items() for f in fs}
        key = lambda rs: [(x["layer"], x["feature"]) for x in rs]  # noqa: E731
        flagged = [x for x in rows if x["relevant"]]
        probe_top = [x for x in rows if x["selection"] == "probe_top"]
        sets = {
            "all features": sorted(firing),
            "labelled": key(rows),
            "labeller: reward-related": key(flagged),
            "labeller: not related": key([x for x in rows if not x["relevant"]]),
            "probe top": key(probe_top),
        }
        detail = {
            "labeller": OFFLINE,
            "n_chosen": len(rows),
            "n_skipped_no_examples": 0,
            "n_score_docs": self.n_eval,  # held-out scoring text: the base completions (no probe point)
            "n_probe_docs": 2 * self.n_eval,
            "n_not_detection_scored": 0,
            "n_labelled": len(rows),
            "n_relevant": len(flagged),
            "n_unparsed": 0,
            "detection_acc_mean": float(np.mean([x["detection_acc"] for x in rows])),
            "frequency": frequency_table(firing, rewards, sets),
            "overlap": overlap(key(rows), set(key(flagged)), set(key(probe_top))),
        }
        with self.writer.transaction() as con:
            put_rows(con, "feature_labels", rows)
            self._done(con, "labels", detail)
        return self


def share_reward(text: str) -> float:
    """A whole-completion score (the share of positive minus the share of negative words): what a sequence
    classifier might give, with no per-word target."""
    words = text.split()
    return (sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)) / max(1, len(words))


def sequence_probes(run: TinyRun, token_detail: dict | None = None) -> None:
    """A probes stage with the sequence probe, computed by :func:`lfp_core.seqprobes.sequence_probe` on
    synthetic pooled features of the run's completions (the tuned model's carry the reward, the base model's
    less) against their stored rewards. ``token_detail``: the token probe's summary (a lexicon run); without
    it the token-level parts are recorded as not applicable, with the stage's own reasons."""
    from lfp_core import seqprobes

    r = run.writer.reader()
    comps = [r.completions(p).assign(policy=p) for p in ("base", "tuned")]
    rows = [(c.policy.iloc[i], c.prompt_id.iloc[i], c.sample_idx.iloc[i], c.reward.iloc[i], c.n_new.iloc[i])
            for c in comps for i in range(len(c))]  # fmt: skip
    policy = np.array([x[0] for x in rows], dtype=object)
    prompts, y = np.array([x[1] for x in rows]), np.array([x[3] for x in rows], dtype=float)
    n_tok = np.array([x[4] for x in rows])
    test = seqprobes.prompt_split(prompts, 0)
    dim = run.d_sae * len(run.selected)
    signal = run.rng.normal(size=dim)
    seq: dict = {"reward": run.reward_spec, "layers": list(run.selected), "pooling": seqprobes.POOLING}
    seq.update(split=seqprobes.SPLIT.format(pct=0.2), penalty_cv=seqprobes.PENALTY_CV, n_completions=len(y))
    seq.update(n_prompts=len(set(prompts)), n_test=int(test.sum()), n_test_prompts=len(set(prompts[test])))
    seq.update(n_dropped=0, n_by_policy={p: int((policy == p).sum()) for p in ("base", "tuned")})
    preds, seq_rows = {}, []
    for role, noise in (("tuned", 0.5), ("base", 2.0)):
        X = np.abs(np.outer(y, signal) + noise * run.rng.normal(size=(len(y), dim)))
        inputs = {"length": n_tok[:, None].astype(float), "policy": (policy == "tuned").astype(float)[:, None]}
        seq[role], preds[role], _ = seqprobes.sequence_probe(X, y, prompts, test, 0, inputs, policy=policy)
        seq_rows += [
            {"role": role, "policy": p, "prompt_id": int(x[1]), "sample_idx": int(x[2]), "reward": float(x[3]),
             "pred": float(q), "n_tokens": int(x[4])}
            for p, x, q in zip(policy[test], [x for x, t in zip(rows, test) if t], preds[role])
        ]  # fmt: skip
    seq["difference"] = seqprobes.rho_difference(preds["tuned"], preds["base"], y[test], prompts[test], 0)
    detail = {**(token_detail or {}), "layers": list(run.selected), "sequence": seq}
    if token_detail is None:
        detail.update(not_applicable=seqprobes.not_applicable(run.reward_spec), feature_ranking="sequence")
    else:
        detail["feature_ranking"] = "token"
    with run.writer.transaction() as con:
        put_rows(con, "probe_sequences", seq_rows)
        run._done(con, "probes", detail)


def sequence_run(run_dir: str | Path, spec: str = "classifier:tiny-sentiment", **kwargs) -> Path:
    """A tiny run whose reward is not a per-word lexicon, up to its labels, with the probes stage as such a
    run records it (:func:`sequence_probes`); 30 held-out prompts (6 held out by the sequence probe)."""
    run = TinyRun(run_dir, reward_spec=spec, **{"n_eval": 30, **kwargs})
    run.until("features")
    sequence_probes(run)
    run.labels()
    return run.run_dir


def tiny_run(run_dir: str | Path, until: str = "labels", **kwargs) -> Path:
    """A :class:`TinyRun` built up to and including stage ``until``; its directory."""
    return TinyRun(run_dir, **kwargs).until(until)
