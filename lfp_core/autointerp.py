"""Feature labels: an LLM client over the ``openai`` package (any OpenAI-compatible endpoint) with
retries, a response cache and a budget; explanation, relevance and detection-scoring calls with
strict answer parsing; and an explicitly named offline labeller for runs without an endpoint.

The API key is read from the environment (``OPENAI_API_KEY``) and never stored, logged or shown.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from lfp_core import prompts
from lfp_core.errors import BadInputError, LFPError

log = logging.getLogger(__name__)
OFFLINE = "offline (top tokens + VADER correlation; not an LLM)"


class LLMError(LFPError, RuntimeError):
    """An LLM call failed; the message says why and what to do (it never contains the key)."""


class LLMConfigError(LLMError, BadInputError):
    """No API key, or an unusable endpoint setting (bad input)."""


class LLMAuthError(LLMError, BadInputError):
    """The endpoint refused the key (bad input)."""


class LLMNotFoundError(LLMError, BadInputError):
    """The endpoint has no such model (bad input)."""


class LLMUnavailableError(LLMError):
    """The endpoint did not answer usefully after the retries (a failure, not bad input: re-run to resume)."""


class Cache(Protocol):
    def get(self, key: str) -> str | None: ...
    def put(self, key: str, model: str, prompt: str, response: str) -> None: ...


class MemoryCache:
    """A dict-backed cache (tests, one-off use); the labels stage caches in the run's DuckDB."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}

    def get(self, key: str) -> str | None:
        return self.data.get(key)

    def put(self, key: str, model: str, prompt: str, response: str) -> None:
        self.data[key] = response


@dataclass
class LLMSettings:
    """Endpoint and limits. ``base_url`` None means the openai package's default (or $OPENAI_BASE_URL)."""

    model: str = "gpt-4o"
    base_url: str | None = None
    timeout: float = 30.0
    max_retries: int = 4
    backoff: float = 1.0  # seconds before the first retry, doubled each time
    max_tokens: int = 100

    @classmethod
    def from_env(cls, model: str | None = None, base_url: str | None = None, **kw) -> LLMSettings:
        if "LFP_LLM_BACKOFF" in os.environ:
            kw.setdefault("backoff", float(os.environ["LFP_LLM_BACKOFF"]))
        return cls(
            model=model or os.environ.get("LFP_LLM_MODEL") or cls.model,
            base_url=base_url or os.environ.get("OPENAI_BASE_URL") or None,
            **kw,
        )


def cache_key(model: str, messages: list[dict]) -> str:
    return hashlib.sha256(json.dumps([model, messages], sort_keys=True).encode()).hexdigest()


@dataclass
class LLMClient:
    """Chat completions with a cache in front, retries with exponential backoff on 429, 5xx,
    timeouts, refused connections and malformed responses, and clear errors on 401/403/404."""

    settings: LLMSettings
    cache: Cache
    api_key: str | None = None
    sleep: Callable[[float], None] = time.sleep
    n_requests: int = 0
    n_cached: int = 0
    tokens_used: int = 0
    _client: Any = field(default=None, repr=False)  # openai.OpenAI, imported when the client is made

    def __post_init__(self) -> None:
        import openai

        key = self.api_key or os.environ.get("OPENAI_API_KEY")
        if not key:
            raise LLMConfigError(
                "--labeller openai needs an API key in the OPENAI_API_KEY environment variable "
                "(or use --labeller offline)"
            )
        self._client = openai.OpenAI(
            api_key=key, base_url=self.settings.base_url, timeout=self.settings.timeout, max_retries=0
        )
        self.api_key = None  # not kept on the object (repr, logs)

    def complete(self, system: str, user: str) -> str:
        import openai

        s = self.settings
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        key = cache_key(s.model, messages)
        hit = self.cache.get(key)
        if hit is not None:
            self.n_cached += 1
            return hit
        where = s.base_url or "the OpenAI API"
        last = ""
        for attempt in range(s.max_retries + 1):
            if attempt:
                self.sleep(s.backoff * 2 ** (attempt - 1))
            self.n_requests += 1
            try:
                r = self._client.chat.completions.create(
                    model=s.model, messages=messages, max_tokens=s.max_tokens, temperature=0
                )
                text = r.choices[0].message.content
                if not isinstance(text, str):
                    raise ValueError("no message content in the response")
            except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
                raise LLMAuthError(
                    f"{where} refused the API key (HTTP {exc.status_code}); check OPENAI_API_KEY"
                ) from None
            except openai.NotFoundError:
                raise LLMNotFoundError(
                    f"HTTP 404 from {where}: the model {s.model!r} or the URL does not exist "
                    "(check --llm-model and --llm-base-url)"
                ) from None
            except openai.RateLimitError:
                last = "HTTP 429 (rate limited)"
            except openai.APITimeoutError:
                last = f"no answer within {s.timeout:g} s"
            except openai.APIConnectionError:
                last = f"cannot connect to {where}"
            except openai.APIStatusError as exc:
                if exc.status_code < 500:
                    raise LLMError(f"HTTP {exc.status_code} from {where}: {str(exc.message)[:200]}") from None
                last = f"HTTP {exc.status_code}"
            except (ValueError, AttributeError, IndexError, TypeError, openai.APIResponseValidationError) as exc:
                last = f"malformed response ({type(exc).__name__})"
            else:
                usage = getattr(r, "usage", None)
                self.tokens_used += int(getattr(usage, "total_tokens", 0) or 0)
                self.cache.put(key, s.model, json.dumps(messages), text)
                return text
            log.warning("LLM call failed (%s), attempt %d of %d", last, attempt + 1, s.max_retries + 1)
        raise LLMUnavailableError(
            f"{where}: {last} after {s.max_retries + 1} attempts; re-run to resume (answers "
            "already received are cached)"
        )


