"""Feature labelling: the real ``openai`` client against a local OpenAI-compatible server started here
(success, 429 then success, 500s exhausting retries, timeout, malformed JSON, refused connection,
401/404, unparseable answers), strict parsing, the offline labeller, and the labels stage resuming
after a mid-run failure without repeating a single request."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from lfp_core import autointerp as ai
from lfp_core.config import RunConfig
from lfp_core.store import RunReader
from lfp_core.store.summaries import LabelsSummary


def _reply(system: str) -> str:
    if "judge whether" in system:
        return "1"
    if "test a description" in system:
        return "<answer>1, 2</answer>"
    return "<answer>fires on words about films</answer>"


class FakeOpenAI(ThreadingHTTPServer):
    """POST /v1/chat/completions. ``script`` (a list of actions) overrides the default answers:
    ("status", code) · ("sleep", seconds) · ("garbage", None) · ("text", answer)."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.script: list[tuple[str, object]] = []
        self.bodies: list[dict] = []
        self.fail_after: int | None = None  # answer 500 once this many requests were served

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        srv: FakeOpenAI = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv.bodies.append(body)
        kind, arg = srv.script.pop(0) if srv.script else ("text", None)
        if srv.fail_after is not None and len(srv.bodies) > srv.fail_after:
            kind, arg = "status", 500
        if kind == "sleep":
            time.sleep(float(arg))
            kind, arg = "text", None
        if kind == "status":
            self._send(int(arg), json.dumps({"error": {"message": f"scripted {arg}", "type": "x"}}).encode())
        elif kind == "garbage":
            self._send(200, b"{not json")
        else:
            text = arg if arg is not None else _reply(body["messages"][0]["content"])
            self._send(
                200,
                json.dumps(
                    {
                        "id": "c",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [
                            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                        ],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
                    }
                ).encode(),
            )

    def _send(self, code: int, data: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    srv = FakeOpenAI()
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _client(url: str, **kw) -> ai.LLMClient:
    sleeps: list[float] = []
    c = ai.LLMClient(
        ai.LLMSettings(
            model="test-model",
            base_url=url,
            timeout=kw.pop("timeout", 5.0),
            max_retries=kw.pop("max_retries", 3),
            backoff=0.01,
        ),
        ai.MemoryCache(),
        api_key="sk-test-secret",
        sleep=sleeps.append,
    )
    c.sleeps = sleeps
    return c


def test_success_is_cached(server):
    c = _client(server.url)
    assert c.complete("sys", "hello") == "<answer>fires on words about films</answer>"
    assert c.complete("sys", "hello") == "<answer>fires on words about films</answer>"
    assert c.n_requests == 1 and c.n_cached == 1 and c.tokens_used == 15 and len(server.bodies) == 1
    assert "sk-test-secret" not in repr(c)


def test_rate_limit_then_success_backs_off(server):
    server.script = [("status", 429), ("status", 429), ("text", "ok")]
    c = _client(server.url)
    assert c.complete("s", "u") == "ok"
    assert c.n_requests == 3 and c.sleeps == [0.01, 0.02]


def test_server_errors_exhaust_the_retries(server):
    server.script = [("status", 500)] * 5
    c = _client(server.url, max_retries=2)
    with pytest.raises(ai.LLMUnavailableError, match="HTTP 500 after 3 attempts"):
        c.complete("s", "u")
    assert len(server.bodies) == 3


def test_timeout_is_retried_then_reported(server):
    server.script = [("sleep", 1.5), ("sleep", 1.5)]
    c = _client(server.url, timeout=0.3, max_retries=1)
    with pytest.raises(ai.LLMUnavailableError, match="no answer within 0.3 s"):
        c.complete("s", "u")


def test_malformed_json_is_retried(server):
    server.script = [("garbage", None), ("text", "fine")]
    c = _client(server.url)
    assert c.complete("s", "u") == "fine" and c.n_requests == 2


def test_auth_and_not_found_are_clear_and_not_retried(server):
    server.script = [("status", 401)]
    with pytest.raises(ai.LLMAuthError, match="refused the API key") as e:
        _client(server.url).complete("s", "u")
    assert "sk-test-secret" not in str(e.value)
    server.script = [("status", 404)]
    with pytest.raises(ai.LLMNotFoundError, match="'test-model'"):
        _client(server.url).complete("s", "u")
    assert len(server.bodies) == 2


def test_refused_connection_and_missing_key(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ai.LLMUnavailableError, match="cannot connect"):
        _client(f"http://127.0.0.1:{port}/v1", max_retries=1).complete("s", "u")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ai.LLMConfigError, match="OPENAI_API_KEY"):
        ai.LLMClient(ai.LLMSettings(), ai.MemoryCache())


