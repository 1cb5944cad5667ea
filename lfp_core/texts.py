"""The researcher's own texts: prompts (``--prompts``) and the activation corpus (``--corpus``).

A text source is one of

* a JSONL file (``.jsonl``, or ``.jsonl.gz``): one JSON object per line with a string ``text``; blank
  lines are skipped. For prompts an optional ``split`` field of ``"train"`` (an RL prompt) or
  ``"eval"`` (a held-out prompt) is honoured;
* ``hf:NAME_OR_PATH[:SPLIT[:COLUMN]]``: a Hugging Face dataset read with the ``datasets`` library: a
  directory written by ``save_to_disk`` (read with ``load_from_disk``, offline), a local data directory
  or file that ``load_dataset`` reads (json, csv, parquet, …), or a hub name (needs network). SPLIT
  defaults to ``train`` (it picks one split of a dataset dict), COLUMN to ``text``; a ``split`` column is
  honoured like the JSONL field.

**Prompts.** Each text is one whole prompt, as the researcher wrote it (the IMDB prefix lengths,
``prompts.min_tokens``/``max_tokens``, do not apply). A prompt longer than half the model's context
keeps its last half-context tokens (the end is what the model continues; as the DPO stage keeps the
latest turns), which is logged and counted (``n_trimmed``). RL and held-out prompts are split by
document with the run's seed: texts marked ``split`` go to their split, the others are shuffled and
fill the held-out set up to ``prompts.n_eval`` and the RL set up to ``prompts.n_train`` (in that
proportion when there are fewer texts than both together).

**Corpus.** The documents replace the held-out IMDB reviews of the activations stage: shuffled with
the run's seed, cut to their first ``corpus.doc_tokens`` tokens, at most ``corpus.docs`` of them
(documents of fewer than 2 tokens are dropped); every ``corpus.eval_every``-th document of the
activation corpus is held out, as for IMDB. The ablation prefixes are the first
``ablation.prefix_tokens`` tokens of the corpus documents that long.

Each source's contents (the file's bytes, a local dataset directory's files) are fingerprinted into
the hash of the stage that reads it, so an edited file recomputes that stage and what follows.
:func:`check_texts` refuses a bad source before a run starts. Importable without torch.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lfp_core.errors import BadInputError, ConfigError, MissingInputError

log = logging.getLogger(__name__)

HF_PREFIX = "hf:"
SPLITS = ("train", "eval")
MIN_HELD_OUT_DOCS = 2  # held-out corpus documents a run needs (SAE metrics and detection scoring read them)
MIN_DOC_TOKENS = 2
FLAGS = {"prompts": "--prompts", "corpus": "--corpus"}


@dataclass(frozen=True)
class TextRecord:
    """One text of a source, with the split it asks for (prompts) and where it is (for messages)."""

    text: str
    split: str | None
    where: str  # "line 12" (JSONL) or "row 11" (dataset)


@dataclass(frozen=True)
class TextSource:
    """A parsed source: ``kind`` 'jsonl' or 'hf', the file / dataset, and (hf) split and column."""

    spec: str
    kind: str
    location: str
    split: str = "train"
    column: str = "text"


def parse_source(spec: str, what: str = "prompts") -> TextSource:
    """``spec`` as a :class:`TextSource`.

    Raises:
        ConfigError: an ``hf:`` spec with too many parts or an empty name.
    """
    flag = FLAGS.get(what, what)
    text = spec.strip()
    if text.startswith(HF_PREFIX):
        parts = text[len(HF_PREFIX) :].split(":")
        if len(parts) > 3 or not parts[0]:
            raise ConfigError(
                f"{flag} {spec!r}: expected hf:NAME_OR_PATH[:SPLIT[:COLUMN]], e.g. hf:stanfordnlp/imdb:test:text"
            )
        split = parts[1] if len(parts) > 1 and parts[1] else "train"
        column = parts[2] if len(parts) > 2 and parts[2] else "text"
        return TextSource(text, "hf", parts[0], split, column)
    return TextSource(text, "jsonl", text)


def absolute_spec(spec: str | None) -> str | None:
    """The spec with a local path made absolute (the run records where its texts came from)."""
    if spec is None:
        return None
    src = parse_source(spec)
    path = Path(src.location).expanduser()
    if not path.exists():
        return spec
    if src.kind == "jsonl":
        return str(path.resolve())
    tail = spec.strip()[len(HF_PREFIX) + len(src.location) :]
    return f"{HF_PREFIX}{path.resolve()}{tail}"


# --- reading ------------------------------------------------------------------------------------
def _split_of(value: Any, where: str, label: str) -> str | None:
    if value is None:
        return None
    if value not in SPLITS:
        raise BadInputError(f'{label}, {where}: \'split\' must be "train" or "eval", got {value!r}')
    return str(value)


def _read_jsonl(src: TextSource, flag: str) -> list[TextRecord]:
    path = Path(src.location).expanduser()
    label = f"{flag} {src.location}"
    if not path.exists():
        raise MissingInputError(f"{label}: no such file")
    if path.is_dir():
        raise BadInputError(
            f"{label} is a directory; give a JSONL file, or hf:{src.location} for a saved Hugging Face dataset"
        )
    opener: Any = gzip.open if path.suffix == ".gz" else open
    out: list[TextRecord] = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise BadInputError(
                        f"{label} is not JSONL: line {n} is not valid JSON ({exc.msg}); expected one object "
                        'per line such as {"text": "..."}'
                    ) from None
                if not isinstance(rec, dict):
                    raise BadInputError(f"{label}, line {n}: expected a JSON object with a 'text' field")
                if "text" not in rec:
                    keys = ", ".join(map(str, list(rec)[:8])) or "none"
                    raise BadInputError(f"{label}, line {n}: no 'text' field (its fields: {keys})")
                if not isinstance(rec["text"], str):
                    raise BadInputError(f"{label}, line {n}: 'text' must be a string, got {type(rec['text']).__name__}")
                out.append(TextRecord(rec["text"], _split_of(rec.get("split"), f"line {n}", label), f"line {n}"))
    except UnicodeDecodeError as exc:
        raise BadInputError(f"{label} is not a UTF-8 text file ({exc.reason})") from None
    except (OSError, EOFError) as exc:
        raise BadInputError(f"{label} could not be read ({exc})") from None
    return out


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / n).exists() for n in ("dataset_dict.json", "dataset_info.json", "state.json"))


def _load_dataset(src: TextSource, flag: str):
    """The dataset (one split) of an ``hf:`` source."""
    import datasets

    label = f"{flag} {src.spec}"
    path = Path(src.location).expanduser()
    if _is_saved_dataset(path):
        try:
            ds = datasets.load_from_disk(str(path))
        except (OSError, ValueError, FileNotFoundError) as exc:
            raise BadInputError(f"{label}: could not read the saved dataset ({exc})") from None
        if isinstance(ds, datasets.DatasetDict):
            if src.split not in ds:
                raise BadInputError(f"{label}: no split {src.split!r}; the dataset has {', '.join(ds)}")
            ds = ds[src.split]
        return ds
    if not path.exists() and src.location.startswith((".", "/", "~")):
        raise MissingInputError(f"{label}: no such dataset directory or file")
    try:
        if path.is_file():
            kind = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(path.suffix)
            if kind is None:
                raise BadInputError(f"{label}: cannot tell the format of {path.name}; use .jsonl, .csv or .parquet")
            return datasets.load_dataset(kind, data_files=str(path), split="train")
        return datasets.load_dataset(src.location, split=src.split)
    except BadInputError:
        raise
    except Exception as exc:  # datasets raises many types (offline, missing split, bad files)
        raise BadInputError(f"{label}: could not load the dataset ({type(exc).__name__}: {exc})") from None


def _read_hf(src: TextSource, flag: str) -> list[TextRecord]:
    ds = _load_dataset(src, flag)
    label = f"{flag} {src.spec}"
    if src.column not in ds.column_names:
        raise BadInputError(
            f"{label}: no column {src.column!r} (its columns: {', '.join(ds.column_names)}); name it as "
            f"hf:{src.location}:{src.split}:COLUMN"
        )
    texts = ds[src.column]
    splits = ds["split"] if "split" in ds.column_names and src.column != "split" else [None] * len(texts)
    out = []
    for i, (t, sp) in enumerate(zip(texts, splits)):
        if not isinstance(t, str):
            raise BadInputError(f"{label}, row {i}: column {src.column!r} must hold strings, got {type(t).__name__}")
        out.append(TextRecord(t, _split_of(sp, f"row {i}", label), f"row {i}"))
    return out


def read_texts(spec: str, what: str = "prompts") -> list[TextRecord]:
    """The non-empty texts of a source (``what``: 'prompts' or 'corpus', for messages).

    Raises:
        MissingInputError: the file or dataset directory does not exist.
        BadInputError: not JSONL, a line without a string ``text`` (naming the line), a bad ``split``
            value, a dataset without the column, or a dataset that cannot be loaded.
    """
    src = parse_source(spec, what)
    flag = FLAGS.get(what, what)
    records = _read_jsonl(src, flag) if src.kind == "jsonl" else _read_hf(src, flag)
    kept = [r for r in records if r.text.strip()]
    if len(kept) < len(records):
        log.info("%s %s: %d empty texts skipped", flag, spec, len(records) - len(kept))
    return kept


def source_fingerprint(spec: str) -> str:
    """Identity of a source's contents: the file's bytes, a local dataset's files, or (hub) its name."""
    src = parse_source(spec)
    h = hashlib.sha256(src.spec.encode())
    path = Path(src.location).expanduser()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    if src.kind == "jsonl" and not files:
        raise MissingInputError(f"text source {src.location}: no such file")
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def prompts_fingerprint(s: Any) -> str | None:
    """The prompts stage's extra hash input: its prompt source's contents (None: IMDB, the default)."""
    return None if s.prompts.source is None else source_fingerprint(s.prompts.source)