# --- prompts and parsing ---------------------------------------------------------------------------


def render_example(tokens: list[str], acts: list[float], max_act: float, with_values: bool = False) -> str:
    """One excerpt with its active tokens between << and >> (optionally their 0–10 activations)."""
    out, vals = [], []
    for t, a in zip(tokens, acts):
        t = t.replace("\n", "\\n")
        if a > 0:
            out.append(f"<<{t}>>")
            vals.append(str(int(round(10 * a / max_act))) if max_act > 0 else "0")
        else:
            out.append(t)
    text = "".join(out)
    return text + ("\n" + prompts.ACTIVATION_LIST.format(values=", ".join(vals)) if with_values and vals else "")


def parse_answer(text: str) -> str | None:
    m = re.search(r"<answer>(.*?)</answer>", text or "", flags=re.S | re.I)
    return m.group(1).strip() or None if m else None


def parse_binary(text: str) -> bool | None:
    """Strictly one digit, 1 or 0 (optionally in answer tags); anything else is unparseable (None)."""
    s = (parse_answer(text) or text or "").strip().rstrip(".")
    return {"1": True, "0": False}.get(s)


def parse_numbers(text: str, n: int) -> set[int] | None:
    """Excerpt numbers in 1..n from an answer like ``<answer>2, 5</answer>`` or ``none``; None if unparseable."""
    s = parse_answer(text)
    if s is None:
        return None
    if s.lower() in ("none", "no", "-", ""):
        return set()
    parts = [p.strip() for p in re.split(r"[,\s]+", s) if p.strip()]
    if not all(p.isdigit() and 1 <= int(p) <= n for p in parts):
        return None
    return {int(p) for p in parts}


def scores(pred: list[bool], truth: list[bool]) -> dict:
    p, t = np.array(pred, bool), np.array(truth, bool)
    tp, fp, fn = int((p & t).sum()), int((p & ~t).sum()), int((~p & t).sum())
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0
    return {"acc": float((p == t).mean()) if len(t) else float("nan"), "f1": float(f1), "n": int(len(t))}


@dataclass
class Excerpt:
    tokens: list[str]
    acts: list[float]


