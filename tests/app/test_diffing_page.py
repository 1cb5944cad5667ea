"""The Model diffing page and the report's diffing section on tiny runs whose diffing stages were written
through the store's writer (tests/tiny_diffing.py): the page shows what the rows hold (class counts beside
the null's, the latent table with its links and single-latent effects, patching, lens, causal checks), names
each stage not yet run, says when a run has no null control and why, and shows a token's markup as text."""

from __future__ import annotations

from pathlib import Path

import pytest

from lfp_core.report import build_report, format_report
from lfp_core.safetext import md_code, md_text
from lfp_core.store import RunReader
from lfp_core.store.summaries import LocalisationSummary
from lfp_core.viz import fmt_p
from tests.app.test_untrusted_text import assert_inert, rendered
from tests.helpers import open_page
from tests.tiny_diffing import NO_NULL_REASON, diffing_run

TOKEN = "<script>alert(1)</script> **b** [x](http://evil.example)"
PAGE = "views/diffing.py"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {"full": diffing_run(root / "full", token=TOKEN), "nonull": diffing_run(root / "nonull", null=False)}


def _markdown(at) -> str:
    return "\n".join(m.value for m in at.markdown)


def _open(monkeypatch, run: Path, page: str = PAGE, **params):
    at = open_page(monkeypatch, run.parent, page, run=run, **params)
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def test_headline_shows_the_robust_counts_of_the_tuned_and_the_null_crosscoders(monkeypatch, runs):
    at = _open(monkeypatch, runs["full"])
    dicts = RunReader(runs["full"]).diff_dictionaries()
    cc = dicts[dicts.kind == "crosscoder"]
    md = _markdown(at)
    for layer, g in cc.groupby("layer"):
        t, n = (g[g.pair == p].iloc[0] for p in ("tuned", "null"))
        assert (
            f"**Layer {layer}**: **{t.n_robust}** robust tuned-only latents of {t.d_sae} for the fine-tune, "
            f"**{n.n_robust}** of {n.d_sae} for the null control"
        ) in md
    table = at.dataframe[0].value
    assert table["robust tuned-only"].tolist() == cc.n_robust.tolist()
    assert table["tuned-only (not robust)"].tolist() == cc.n_tuned_only.tolist()
    assert table["compared with base"].tolist() == ["fine-tune" if p == "tuned" else "null control" for p in cc.pair]
    assert "shuffled" in md  # the null recipe


def test_latent_table_filters_by_class_and_links_each_latent_to_its_feature_page(monkeypatch, runs):
    from views.common import feature_url

    run = runs["full"]
    at = _open(monkeypatch, run)
    at.selectbox(key="dd_class").set_value("robust tuned-only").run()
    r = RunReader(run)
    want = r.diff_latents("cc_tuned_L1", "robust tuned-only")
    table = at.dataframe[1].value
    assert table.latent.tolist() == want.latent.tolist() and set(table["class"]) == {"robust tuned-only"}
    assert table.rel_norm.tolist() == pytest.approx(want.rel_norm.tolist())
    assert table.page.tolist() == [feature_url(str(run), "cc_tuned", 1, int(f)) for f in want.latent]
    dc = r.diff_causal()
    single = dc[(dc.kind == "single") & (dc.dict_id == "cc_tuned_L1")]
    assert dict(zip(table.latent, table.single_diff)) == pytest.approx(
        {int(x.latents[0]): x.diff for x in single.itertuples()}
    )
    # the other dictionaries: the null control's difference SAE (no classes)
    at.radio(key="dd_kind").set_value("diff_sae").run()
    at.selectbox(key="dd_pair").set_value("null").run()
    assert at.dataframe[1].value.latent.tolist() == r.diff_latents("dsae_null_L1").latent.tolist()
    assert "class" not in at.dataframe[1].value
    # a link opens the latent on the Feature page
    _open(monkeypatch, run, "views/feature.py", role="cc_tuned", layer=1, feature=int(want.latent.iloc[0]))


