"""Crosscoder, latent scaling and difference SAE (lfp_core.crosscoder, lfp_core.latent_scaling) on
synthetic activations with planted ground truth, plus save/load, bad input and loss recovered."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from lfp_core import crosscoder as xc
from lfp_core import crosscoder_metrics as xm
from lfp_core.errors import BadInputError
from lfp_core.latent_scaling import ClassThresholds, classify, latent_scaling

D, N_SHARED, N_PLANTED, N_ROWS, N_TEST = 32, 24, 4, 40_000, 2_000


def synthetic(seed: int):
    """Base and tuned activations from the same sparse codes over one shared dictionary (each
    direction fires with p 0.05, magnitude U(0.5, 1.5)), plus N_PLANTED directions only in the tuned
    set; independent noise 0.02 per model. float16 like a harvest."""
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((N_SHARED + N_PLANTED, D))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    codes = (rng.random((N_ROWS, len(dirs))) < 0.05) * rng.uniform(0.5, 1.5, (N_ROWS, len(dirs)))
    base = codes[:, :N_SHARED] @ dirs[:N_SHARED] + 0.02 * rng.standard_normal((N_ROWS, D))
    tuned = codes @ dirs + 0.02 * rng.standard_normal((N_ROWS, D))
    return base.astype(np.float16), tuned.astype(np.float16), dirs[:N_SHARED], dirs[N_SHARED:]


TRAIN = np.arange(N_ROWS - N_TEST)
TEST = np.arange(N_ROWS - N_TEST, N_ROWS)
# settings checked on seeds 0-19 (all recover every planted direction); aux_coef 0.5 rather than
# Gao et al.'s 1/32: with 1/32 about one seed in five left a planted direction merged into a shared latent
SPEC = xc.CrosscoderSpec(d_sae=128, k=2, lr=0.01, batch_size=128, train_tokens=len(TRAIN), aux_coef=0.5, seed=0)


def _unit(w: np.ndarray) -> np.ndarray:
    return w / np.maximum(np.linalg.norm(w, axis=-1, keepdims=True), 1e-12)


@pytest.fixture(scope="module")
def trained():
    base, tuned, shared, planted = synthetic(0)
    cc, info = xc.train_crosscoder(SPEC, xc.PairedSource(base, tuned, TRAIN, SPEC.batch_size, seed=0))
    return cc, info, base, tuned, shared, planted


def test_crosscoder_recovers_planted_tuned_only_directions(trained):
    cc, info, base, tuned, shared, planted = trained
    st = xm.latent_stats(cc, base, tuned, TEST)
    w = cc.W_dec.detach().numpy()
    tuned_only = np.where(st["rel_norm"] > 0.9)[0]
    cos_planted = planted @ _unit(w[tuned_only, 1]).T  # planted directions vs tuned-only latents' tuned decoders
    assert (cos_planted.max(axis=1) >= 0.9).all(), cos_planted.max(axis=1)
    # each shared direction's best-matching latent (by the summed decoder) sits near r = 0.5
    best = (shared @ _unit(w.sum(1)).T).argmax(axis=1)
    r = st["rel_norm"][best]
    assert np.mean((r > 0.35) & (r < 0.65)) >= 0.9, r
    assert not set(best) & set(tuned_only[cos_planted.argmax(axis=1)])
    rec = xm.reconstruction(cc, base, tuned, TEST)
    assert rec["fvu_base"] < 0.2 and rec["fvu_other"] < 0.2, rec
    assert 0.5 * SPEC.k <= rec["l0"] <= 2 * SPEC.k  # the inference threshold keeps ~k latents a token
    assert info["tokens_per_s"] > 0 and np.isfinite(info["final_loss"]) and info["threshold"] > 0


def test_inference_encoding_does_not_depend_on_the_batch(trained):
    cc, _, base, tuned, *_ = trained
    x = next(xc.pair_batches(base, tuned, TEST[:64]))
    assert torch.equal(cc.encode(x)[:1], cc.encode(x[:1]))


def test_latent_scaling_flags_a_planted_shrinkage_artifact(trained):
    cc, _, base, tuned, shared, planted = trained
    w = cc.W_dec.detach().numpy()
    rel = xm.decoder_stats(cc)["rel_norm"]
    real = [int(np.where(rel > 0.9, planted[j] @ _unit(w[:, 1]).T, -1).argmax()) for j in range(N_PLANTED)]
    fake = int((shared[0] @ _unit(w.sum(1)).T).argmax())  # a shared latent ...
    art = copy.deepcopy(cc)
    with torch.no_grad():
        art.W_dec[fake, 0] = 0  # ... made to look tuned-only: its base decoder shrunk to zero
    rel_art = xm.decoder_stats(art)["rel_norm"]
    assert rel_art[fake] == 1.0 and classify(rel_art[fake]) == "tuned-only"
    ls = latent_scaling(art, xc.pair_batches(base, tuned, TEST), real + [fake])
    cls = classify(rel_art[ls["latents"]], ls["nu_eps"], ls["nu_r"])
    assert list(cls[:-1]) == ["robust tuned-only"] * N_PLANTED, (ls["nu_eps"], ls["nu_r"])
    assert np.all(np.abs(ls["nu_eps"][:-1]) < 0.1) and np.all(np.abs(ls["nu_r"][:-1]) < 0.1)
    # the base error still holds the shared direction where the latent fires: ν^ε near 1
    assert ls["nu_eps"][-1] > 0.8, ls["nu_eps"][-1]
    assert cls[-1] == "tuned-only"


def test_latent_scaling_closed_form_matches_least_squares(trained):
    cc, _, base, tuned, *_ = trained
    x = next(xc.pair_batches(base, tuned, TEST[:500], batch_size=500))
    j = int(np.argmax(xm.latent_stats(cc, base, tuned, TEST[:500])["density"]))
    ls = latent_scaling(cc, [x], [j])
    with torch.no_grad():
        xn = cc.normalize(x)
        f = cc.encode_n(xn, batch_topk=False)
        xh = cc.decode_n(f)
    d = cc.W_dec[j, 1].detach()
    for m, name in enumerate(xc.SLOTS):
        y = xn[:, m] - xh[:, m] + f[:, j : j + 1] * cc.W_dec[j, m].detach()
        a = (f[:, j : j + 1] * d).reshape(-1, 1).double()
        beta = torch.linalg.lstsq(a, y.reshape(-1, 1).double()).solution.item()
        assert ls[f"beta_eps_{name}"][0] == pytest.approx(beta, rel=1e-6)


def test_classify_thresholds():
    t = ClassThresholds()
    r = np.array([0.5, 0.05, 0.95, 0.95, 0.95, 0.75])
    out = classify(r, np.array([0, 0, 0.05, 0.9, np.nan, 0]), np.array([0, 0, 0.1, 0.1, 0.1, 0]), t)
    assert list(out) == ["shared", "base-only", "robust tuned-only", "tuned-only", "tuned-only", "other"]


def test_difference_sae_recovers_planted_directions():
    from lfp_core.saes import SAESpec, decoder, train_sae

    base, tuned, _, planted = synthetic(1)
    src = xc.DifferenceSource(base, tuned, TRAIN, 256, seed=0, layer=0)
    # (tuned − base) is the planted codes alone plus noise; checked on seeds 1-5 (min cosine 0.999)
    spec = SAESpec(arch="topk", d_sae=8, k=1, lr=1e-2, batch_size=256, train_tokens=len(TRAIN) // 256 * 256, seed=0)
    sae, _ = train_sae(spec, src, "blocks.0.hook_resid_post")
    cos = planted @ _unit(decoder(sae)).T
    assert (cos.max(axis=1) >= 0.9).all(), cos.max(axis=1)


def test_save_load_round_trip_and_damaged_files(trained, tmp_path):
    cc, _, base, tuned, *_ = trained
    path = xc.save_crosscoder(cc, tmp_path / "cc", extra={"hook": "blocks.0.hook_resid_post"})
    back = xc.load_crosscoder(path)
    x = next(xc.pair_batches(base, tuned, TEST[:256]))
    assert torch.equal(back.encode(x), cc.encode(x)) and torch.equal(back(x), cc(x))
    assert float(back.threshold) == float(cc.threshold) and xc.crosscoder_metadata(path)["hook"].endswith("post")
    with pytest.raises(BadInputError, match="d_in=32, not the model's 64"):
        xc.load_crosscoder(path, d_in=64)
    (path / "crosscoder.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(BadInputError, match=r"crosscoder weights .*crosscoder.safetensors are damaged"):
        xc.load_crosscoder(path)
    (path / "cfg.json").write_text("{not json")
    with pytest.raises(BadInputError, match=r"crosscoder config .*cfg.json is damaged"):
        xc.load_crosscoder(path)
    with pytest.raises(BadInputError, match="no crosscoder at"):
        xc.load_crosscoder(tmp_path / "nothing")


def test_mismatched_pairs_are_refused():
    a = np.zeros((10, 8), np.float16)
    with pytest.raises(BadInputError, match=r"differ in d_model: base \(10, 8\) vs other \(10, 6\)"):
        xc.PairedSource(a, np.zeros((10, 6), np.float16), np.arange(10), 4, 0)
    with pytest.raises(BadInputError, match=r"differ in row count: base \(10, 8\) vs other \(9, 8\)"):
        xc.DifferenceSource(a, np.zeros((9, 8), np.float16), np.arange(9), 4, 0)
    with pytest.raises(BadInputError, match="out of range"):
        xc.PairedSource(a, a, np.arange(11), 4, 0)


REVIEWS = " ".join(
    [
        "This movie was a wonderful surprise, with great acting and a story that kept me watching until the end.",
        "I hated every minute of this film; the plot was boring, the dialogue was terrible and the ending made no sense.",
        "The director has made better films, but the cast is charming and the music is lovely.",
        "A dull, predictable and badly written mess that wastes a talented actor in the lead role.",
        "One of the best films I have seen this year: funny, moving and beautifully shot.",
        "The first half is slow, yet the second half is exciting and the final scene is unforgettable.",
    ]
    * 6
)


def test_ce_recovered_on_the_demo_model_and_a_perturbed_copy():
    from lfp_core.models import load_model

    loaded = load_model("demo")
    base = loaded.hooked()
    other = copy.deepcopy(base)  # a "fine-tune": the first block's weights perturbed
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in other.blocks[0].parameters():
            p.add_(0.05 * p.std() * torch.randn(p.shape, generator=g))
    hook = "blocks.2.hook_resid_pre"
    ids = loaded.tokenizer(REVIEWS, add_special_tokens=False)["input_ids"]
    starts = np.random.default_rng(0).integers(0, len(ids) - 33, 160)
    bos = [loaded.tokenizer.bos_token_id] if loaded.tokenizer.bos_token_id is not None else []
    seqs = [bos + ids[s : s + 33 - len(bos)] for s in starts]
    acts: list[list[np.ndarray]] = [[], []]
    with torch.no_grad():
        for s in range(0, 128, 32):
            toks = torch.tensor(seqs[s : s + 32])
            for m, model in enumerate((base, other)):
                _, cache = model.run_with_cache(toks, names_filter=hook)
                acts[m].append(cache[hook].reshape(-1, base.cfg.d_model).numpy().astype(np.float16))
    a0, a1 = np.concatenate(acts[0]), np.concatenate(acts[1])
    spec = xc.CrosscoderSpec(d_sae=512, k=16, lr=3e-3, batch_size=128, train_tokens=len(a0), seed=0)
    cc, _ = xc.train_crosscoder(spec, xc.PairedSource(a0, a1, np.arange(len(a0)), 128, seed=0))
    out = xm.ce_recovered(base, other, cc, hook, seqs[128:], batch_size=16)  # held-out sequences
    for name in xc.SLOTS:
        r = out[name]
        assert r["ce_tokens"] == 32 * 32
        assert r["ce_clean"] < r["ce_spliced"] < r["ce_zero"], r
        assert 0 < r["ce_loss_recovered"] < 1
        assert r["ce_loss_recovered"] == pytest.approx(xm.loss_recovered(r["ce_clean"], r["ce_spliced"], r["ce_zero"]))
    assert xm.loss_recovered(2.0, 2.0, 5.0) == 1.0 and xm.loss_recovered(2.0, 5.0, 5.0) == 0.0
    with pytest.raises(BadInputError, match="has no hook"):
        xm.ce_recovered(base, other, cc, "blocks.9.nope", seqs[:2])


def test_l1_variant_trains_and_shrinks_unused_base_decoders():
    base, tuned, _, planted = synthetic(2)
    # checked on seeds 2 and 3: r >= 0.996 and cosine >= 0.999 for every planted direction
    spec = xc.CrosscoderSpec(arch="l1", d_sae=64, l1=1.0, lr=1e-2, batch_size=128, train_tokens=len(TRAIN), seed=0)
    cc, info = xc.train_crosscoder(spec, xc.PairedSource(base, tuned, TRAIN, 128, seed=0))
    rel = xm.decoder_stats(cc)["rel_norm"]
    cos = planted @ _unit(cc.W_dec.detach().numpy()[:, 1]).T
    best = cos.argmax(axis=1)
    assert np.isfinite(info["final_loss"]) and (rel[best] > 0.9).all() and (cos.max(axis=1) >= 0.9).all(), rel[best]
