"""SAEs: the trainer recovers known directions, metrics mean what their labels say, dictionaries
compare correctly, splicing with the error term is exact, and bad input gets specific errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from lfp_core import activations, saes
from lfp_core.models import load_model


def _synthetic(n: int = 60_000, d: int = 48, n_true: int = 64, active: int = 3, seed: int = 0):
    """Rows that are sparse non-negative combinations of ``n_true`` known unit directions."""
    rng = np.random.default_rng(seed)
    true = rng.normal(size=(n_true, d))
    true /= np.linalg.norm(true, axis=1, keepdims=True)
    x = np.zeros((n, d), dtype=np.float32)
    for _ in range(active):
        which = rng.integers(0, n_true, size=n)
        x += (rng.uniform(0.5, 2.0, size=(n, 1)) * true[which]).astype(np.float32)
    return x, true


def _recovery(sae, true: np.ndarray) -> float:
    """Mean over the true directions of the best cosine with any decoder row."""
    dec = saes.decoder(sae)
    dec = dec / np.linalg.norm(dec, axis=1, keepdims=True)
    return float((true @ dec.T).max(axis=1).mean())


@pytest.mark.parametrize(
    "spec",
    [
        saes.SAESpec(arch="topk", d_sae=128, k=3, lr=3e-3, train_tokens=50_000, batch_size=256),
        saes.SAESpec(arch="relu", d_sae=128, l1=3.0, lr=3e-3, train_tokens=50_000, batch_size=256),
    ],
    ids=["topk", "relu"],
)
def test_trained_sae_recovers_the_true_directions(spec):
    x, true = _synthetic()
    src = saes.ActivationSource(x, np.arange(len(x)), spec.batch_size, seed=0, layer="synthetic")
    sae, _ = saes.train_sae(spec, src, "blocks.0.hook_mlp_out")
    untrained = saes.SAESpec(**{**spec.__dict__, "train_tokens": spec.batch_size})
    sae0, _ = saes.train_sae(untrained, src, "blocks.0.hook_mlp_out")
    assert _recovery(sae, true) >= 0.9
    assert _recovery(sae0, true) < 0.6  # the check discriminates: one step of training does not pass
    m = saes.reconstruction_metrics(sae, x, np.arange(50_000, 60_000))
    assert m["fvu"] < 0.3 and m["cos_sim"] > 0.85  # L1 shrinkage costs the ReLU SAE some reconstruction


def test_tied_sae_has_no_encoder_parameter_and_saves_as_standard(tmp_path):
    x, _ = _synthetic(n=8_000)
    spec = saes.SAESpec(arch="tied", d_sae=64, l1=0.3, lr=3e-3, train_tokens=4_096, batch_size=256)
    from sae_lens.registry import get_sae_training_class

    cls, _ = get_sae_training_class("tied")
    t = cls(saes._training_cfg(spec, 48, "blocks.0.hook_mlp_out", "m"))
    assert "W_enc" not in dict(t.named_parameters()) and torch.equal(t.W_enc, t.W_dec.T)
    sae, _ = saes.train_sae(spec, saes.ActivationSource(x, np.arange(len(x)), 256, 0), "blocks.0.hook_mlp_out")
    assert torch.allclose(sae.W_enc, sae.W_dec.T)
    back = saes.load_sae(saes.save_sae(sae, tmp_path / "tied"), d_in=48, hook="blocks.0.hook_mlp_out")
    assert back.cfg.metadata.training_architecture == "tied"


def _effective_row_norms(sae) -> torch.Tensor:
    """‖decode(e_i) − decode(0)‖: feature i's unit contribution to the reconstruction, whatever the
    architecture's convention for decoder norms (TopK rescales activations by them)."""
    with torch.no_grad():
        eye = torch.eye(sae.cfg.d_sae)
        return (sae.decode(eye) - sae.decode(torch.zeros(1, sae.cfg.d_sae))).norm(dim=-1)