def test_patching_lens_and_causal_checks_show_the_stored_figures(monkeypatch, runs):
    run = runs["full"]
    at = _open(monkeypatch, run)
    md = _markdown(at)
    r = RunReader(run)
    loc = r.summary(LocalisationSummary)
    g, s = loc.gain, loc.sum_fraction
    assert f"Reward gain over the base model: **{g.mean:+.3f} (95% CI {g.lo:+.3f} to {g.hi:+.3f})**" in md
    assert f"fractions sum to **{s.mean:.2f} (95% CI {s.lo:.2f} to {s.hi:.2f})**" in md
    patch = r.diff_patching()
    top = patch[(patch.pair == "tuned") & (patch.component == loc.top_component)].iloc[0]
    assert (
        f"{md_code(loc.top_component)}, carries **{top.frac:.2f} (95% CI {top.frac_lo:.2f} to {top.frac_hi:.2f})**"
        in md
    )
    assert "Its CI includes 0, so the fraction each component carries is undefined." in md  # the null's gain
    for x in r.diff_lens().itertuples():
        assert f"**{x.steer_diff:+.3f} (95% CI {x.steer_lo:+.3f} to {x.steer_hi:+.3f})**" in md
        assert f"rank p **{fmt_p(x.steer_p_rank)}** among {x.n_random} random directions" in md
    dc = r.diff_causal()
    tested = dc[dc.kind == "tested"]
    shown = at.dataframe[-1].value
    assert shown.set_id.tolist() == tested.set_id.tolist()
    assert shown.p_rank.tolist() == [fmt_p(p) for p in tested.p_rank]
    assert shown.controls_stored.tolist() == [int((dc.control_of == s).sum()) for s in tested.set_id]


def test_each_diffing_stage_not_run_is_named(monkeypatch, tiny):
    at = _open(monkeypatch, tiny)
    infos = " ".join(i.value for i in at.info)
    for stage in ("null_rlhf", "crosscoders", "localisation", "diff_causal"):
        assert f"the `{stage}` stage has not finished" in infos and f"--until {stage}" in infos


def test_a_run_without_a_null_control_says_so_and_why(monkeypatch, runs):
    at = _open(monkeypatch, runs["nonull"])
    assert any("This run has no null control" in i.value and md_text(NO_NULL_REASON) in i.value for i in at.info)
    md, captions = _markdown(at), " ".join(c.value for c in at.caption)
    assert "no null control to compare with" in md
    for what in ("No null overlay", "No null control patching", "No null lens", "No null sets"):
        assert what in captions


def test_a_token_with_markup_is_shown_as_text(monkeypatch, runs):
    at = _open(monkeypatch, runs["full"])
    assert md_code(TOKEN) in _markdown(at)  # the lens's promoted token, in a code span
    assert_inert(rendered(at))
    at.selectbox(key="dd_class").set_value("robust tuned-only").run()
    assert any(t.startswith(TOKEN) for t in at.dataframe[1].value.top_tokens)  # a table cell: plain text


def test_report_has_the_diffing_section(runs):
    rep = build_report(str(runs["full"]))
    d = rep["diffing"]
    r = RunReader(runs["full"])
    cc = r.diff_dictionaries().query("kind == 'crosscoder'")
    for x in cc.itertuples():
        assert d["counts"][x.pair][str(x.layer)]["robust"] == x.n_robust
    loc = r.summary(LocalisationSummary)
    assert (
        d["patching"]["gain"]["mean"] == loc.gain.mean
        and d["patching"]["top_component"]["component"] == loc.top_component
    )
    assert set(d["lens"]) == {"tuned", "null"} and set(d["causal"]) == set(
        r.diff_causal().query("kind == 'tested'").set_id
    )
    text = format_report(rep)
    for layer in (1, 2):
        t, n = d["counts"]["tuned"][str(layer)], d["counts"]["null"][str(layer)]
        assert (
            f"crosscoder layer {layer} ({t['d_sae']} latents): robust tuned-only {t['robust']} (null {n['robust']})"
            in text
        )
    assert "diffing: null control shuffled (6 GRPO steps)" in text
    nonull = format_report(build_report(str(runs["nonull"])))
    assert f"diffing: no null control (null control: {NO_NULL_REASON})" in nonull
    assert "; no null control" in nonull