def corpus_fingerprint(s: Any) -> str | None:
    """The extra hash input of a stage reading the corpus (activations, ablation): the corpus source's contents."""
    return None if s.corpus.source is None else source_fingerprint(s.corpus.source)


# --- pre-flight ---------------------------------------------------------------------------------
def corpus_docs_needed(eval_every: int) -> int:
    """Corpus documents needed so every ``eval_every``-th leaves :data:`MIN_HELD_OUT_DOCS` held out."""
    return eval_every * (MIN_HELD_OUT_DOCS - 1) + 1


def check_texts(cfg: Any) -> None:
    """Refuse a bad ``--prompts`` or ``--corpus`` before a run starts (reads the sources, no model).

    Raises:
        ConfigError: a source given for the HH task (which has neither stage). MissingInputError /
            BadInputError: see :func:`read_texts`; too few texts for the RL / held-out split of the
            prompts, or too few documents for the corpus's held-out split (how many are needed and given).
    """
    p, c = cfg.prompts.source, cfg.corpus.source
    if (p or c) and cfg.run.task != "vader":
        flag = "--prompts" if p else "--corpus"
        raise ConfigError(
            f"{flag} applies to the vader task (prompts and the activation corpus); the hh task reads preference "
            "pairs and has neither stage"
        )
    if p:
        records = read_texts(p, "prompts")
        n_train = sum(r.split == "train" for r in records)
        n_eval = sum(r.split == "eval" for r in records)
        free = len(records) - n_train - n_eval
        need_train = cfg.tuned.path is None  # a given tuned model needs no RL prompts
        if len(records) < 1 + need_train:
            raise BadInputError(
                f"--prompts {p} has {len(records)} non-empty texts; it needs at least {1 + need_train} "
                + ("(one RL prompt and one held-out prompt)" if need_train else "(a held-out prompt)")
            )
        if n_eval + free == 0:
            raise BadInputError(f"--prompts {p}: every text has split 'train', so there is no held-out prompt")
        if need_train and n_train + free == 0:
            raise BadInputError(
                f"--prompts {p}: every text has split 'eval', so there is no RL prompt (or give --tuned)"
            )
    if c:
        n = len(read_texts(c, "corpus"))
        used = min(n, cfg.corpus.docs)
        need = corpus_docs_needed(cfg.corpus.eval_every)
        if used < need:
            cap = f" (corpus.docs, sae_corpus_docs, takes {cfg.corpus.docs})" if cfg.corpus.docs < n else ""
            raise BadInputError(
                f"--corpus {c} gives {used} documents{cap}; holding out every {cfg.corpus.eval_every}th "
                f"(corpus.eval_every) needs at least {need} for {MIN_HELD_OUT_DOCS} held-out documents"
            )