@pytest.mark.parametrize("scale", [0.05, 20.0], ids=["small-acts", "large-acts"])
@pytest.mark.parametrize("arch", ["topk", "relu", "tied", "mfr_topk"])
def test_saved_and_reloaded_sae_computes_what_was_trained(arch, scale, tmp_path, monkeypatch):
    """sae-lens trains on ``s·x`` and folds ``s`` into the weights when training ends; the saved and
    reloaded SAE must compute, on ``x``, the trained SAE's features and reconstruction (÷ s). The
    tied SAE's encoder is a view of its decoder, so sae-lens's fold (W_enc·s, W_dec/s) cancelled
    and left the encoder bias s× too strong against the input: on the small activations (s ≈ 35) the
    tied SAE's L0 was 4.0 as trained and 0 after saving and loading; on the large ones (s ≈ 0.09),
    4.0 and 7.4."""
    from sae_lens.saes.sae import SAE

    trained: list = []  # (the SAE just before the fold, s), one per SAE trained
    owners = {
        next(k for k in c.__mro__ if "fold_activation_norm_scaling_factor" in k.__dict__)
        for c in (saes.TiedTrainingSAE, saes.MFRTopKTrainingSAE, SAE)
    }
    for owner in owners:
        fold = owner.__dict__["fold_activation_norm_scaling_factor"]

        def snapshot(self, s, fold=fold):
            trained.append((copy.deepcopy(self).eval(), float(s)))
            return fold(self, s)

        monkeypatch.setattr(owner, "fold_activation_norm_scaling_factor", snapshot)
    x, _ = _synthetic(n=4_000, d=16, n_true=32)
    x *= scale  # the scaling factor s = √d / E‖x‖ far from 1 either way
    spec = saes.SAESpec(
        arch="topk" if arch == "mfr_topk" else arch,
        d_sae=32,
        k=2,
        l1=5.0,
        lr=3e-3,
        train_tokens=2_048,
        batch_size=256,
        mfr=1.0,
    )
    src = saes.ActivationSource(x, np.arange(len(x)), 256, seed=0)
    if arch == "mfr_topk":
        out, _ = saes.train_mfr(spec, src, "blocks.0.hook_mlp_out", n=2)
    else:
        out = [saes.train_sae(spec, src, "blocks.0.hook_mlp_out")[0]]
    assert len(trained) == len(out)
    xt = torch.from_numpy(x[:1_000])
    for i, ((pre, s), sae) in enumerate(zip(trained, out)):
        assert not 0.5 < s < 2, s
        back = saes.load_sae(saes.save_sae(sae, tmp_path / f"{arch}{i}"))
        with torch.no_grad():
            f_trained, f_back = pre.encode(xt * s), back.encode(xt)
            rec_trained, rec_back = pre.decode(f_trained) / s, back.decode(f_back)
        l0 = float((f_trained > 0).float().sum(1).mean())
        assert l0 > 0.5, l0  # the check has features to lose
        assert float((f_back > 0).float().sum(1).mean()) == pytest.approx(l0, rel=1e-3)
        # each feature's contribution to the reconstruction, in the input's units
        c_trained = f_trained * _effective_row_norms(pre) / s
        c_back = f_back * _effective_row_norms(back)
        scale = float(c_trained.abs().max())
        torch.testing.assert_close(c_back, c_trained, rtol=1e-5, atol=1e-5 * scale)
        torch.testing.assert_close(rec_back, rec_trained, rtol=1e-5, atol=1e-5 * float(rec_trained.abs().max()))


def test_mfr_aligns_dictionaries_more_than_independent_training():
    x, _ = _synthetic(n=30_000, n_true=96, active=4)
    spec = saes.SAESpec(arch="topk", d_sae=96, k=4, lr=3e-3, train_tokens=20_480, batch_size=256)
    src = saes.ActivationSource(x, np.arange(len(x)), 256, seed=0)
    a, _ = saes.train_sae(spec, src, "h")
    b, _ = saes.train_sae(
        saes.SAESpec(**{**spec.__dict__, "seed": 1}), saes.ActivationSource(x, np.arange(len(x)), 256, 1), "h"
    )
    members, _ = saes.train_mfr(saes.SAESpec(**{**spec.__dict__, "mfr": 30.0}), src, "h", n=2)
    ind = saes.mmcs(saes.decoder(a), saes.decoder(b))["hungarian"]
    mfr = saes.mmcs(saes.decoder(members[0]), saes.decoder(members[1]))["hungarian"]
    assert mfr > ind + 0.05, (mfr, ind)


def _fixed_sae(W_enc, b_enc, W_dec, b_dec, hook="blocks.0.hook_mlp_out"):
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig

    cfg = StandardSAEConfig(d_in=W_enc.shape[0], d_sae=W_enc.shape[1])
    cfg.metadata.hook_name = hook
    sae = StandardSAE(cfg)
    with torch.no_grad():
        for name, v in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
            getattr(sae, name).copy_(torch.as_tensor(v, dtype=torch.float32))
    return sae.eval()


