"""Lockstep sampling (lfp_core.lockstep): no edit is the clean tuned policy token for token; patching the
one component fine-tuning changed gives back the base model exactly; rows do not depend on their batch;
a zero steering vector changes nothing."""

from __future__ import annotations

import copy

import pytest
import torch

from lfp_core import ablation
from lfp_core.errors import BadInputError
from lfp_core.lockstep import component_hooks, identity, lockstep_logits, patch, sample_lockstep, sample_steered
from lfp_core.models import load_model, to_hooked

N_NEW = 8
LAYER = 2


@pytest.fixture(scope="module")
def pair():
    """The demo model and a copy with only block LAYER's MLP output weights changed."""
    lm = load_model("demo")
    base, tuned = (to_hooked(lm.hf, lm.tokenizer, lm.spec) for _ in range(2))  # not deepcopy: see below
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        w = tuned.blocks[LAYER].mlp.W_out
        w += 0.5 * w.std() * torch.randn(w.shape, generator=g)
    prompts = torch.randint(1, 4000, (4, 6), generator=g)
    prompts[:, 0] = base.tokenizer.bos_token_id
    return base, tuned, prompts, [11, 12, 13, 14]


def test_no_edit_is_the_clean_tuned_sample(pair):
    base, tuned, prompts, seeds = pair
    clean = ablation.sample(tuned, prompts, N_NEW, seeds)
    assert sample_lockstep(base, tuned, prompts, N_NEW, seeds, [None] * 4) == clean
    # an identity edit runs the base model in lockstep and writes the tuned activation back: unchanged
    ident = {h: identity for h in component_hooks(tuned)}
    mixed = sample_lockstep(base, tuned, prompts, N_NEW, seeds, [None, ident, None, ident])
    assert mixed == clean
    assert sum(len(r) for r in clean) > 0


def test_patching_the_changed_component_gives_the_base_model(pair):
    base, tuned, prompts, seeds = pair
    want = ablation.sample(base, prompts, N_NEW, seeds)
    assert ablation.sample(tuned, prompts, N_NEW, seeds) != want  # the change is visible in the samples
    edit = patch([f"blocks.{LAYER}.hook_mlp_out"])
    got = sample_lockstep(base, tuned, prompts, N_NEW, seeds, [edit] * 4)
    assert got == want
    # the other components patched as well: still the base (they were never changed)
    every = patch(component_hooks(tuned))
    assert sample_lockstep(base, tuned, prompts, N_NEW, seeds, [every, edit, every, edit]) == want
    # teacher-forced on the base's own samples: the logits match the base's
    full = torch.cat([prompts, torch.tensor([r[:4] + [1] * (4 - len(r[:4])) for r in want])], 1)
    with torch.no_grad():
        ref = base(full)
        assert (tuned(full) - ref).abs().max() > 1e-2
    assert torch.allclose(lockstep_logits(base, tuned, full, [edit] * 4), ref, atol=1e-5)
    # patching an unchanged component (attention) leaves the tuned policy as it is
    attn = patch([f"blocks.{LAYER}.hook_attn_out"])
    assert sample_lockstep(base, tuned, prompts, N_NEW, seeds, [attn] * 4) == ablation.sample(
        tuned, prompts, N_NEW, seeds
    )


def test_a_row_does_not_depend_on_its_batch(pair):
    base, tuned, prompts, seeds = pair
    edit = patch([f"blocks.{LAYER}.hook_mlp_out"])
    edits = [edit, None, edit, None]
    together = sample_lockstep(base, tuned, prompts, N_NEW, seeds, edits)
    for i in range(4):
        alone = sample_lockstep(base, tuned, prompts[i : i + 1], N_NEW, seeds[i : i + 1], edits[i : i + 1])
        assert alone == together[i : i + 1]
    # a row under another edit, or with its order in the batch reversed, keeps its tokens
    rev = sample_lockstep(base, tuned, prompts.flip(0), N_NEW, seeds[::-1], edits[::-1])
    assert rev == together[::-1]


def test_zero_steering_changes_nothing_and_a_vector_steers(pair):
    base, _, prompts, seeds = pair
    plain = ablation.sample(base, prompts, N_NEW, seeds)
    hook = "blocks.3.hook_resid_post"
    assert sample_steered(base, prompts, N_NEW, seeds, hook, torch.zeros(4, 256)) == plain
    assert sample_steered(base, prompts, N_NEW, seeds, hook, [None] * 4) == plain
    # a large vector towards one token's unembedding makes the steered rows say it; unsteered rows keep theirs
    t = 1234
    v = 50.0 * base.W_U[:, t] / base.W_U[:, t].norm()
    got = sample_steered(base, prompts, N_NEW, seeds, hook, [v, None, v, None])
    assert got[1] == plain[1] and got[3] == plain[3]
    assert got[0].count(t) > N_NEW // 2 and got[2].count(t) > N_NEW // 2


def test_bad_input_is_refused(pair):
    base, tuned, prompts, seeds = pair
    with pytest.raises(BadInputError, match="same model object"):
        sample_lockstep(base, base, prompts, N_NEW, seeds, [patch(["blocks.0.hook_mlp_out"])] * 4)
    with pytest.raises(BadInputError, match="not a hook of both"):
        sample_lockstep(base, tuned, prompts, N_NEW, seeds, [patch(["blocks.9.hook_mlp_out"])] * 4)
    with pytest.raises(BadInputError, match="outside the blocks"):
        sample_lockstep(base, tuned, prompts, N_NEW, seeds, [patch(["ln_final.hook_normalized"])] * 4)
    with pytest.raises(BadInputError, match="3 edits for 4"):
        sample_lockstep(base, tuned, prompts, N_NEW, seeds, [None] * 3)


def test_a_deep_copied_model_is_refused(pair):
    """sae-lens patches each MLP's forward with a closure over the MLP, which copy.deepcopy keeps: the copy
    would silently compute with the original's MLP weights."""
    base, tuned, prompts, seeds = pair
    clone = copy.deepcopy(base)
    with torch.no_grad():
        clone.blocks[0].mlp.W_out.mul_(0.0)
        assert torch.equal(clone(prompts), base(prompts))  # the trap itself
    with pytest.raises(BadInputError, match="deepcopy"):
        sample_lockstep(base, clone, prompts, N_NEW, seeds, [None] * 4)