# --- building the prompt and corpus sets --------------------------------------------------------
def _share(free: int, need_eval: int, need_train: int) -> int:
    """Held-out texts among ``free`` unassigned ones when there are fewer than both sets want."""
    if free >= need_eval + need_train:
        return need_eval
    if need_eval + need_train == 0:
        return 0
    k = round(free * need_eval / (need_eval + need_train))
    if need_eval and free >= 1:
        k = max(k, 1)
    if need_train and free >= 2:
        k = min(k, free - 1)
    return k


def prompt_rows(
    tokenizer, records: list[TextRecord], n_train: int, n_eval: int, seed: int, max_tokens: int
) -> tuple[list[dict], int]:
    """The prompts table's rows of a researcher's texts (RL prompts first, then held-out ones, each in
    file order) and how many of them were trimmed to ``max_tokens`` (their last tokens kept).

    Raises:
        BadInputError: no text left with a token, or no held-out prompt.
    """
    ids_of: list[list[int]] = []
    keep: list[TextRecord] = []
    trimmed: set[int] = set()
    for r in records:
        ids = list(tokenizer(r.text, add_special_tokens=False)["input_ids"])
        if not ids:
            continue
        if len(ids) > max_tokens:
            ids = ids[-max_tokens:]
            trimmed.add(len(keep))
        ids_of.append(ids)
        keep.append(r)
    rng = np.random.default_rng([seed, 43])
    chosen: dict[str, list[int]] = {}
    for split, cap in (("train", n_train), ("eval", n_eval)):
        marked = [i for i, r in enumerate(keep) if r.split == split]
        chosen[split] = [marked[int(j)] for j in rng.permutation(len(marked))[:cap]]
    free = [i for i, r in enumerate(keep) if r.split is None]
    free = [free[int(j)] for j in rng.permutation(len(free))]
    need_eval, need_train = n_eval - len(chosen["eval"]), n_train - len(chosen["train"])
    k = _share(len(free), need_eval, need_train)
    chosen["eval"] += free[:k]
    chosen["train"] += free[k : k + need_train]
    if not chosen["eval"]:
        raise BadInputError("the given prompts leave no held-out prompt (each text tokenised to nothing?)")
    rows: list[dict] = []
    n_trimmed = len(trimmed & {*chosen["train"], *chosen["eval"]})
    for split in ("train", "eval"):
        for i in sorted(chosen[split]):
            ids = ids_of[i]
            rows.append(
                {
                    "prompt_id": len(rows),
                    "split": split,
                    "source": "given",
                    "doc_id": keep[i].where,
                    "n_tokens": len(ids),
                    "token_ids": [int(t) for t in ids],
                    "text": tokenizer.decode(ids),
                }
            )
    return rows, n_trimmed