def test_fvu_uses_per_dimension_variance_not_the_global_one():
    rng = np.random.default_rng(0)
    offset = np.linspace(-20, 20, 16)  # a large per-dimension mean
    x = (offset + rng.normal(size=(4_000, 16))).astype(np.float32)
    # an SAE whose features never fire: it outputs b_dec = the data mean, explaining nothing
    mean_only = _fixed_sae(np.eye(16), -1e6 * np.ones(16), np.eye(16), x.mean(0))
    m = saes.reconstruction_metrics(mean_only, x, np.arange(len(x)))
    assert m["fvu"] == pytest.approx(1.0, abs=0.01)
    global_fvu = ((x - x.mean(0)) ** 2).sum() / ((x - x.mean()) ** 2).sum()
    assert global_fvu < 0.05  # what the global-variance formula would have reported
    assert m["l0"] == 0 and m["dead_frac"] == 1.0
    # a perfect SAE on non-negative data: identity encoder/decoder
    pos = np.abs(x)
    ident = _fixed_sae(np.eye(16), np.zeros(16), np.eye(16), np.zeros(16))
    p = saes.reconstruction_metrics(ident, pos, np.arange(len(pos)))
    assert p["fvu"] < 1e-10 and p["mse"] < 1e-10 and p["cos_sim"] == pytest.approx(1.0)
    assert p["l2_ratio"] == pytest.approx(1.0) and p["l0"] == pytest.approx((pos > 0).sum(1).mean())


def test_mmcs_hungarian_and_max():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(32, 24))
    assert saes.mmcs(a, a[rng.permutation(32)])["hungarian"] == pytest.approx(1.0)
    bigger = np.concatenate([a, rng.normal(size=(32, 24))])
    assert saes.mmcs(a, bigger)["hungarian"] == pytest.approx(1.0)  # the 1x dictionary inside the 2x one
    dup = np.concatenate([a[:1]] * 32)  # every row the same direction: max says 1, a matching cannot
    m = saes.mmcs(dup, a)
    assert m["max"] == pytest.approx(1.0) and m["hungarian"] < 0.5
    assert saes.mmcs(a, rng.normal(size=(32, 24)))["hungarian"] < 0.6
    with pytest.raises(saes.SAEMismatchError, match="d_in"):
        saes.mmcs(a, rng.normal(size=(32, 8)))


@pytest.fixture(scope="module")
def demo():
    return load_model("demo")


def test_spliced_sae_with_error_term_reproduces_clean_logits(demo):
    hooked = demo.hooked()
    d = hooked.cfg.d_model
    rng = np.random.default_rng(0)
    sae = _fixed_sae(
        rng.normal(size=(d, 2 * d)) / 10,
        np.zeros(2 * d),
        rng.normal(size=(2 * d, d)) / 10,
        np.zeros(d),
        hook="blocks.2.hook_mlp_out",
    )
    toks = torch.tensor([[0] + list(range(5, 40))])
    with torch.no_grad():
        clean = hooked(toks)
        exact = hooked.run_with_saes(toks, saes=[sae], use_error_term=True)
        lossy = hooked.run_with_saes(toks, saes=[sae], use_error_term=False)
    assert torch.allclose(clean, exact, atol=1e-4)
    assert not torch.allclose(clean, lossy, atol=1e-2)  # the SAE does change the output without it


def test_loss_recovered_with_a_shared_baseline_equals_the_full_measurement(demo):
    """The SAE stage measures the clean and zero-ablated losses once per model and layer; the
    figures must equal measuring all three every time, and a baseline of other text is refused."""
    hooked = demo.hooked()
    d = hooked.cfg.d_model
    rng = np.random.default_rng(1)
    sae = _fixed_sae(
        rng.normal(size=(d, 2 * d)) / 10,
        np.zeros(2 * d),
        rng.normal(size=(2 * d, d)) / 10,
        np.zeros(d),
        hook="blocks.2.hook_mlp_out",
    )
    text = demo.tokenizer(
        "This film was a wonderful surprise: the acting is great and the plot never drags, "
        "although the ending felt rushed and a little silly."
    )["input_ids"]
    seqs = [[0] + text[i : i + 20] for i in range(5)] + [[0] + text[:11]] * 3 + [[0]]
    full = saes.ce_metrics(hooked, sae, 2, seqs, batch_size=2)
    base = saes.ce_baselines(hooked, 2, seqs, batch_size=4)
    shared = saes.ce_metrics(hooked, sae, 2, seqs, batch_size=2, baseline=base)
    assert full["ce_tokens"] == shared["ce_tokens"] == 5 * 20 + 3 * 11  # the 1-token sequence has no target
    for k in ("ce_clean", "ce_zero", "ce_spliced", "ce_loss_recovered"):
        assert shared[k] == pytest.approx(full[k], rel=1e-5), k
    assert full["ce_zero"] > full["ce_clean"]
    with pytest.raises(ValueError, match="baseline was measured on"):
        saes.ce_metrics(hooked, sae, 2, seqs[:3], baseline=base)