def llm_label(
    client: LLMClient,
    top: list[Excerpt],
    max_act: float,
    task: str,
    positives: list[Excerpt],
    negatives: list[Excerpt],
    seed: int,
    with_values: bool = True,
) -> dict:
    """Explain from the top excerpts (the explain set), classify the explanation's relevance to the task's
    reward (the LLM reads only the explanation), detection-score it on held-out activating (``positives``)
    and non-activating (``negatives``) excerpts — the caller draws those from documents the explainer was
    not shown. Without both kinds the explanation is not detection-scored. Unparseable answers are
    counted, not scored."""
    shown = "\n".join(f"{i + 1}. {render_example(e.tokens, e.acts, max_act, with_values)}" for i, e in enumerate(top))
    explanation = parse_answer(client.complete(prompts.EXPLAIN_SYSTEM, prompts.EXPLAIN_USER.format(examples=shown)))
    out: dict[str, Any] = {
        "explanation": explanation,
        "relevant": None,
        "detection_acc": None,
        "detection_f1": None,
        "detection_n": 0,
        "n_unparsed": 0,
    }
    if explanation is None:
        out["n_unparsed"] = 1
        return out
    relevant = parse_binary(
        client.complete(
            prompts.RELEVANCE_SYSTEM,
            prompts.RELEVANCE_USER.format(topic=prompts.TASK_TOPICS.get(task, task), explanation=explanation),
        )
    )
    out["relevant"] = relevant
    out["n_unparsed"] += relevant is None
    mix = [(e, True) for e in positives] + [(e, False) for e in negatives] if positives and negatives else []
    if mix:
        order = np.random.default_rng(seed).permutation(len(mix))
        mix = [mix[i] for i in order]
        excerpts = "\n".join(f"{i + 1}. {''.join(e.tokens).replace(chr(10), ' ')}" for i, (e, _) in enumerate(mix))
        picked = parse_numbers(
            client.complete(
                prompts.DETECTION_SYSTEM, prompts.DETECTION_USER.format(explanation=explanation, excerpts=excerpts)
            ),
            len(mix),
        )
        if picked is None:
            out["n_unparsed"] += 1
        else:
            s = scores([i + 1 in picked for i in range(len(mix))], [t for _, t in mix])
            out.update(detection_acc=s["acc"], detection_f1=s["f1"], detection_n=s["n"])
    return out


def offline_label(
    top_tokens: list[str],
    task: str,
    positives: list[Excerpt],
    negatives: list[Excerpt],
    lexicon: dict[str, float],
    relevance_windows: list[Excerpt] | None = None,
) -> dict:
    """The offline labeller (named as such in the store and UI).

    Explanation: the tokens the feature fires on most in its top examples (the explain set).
    Everything scored is on held-out windows the caller draws from documents outside the explain set:

    - relevance (VADER task): Spearman correlation between the feature's activation and the |VADER
      valence| of each token's word over held-out activating windows (``relevance_windows``, default
      ``positives``), relevant when ρ > 0.2 with p < 0.01. It reads word valence, as the probe does, so
      agreement with the probe is consistency between two readings of valence, not independent
      validation;
    - detection: an excerpt is predicted to contain the feature when it holds one of the explanation's
      tokens — how well the explain set's top tokens predict activations on unseen text. Not scored
      without both activating and non-activating excerpts.
    """
    from scipy.stats import spearmanr

    words = [t.strip() for t in top_tokens if t.strip()][:6]
    if not words:
        return {
            "explanation": None,
            "relevant": None,
            "detection_acc": None,
            "detection_f1": None,
            "detection_n": 0,
            "n_unparsed": 0,
        }
    explanation = "fires most on " + ", ".join(f"'{w}'" for w in words)
    relevant, rho = None, None
    held = list(positives) if relevance_windows is None else relevance_windows
    if task == "vader":
        acts = [a for e in held for a in e.acts]
        vals = [abs(lexicon.get(t.strip().lower(), 0.0)) for e in held for t in e.tokens]
        if len(set(vals)) > 1 and len(set(acts)) > 1:
            rho, p = spearmanr(acts, vals)
            relevant = bool(rho > 0.2 and p < 0.01)
    wanted = {w.lower() for w in words}
    mix = [(e, True) for e in positives] + [(e, False) for e in negatives] if positives and negatives else []
    s = (
        scores([any(t.strip().lower() in wanted for t in e.tokens) for e, _ in mix], [t for _, t in mix])
        if mix
        else {"acc": None, "f1": None, "n": 0}
    )
    return {
        "explanation": explanation,
        "relevant": relevant,
        "relevance_rho": None if rho is None else float(rho),
        "detection_acc": s["acc"],
        "detection_f1": s["f1"],
        "detection_n": s["n"],
        "n_unparsed": 0,
    }


def estimate(n_features: int, chars_per_feature: int, max_tokens: int, calls_per_feature: int = 3) -> dict:
    """Calls and tokens a run will use at most (prompt tokens ≈ characters / 4)."""
    return {
        "calls": n_features * calls_per_feature,
        "tokens": n_features * (chars_per_feature // 4 + calls_per_feature * max_tokens),
    }