def corpus_token_docs(tokenizer, records: list[TextRecord], n_docs: int, doc_tokens: int, seed: int) -> list[list[int]]:
    """Up to ``n_docs`` documents of a researcher's corpus as token ids (the first ``doc_tokens`` of each),
    in an order shuffled with the run's seed (as the IMDB reviews are), skipping those under 2 tokens."""
    out: list[list[int]] = []
    for i in np.random.default_rng([seed, 41]).permutation(len(records)):
        ids = tokenizer(records[int(i)].text[: doc_tokens * 12], add_special_tokens=False)["input_ids"]
        if len(ids) >= MIN_DOC_TOKENS:
            out.append([int(t) for t in ids[:doc_tokens]])
        if len(out) >= n_docs:
            break
    return out


def prefix_rows(tokenizer, records: list[TextRecord], n: int, k: int, seed: int) -> list[dict]:
    """Up to ``n`` prefixes of exactly ``k`` tokens: the starts of the documents that long, drawn without
    replacement with a seeded generator (as :func:`lfp_core.corpora.imdb_prompts` draws IMDB prefixes)."""
    ids_all = [tokenizer(r.text[: k * 12], add_special_tokens=False)["input_ids"] for r in records]
    pool = [ids[:k] for ids in ids_all if len(ids) >= k]
    if not pool:
        return []
    picks = np.random.default_rng(seed).choice(len(pool), size=min(n, len(pool)), replace=False)
    return [{"token_ids": [int(t) for t in pool[int(i)]]} for i in picks]


def check_corpus_size(n: int, eval_every: int, spec: str) -> None:
    """Refuse a tokenised corpus too small for its held-out split (checked again after tokenising)."""
    need = corpus_docs_needed(eval_every)
    if n < need:
        raise BadInputError(
            f"--corpus {spec} leaves {n} documents of at least {MIN_DOC_TOKENS} tokens; holding out every "
            f"{eval_every}th needs at least {need}"
        )
