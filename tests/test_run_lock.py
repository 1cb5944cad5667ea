"""Two precomputes on one run: the second is refused with the first's PID; a reader holding the file
(the dashboard, a notebook) makes the precompute wait, not die."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from lfp_core.precompute import LOCK_NAME, exclusive
from lfp_core.store import RunReader, RunWriter, StoreError, db_path

ROOT = Path(__file__).resolve().parents[1]


def test_a_second_precompute_on_one_run_is_refused_with_the_first_ones_pid(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "lfp_core.precompute", "--preset", "quick", "--out", str(out), "--until", "rlhf"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        lock = out / LOCK_NAME
        deadline = time.time() + 300
        while not (lock.exists() and lock.read_text().strip()) and time.time() < deadline:
            time.sleep(0.2)
        assert lock.read_text().strip() == str(first.pid)
        res = subprocess.run(
            [sys.executable, "-m", "lfp_core.precompute", "--preset", "quick", "--out", str(out), "--until", "rlhf"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 2, res.stderr[-2000:]
        assert f"another precompute (PID {first.pid}) is writing the run at {out}" in res.stderr
        assert "Traceback" not in res.stderr
    finally:
        first.kill()
        first.wait()
    with exclusive(out):  # the kernel released the killed process's lock
        assert (out / LOCK_NAME).read_text() == str(__import__("os").getpid())


def test_the_lock_refuses_in_process_too(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from lfp_core.precompute import exclusive\nfrom pathlib import Path\nimport time\n"
         f"with exclusive(Path({str(tmp_path)!r})):\n    print('held', flush=True)\n    time.sleep(60)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreError, match=f"PID {holder.pid}"), exclusive(tmp_path):
            pass
    finally:
        holder.kill()
        holder.wait()


def test_a_writer_waits_for_a_reader_that_holds_the_file(tmp_path, monkeypatch):
    run = tmp_path / "run"
    RunWriter(run).set_config("quick", "{}")
    hold_s = 8.0  # longer than the 5 s a reader waits: the writer must wait longer than that
    reader = subprocess.Popen(
        [sys.executable, "-c", f"import duckdb, time\ncon = duckdb.connect({str(db_path(run))!r}, read_only=True)\n"
         f"print('open', flush=True)\ntime.sleep({hold_s})\ncon.close()"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert reader.stdout is not None and reader.stdout.readline().strip() == "open"
        t0 = time.time()
        monkeypatch.setenv("LFP_LOCK_WAIT_S", "120")
        RunWriter(run).set_config("quick", '{"after": "the reader"}')  # waited, then wrote
        assert time.time() - t0 >= hold_s - 1.5
    finally:
        reader.kill()
        reader.wait()
    assert RunReader(run).run_info()["config"] == {"after": "the reader"}