def test_llm_label_scores_detection_and_counts_unparseable_answers(server):
    top = [ai.Excerpt([" a", " great", " film"], [0.0, 3.0, 0.5])]
    pos = [ai.Excerpt([" so", " great"], [0.0, 2.0]), ai.Excerpt([" great", "!"], [1.0, 0.0])]
    neg = [ai.Excerpt([" the", " plot"], [0.0, 0.0]), ai.Excerpt([" it", " was"], [0.0, 0.0])]
    out = ai.llm_label(_client(server.url), top, 3.0, "vader", pos, neg, seed=0)
    assert out["explanation"] == "fires on words about films" and out["relevant"] is True
    sent = server.bodies[0]["messages"][1]["content"]
    assert "<<great>>" not in sent and "<< great>>" in sent and "10" in sent  # marked token, 0–10 activation
    detect = server.bodies[2]["messages"][1]["content"]
    order = [line for line in detect.splitlines() if line[:2] in ("1.", "2.", "3.", "4.")]
    truth = [any(w in line for w in ("so great", "great!")) for line in order]
    assert out["detection_acc"] == pytest.approx(sum(p == t for p, t in zip([True, True, False, False], truth)) / 4)
    server.script = [("text", "It fires on films.")]  # no answer tags
    bad = ai.llm_label(_client(server.url), top, 3.0, "vader", pos, neg, seed=0)
    assert bad["explanation"] is None and bad["n_unparsed"] == 1


def test_strict_parsing():
    assert ai.parse_binary("1") is True and ai.parse_binary(" 0 ") is False and ai.parse_binary("<answer>1</answer>")
    assert ai.parse_binary("yes") is None and ai.parse_binary("1 because") is None
    assert (
        ai.parse_numbers("<answer>2, 5</answer>", 6) == {2, 5} and ai.parse_numbers("<answer>none</answer>", 6) == set()
    )
    assert ai.parse_numbers("<answer>7</answer>", 6) is None and ai.parse_numbers("2, 5", 6) is None


def test_offline_labeller_is_named_and_deterministic():
    lex = {"great": 3.1, "awful": -2.0}
    pos = [
        ai.Excerpt([" great", "!"], [1.0, 0.0]),
        ai.Excerpt([" so", " awful", " a", " plot"], [0.0, 2.0, 0.0, 0.1]),
    ] * 3
    neg = [ai.Excerpt([" the", " plot"], [0.0, 0.0])]
    a = ai.offline_label([" great", " awful"], "vader", pos, neg, lex)
    assert a == ai.offline_label([" great", " awful"], "vader", pos, neg, lex)
    assert a["explanation"] == "fires most on 'great', 'awful'" and a["relevant"] is True
    assert a["detection_acc"] == 1.0 and "not an LLM" in ai.OFFLINE
    assert ai.offline_label([], "vader", pos, neg, lex)["explanation"] is None
    assert ai.offline_label([" great"], "vader", pos, [], lex)["detection_acc"] is None  # no negatives: not scored


def test_offline_relevance_is_scored_on_held_out_windows_only():
    """Relevance is read from held-out windows alone: a feature whose held-out activations sit off the
    valence words is not relevant, whatever its top tokens (on 52d4a5a relevance pooled the explainer's own
    top windows, which by construction hold its top tokens, with the detection positives)."""
    lex = {"great": 3.1, "awful": -2.0}
    held_pos = [ai.Excerpt([" the", " plot", " great"], [2.0, 1.5, 0.0]) for _ in range(6)]
    held_neg = [ai.Excerpt([" awful", " film", " it"], [0.0, 0.0, 0.0]) for _ in range(6)]
    out = ai.offline_label([" great"], "vader", held_pos, held_neg, lex)
    assert out["relevance_rho"] < 0 and out["relevant"] is False
    on_valence = [ai.Excerpt([" the", " plot", " great"], [0.0, 0.2, 2.0]) for _ in range(6)]
    assert ai.offline_label([" great"], "vader", held_pos, held_neg, lex, relevance_windows=on_valence)["relevant"]
    assert out["detection_acc"] == 1.0 and out["detection_n"] == 12


