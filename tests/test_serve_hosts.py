"""The served dashboard refuses other hosts and other sites' pages (issue 20, DNS rebinding): `lfp serve`
on a free port, then an HTTP GET and a WebSocket upgrade to /_stcore/stream with ``Host: evil.example``
(and ``Origin: http://evil.example``) get 403, while the same requests for 127.0.0.1:PORT work."""

from __future__ import annotations

import base64
import http.client
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lfp_core.config import REPO_ROOT
from lfp_core.hostguard import host_allowed, host_name, origin_allowed
from tests.tiny_run import tiny_run


def test_host_and_origin_rules():
    hosts = ["127.0.0.1", "localhost", "::1"]
    assert host_name("127.0.0.1:8501") == "127.0.0.1" and host_name("[::1]:80") == "::1"
    assert host_name("LocalHost.") == "localhost" and host_name("a@b") is None and host_name("h:x") is None
    assert all(host_allowed(h, hosts) for h in ("127.0.0.1:8501", "localhost", "[::1]:8501"))
    for h in ("evil.example", "evil.example:8501", "127.0.0.1.evil.example", None, "", "127.0.0.1/x", "u:p@127.0.0.1"):
        assert not host_allowed(h, hosts), h
    assert host_allowed("a.example.com", ["*.example.com"]) and not host_allowed("example.org", ["*.example.com"])
    assert host_allowed("anything", ["*"])
    assert origin_allowed("http://127.0.0.1:8501", "127.0.0.1:8501", [])
    for o in ("http://evil.example", "http://127.0.0.1:9999", "null", "file://", "ws://127.0.0.1:8501"):
        assert not origin_allowed(o, "127.0.0.1:8501", []), o
    assert origin_allowed("https://app.example.com", "127.0.0.1:8501", ["https://app.example.com"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, host: str, path: str = "/", origin: str | None = None) -> int:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.putrequest("GET", path, skip_host=True)
    c.putheader("Host", host)
    if origin:
        c.putheader("Origin", origin)
    c.endheaders()
    status = c.getresponse().status
    c.close()
    return status


def _upgrade(port: int, host: str, origin: str | None) -> str:
    """The status line the server answers a WebSocket upgrade to /_stcore/stream with."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        "GET /_stcore/stream HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Protocol: streamlit",
    ] + ([f"Origin: {origin}"] if origin else [])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        return s.recv(4096).decode("latin-1").split("\r\n")[0]


def _serve(cmd: list[str], runs: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "LFP_RUNS_DIR": str(runs), "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait_healthy(proc: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.time() + 90
    while True:
        try:
            if _get(port, f"127.0.0.1:{port}", "/_stcore/health") == 200:
                return
        except OSError:
            pass
        if time.time() > deadline or proc.poll() is not None:
            raise RuntimeError(f"the dashboard did not start (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`lfp serve --run TINY --port PORT` as ./lfp demo runs it (the console script's module)."""
    runs = tmp_path_factory.mktemp("runs")
    run = tiny_run(runs / "tiny", until="base_samples")
    port = _free_port()
    log = tmp_path_factory.mktemp("srv") / "serve.log"
    proc = _serve([sys.executable, "-m", "lfp_core.cli", "serve", "--run", str(run), "--port", str(port)], runs, log)
    try:
        _wait_healthy(proc, port, log)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_served_dashboard_refuses_a_foreign_host_over_http(served):
    port = served
    assert _get(port, f"127.0.0.1:{port}") == 200 and _get(port, f"localhost:{port}", "/_stcore/health") == 200
    for path in ("/", "/_stcore/health", "/_stcore/host-config"):
        assert _get(port, "evil.example", path) == 403, path
        assert _get(port, f"evil.example:{port}", path, origin=f"http://evil.example:{port}") == 403, path
    assert _get(port, f"127.0.0.1:{port}", "/_stcore/health", origin="http://evil.example") == 403  # a page elsewhere


def test_served_dashboard_refuses_a_foreign_websocket(served):
    port = served
    ok = f"127.0.0.1:{port}"
    assert " 101 " in _upgrade(port, ok, f"http://{ok}")
    assert " 101 " in _upgrade(port, f"localhost:{port}", f"http://localhost:{port}")
    assert " 101 " in _upgrade(port, ok, None)  # a program (no Origin): Streamlit's own rule
    for host, origin in (
        ("evil.example", "http://evil.example"),  # DNS rebinding, default port
        (f"evil.example:{port}", f"http://evil.example:{port}"),  # DNS rebinding: same-origin to the browser
        (ok, "http://evil.example"),  # a page on another site
        (ok, "http://127.0.0.1:1"),  # another local app's page
        (ok, "null"),  # a sandboxed frame or a file
    ):
        assert " 403 " in _upgrade(port, host, origin), (host, origin)


def test_streamlit_run_app_py_refuses_a_foreign_websocket_host_too(tmp_path):
    """`streamlit run app.py` (no lfp serve) reads the same .streamlit/config.toml: Streamlit's own
    server.allowedHosts check refuses the WebSocket of a rebound name."""
    port = _free_port()
    log = tmp_path / "streamlit.log"
    cmd = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.address", "127.0.0.1"]
    proc = _serve([*cmd, "--server.port", str(port), "--server.headless", "true"], tmp_path, log)
    try:
        _wait_healthy(proc, port, log)
        assert " 101 " in _upgrade(port, f"127.0.0.1:{port}", f"http://127.0.0.1:{port}")
        assert " 403 " in _upgrade(port, f"evil.example:{port}", f"http://evil.example:{port}")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
