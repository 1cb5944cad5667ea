"""A damaged data file under --data-dir is one line naming the file, never a traceback."""

from __future__ import annotations

import gzip
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from lfp_core import corpora

ROOT = Path(__file__).resolve().parents[1]


def _imdb_dir(tmp_path: Path, kind: str, shared_data: Path | None = None) -> Path:
    d = tmp_path / kind / "imdb"
    d.mkdir(parents=True)
    target = d / corpora.IMDB_LABELED
    if kind == "not-gzip":
        target.write_text("this is not a gzip file\n" * 100)
    else:  # the first 256 KiB of the real archive: a gzip stream that ends in the middle of a member
        assert shared_data is not None
        with open(shared_data / "imdb" / corpora.IMDB_LABELED, "rb") as f:
            target.write_bytes(f.read(256 * 1024))
    return d.parent


@pytest.mark.parametrize("kind", ["not-gzip", "truncated"])
def test_a_damaged_imdb_archive_is_named_and_said_to_be_damaged(tmp_path, kind, request):
    shared = request.getfixturevalue("shared_data") if kind == "truncated" else None
    data = _imdb_dir(tmp_path, kind, shared)
    with pytest.raises(corpora.DataFormatError, match=r"IMDB archive .*aclImdb_v1_labeled\.tar\.gz is damaged"):
        corpora.imdb_reviews(data, ("train", "test"))
    sha = hashlib.sha256((data / "imdb" / corpora.IMDB_LABELED).read_bytes()).hexdigest()
    out = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "lfp_core.precompute", "--preset", "quick", "--data-dir", str(data), "--out", str(out),
         "--until", "prompts"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert "is damaged" in res.stderr and "download it again" in res.stderr
    assert hashlib.sha256((data / "imdb" / corpora.IMDB_LABELED).read_bytes()).hexdigest() == sha


def test_a_damaged_hh_file_is_named(tmp_path):
    bad = tmp_path / "test.jsonl.gz"
    bad.write_bytes(gzip.compress(b'{"chosen": "a", "rejected": "b"}\n' * 50)[:40])
    with pytest.raises(corpora.DataFormatError, match=r"HH-RLHF file .*test\.jsonl\.gz is damaged"):
        corpora.read_hh_file(bad)
    bad.write_text("plain text, not gzip")
    with pytest.raises(corpora.DataFormatError, match="is damaged"):
        corpora.read_hh_file(bad)