def _pool(n_docs: int = 30, length: int = 12):
    from scipy import sparse

    from lfp_core.pipeline.labels import ScorePool

    rng = np.random.default_rng(0)
    doc = np.repeat(np.arange(100, 100 + n_docs), length)
    pos = np.tile(np.arange(length), n_docs)
    acts = np.zeros((len(doc), 3), dtype=np.float32)
    fires = rng.random(len(doc)) < 0.08
    acts[fires, 0] = rng.uniform(0.5, 3.0, int(fires.sum()))
    acts[doc < 110, 0] += 5.0 * (pos[doc < 110] == 3)  # the strongest documents: the explain set's
    tokens = [f"d{d}p{p}" for d, p in zip(doc, pos)]
    return ScorePool(doc, pos, tokens, sparse.csc_matrix(acts)), acts


def test_scoring_windows_never_share_a_document_with_the_explain_set():
    from lfp_core.pipeline.labels import score_docs, score_windows

    assert list(score_docs([1, 2, 3, 4, 5], [2, 4])) == [1, 3, 5]  # documents with a probe point are never scored
    pool, acts = _pool()
    explain = set(range(100, 110))
    got = score_windows(pool, 0, explain, 8, 2, np.random.default_rng(1))
    assert got.positives and got.negatives and not got.docs & explain
    assert len(got.docs) == len(got.positives) + len(got.negatives)  # one window per document
    for e in got.positives + got.negatives:
        docs = {t.split("p")[0] for t in e.tokens}
        assert len(docs) == 1 and int(next(iter(docs))[1:]) not in explain and 1 <= len(e.tokens) <= 5
    assert all(max(e.acts) > 0 for e in got.positives) and all(max(e.acts) == 0 for e in got.negatives)
    for e in got.positives:  # each centred on its document's strongest activation, with the window's true values
        d = int(e.tokens[0].split("p")[0][1:])
        assert max(e.acts) == pytest.approx(acts[pool.doc == d, 0].max())
    # a feature that never fires outside the explain set has nothing to be detection-scored on
    none = score_windows(pool, 1, set(), 8, 2, np.random.default_rng(1))
    assert none.positives == [] and len(none.negatives) == 8


def test_labels_stage_resumes_without_repeating_a_request(server, monkeypatch, quick_run, tmp_path):
    from lfp_core.precompute import run_pipeline

    run = tmp_path / "llm"
    shutil.copytree(quick_run, run)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    cfg = RunConfig.from_dict(RunReader(run).run_info()["config"])
    cfg = cfg.with_values(
        {"labels.labeller": "openai", "labels.llm_model": "test-model", "labels.llm_base_url": server.url}
    )
    from lfp_core.pipeline.labels import LabelBudgetError

    with pytest.raises(LabelBudgetError, match="smaller than one feature"):
        run_pipeline(cfg.with_values({"labels.max_tokens": 10}), run)
    assert server.bodies == []  # refused before any request
    server.fail_after = 20  # the endpoint goes down mid-run
    monkeypatch.setenv("LFP_LLM_BACKOFF", "0")
    with pytest.raises(ai.LLMUnavailableError):
        run_pipeline(cfg, run)
    answered = server.bodies[:20]
    assert {s.name: s.status for s in RunReader(run).stages()}["labels"] == "failed"
    server.fail_after, server.bodies = None, []
    run_pipeline(cfg, run)
    again = {json.dumps(b["messages"]) for b in server.bodies}
    assert not again & {json.dumps(b["messages"]) for b in answered}  # nothing answered is asked twice
    r = RunReader(run)
    labels = r.labels("tuned")
    detail = r.summary(LabelsSummary)
    assert len(labels) == detail.n_labelled == cfg.labels.probe_top + cfg.labels.random
    assert set(labels.labeller) == {"openai:test-model"} and labels.relevant.all()
    assert detail.overlap["n_flagged"] == len(labels) and detail.llm_cached >= 0
    assert 20 + len(server.bodies) <= 3 * len(labels)  # every prompt answered once across the two runs
    # a third run: every stage up to date, no request at all
    server.bodies = []
    run_pipeline(cfg, run)
    assert server.bodies == []