def test_harvest_masks_bos_and_keeps_doc_position_token(demo, tmp_path):
    hooked = demo.hooked()
    docs = [
        activations.Doc(0, "imdb", "train", [15, 16, 17, 18]),
        activations.Doc(1, "imdb", "eval", [20, 0, 21]),
        activations.Doc(2, "base_completion", "train", [30, 31, 32, 33]),
    ]
    idx = activations.write_index(tmp_path, docs, special={0})
    activations.harvest_role(hooked, docs, [1, 3], tmp_path, "base", bos=[0], special={0}, batch_size=2)
    h = activations.Harvest(tmp_path)
    assert len(idx["doc_id"]) == 4 + 2 + 4  # no BOS rows; the special token inside doc 1 is masked
    assert 0 not in set(idx["token_id"])
    acts = h.acts("base", 3)
    for d in docs:
        _, cache = hooked.run_with_cache(torch.tensor([[0] + d.token_ids]))
        want = cache["blocks.3.hook_mlp_out"][0, 1:].numpy()
        rows = np.nonzero(idx["doc_id"] == d.doc_id)[0]
        got = np.asarray(acts[rows], dtype=np.float32)
        np.testing.assert_allclose(got, want[idx["pos"][rows]], atol=2e-2, rtol=1e-2)
        assert list(idx["token_id"][rows]) == [d.token_ids[p] for p in idx["pos"][rows]]
        assert bool(idx["is_eval"][rows].all()) == (d.split == "eval")


def test_layer_out_of_range_is_named(demo, tmp_path):
    docs = [activations.Doc(0, "imdb", "train", [5, 6, 7])]
    with pytest.raises(activations.LayerRangeError, match="layer 7 is out of range: the model has 4 layers"):
        activations.harvest_role(demo.hooked(), docs, [2, 7], tmp_path, "base", [0], {0})


def test_nan_activations_name_the_layer_and_batch():
    x = np.ones((2_000, 8), dtype=np.float32)
    x[700] = np.nan
    src = saes.ActivationSource(x, np.arange(2_000), 256, seed=0, layer=3)
    with pytest.raises(activations.NonFiniteActivationError, match=r"layer 3, batch \d+"):
        saes.train_sae(saes.SAESpec(d_sae=16, k=2, train_tokens=1_792, batch_size=256), src, "blocks.3.hook_mlp_out")


def test_corpus_too_small_says_how_many_tokens_there_are():
    x = np.ones((5_000, 8), dtype=np.float32)
    src = saes.ActivationSource(x, np.arange(4_000), 256, seed=0, layer=2)
    with pytest.raises(saes.CorpusTooSmallError, match="only 4,000 training tokens at layer 2"):
        saes.train_sae(saes.SAESpec(d_sae=16, k=2, train_tokens=10_000), src, "blocks.2.hook_mlp_out")


def test_loading_an_sae_from_another_model_or_hook_is_refused(tmp_path):
    sae = _fixed_sae(np.eye(16), np.zeros(16), np.eye(16), np.zeros(16), hook="blocks.2.hook_mlp_out")
    path = saes.save_sae(sae, tmp_path / "s")
    assert saes.load_sae(path, d_in=16, hook="blocks.2.hook_mlp_out").cfg.d_sae == 16
    with pytest.raises(saes.SAEMismatchError, match="d_in=16 .* width 256: it was trained on another model"):
        saes.load_sae(path, d_in=256, hook="blocks.2.hook_mlp_out")
    with pytest.raises(saes.SAEMismatchError, match="trained on blocks.2.hook_mlp_out, not blocks.3.hook_mlp_out"):
        saes.load_sae(path, d_in=16, hook="blocks.3.hook_mlp_out")
    with pytest.raises(FileNotFoundError, match="no SAE at"):
        saes.load_sae(tmp_path / "nothing")
