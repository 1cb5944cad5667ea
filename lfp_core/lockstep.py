"""Lockstep sampling: a tuned policy whose component outputs are edited with the base model's
activations on the same tokens, and sampling under a steering vector — both coupled to
:func:`lfp_core.ablation.sample` by the same per-row seeds.

At every forward step (the prompt pass, then one token at a time) the base model runs first on the
edited rows' tokens with its own KV cache, keeping the activations the edits need; then the tuned
model runs on every row with its own KV cache and hooks that replace, on the edited rows only, each
named activation ``tuned_act`` by ``edit[name](base_act, tuned_act)``. Tokens are drawn from the
tuned model's (edited) logits by :func:`lfp_core.ablation.sample` itself (the lockstep pair is handed
to it as one model), so the uniforms, the inverse-CDF draw and the end-of-text cut are the ablation
stage's: with every edit ``None`` the tokens equal ``ablation.sample(tuned, ...)`` exactly, and a row
draws the same tokens whichever batch it is in.

Written by hand: transformer-lens and sae-lens hook one model at a time (activation patching in
transformer-lens patches a run from a cache of a *finished* run on fixed tokens); no maintained
library runs two models in lockstep while sampling, with one model's live activations written into
the other's forward pass at every generated position.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from lfp_core import ablation
from lfp_core.errors import BadInputError

EditFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(base_act, tuned_act) -> the tuned model's new activation (same shape), for the edited rows."""
Edit = Mapping[str, EditFn]
"""Hook names of the tuned model (``blocks.2.hook_mlp_out`` ...) -> how to edit each."""

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_EMBED = ("hook_embed", "hook_pos_embed")


def take_base(base_act: torch.Tensor, tuned_act: torch.Tensor) -> torch.Tensor:
    """Component patching: the base model's activation replaces the tuned model's."""
    return base_act


def identity(base_act: torch.Tensor, tuned_act: torch.Tensor) -> torch.Tensor:
    """No change (the tuned activation kept): a control edit that must reproduce the clean policy."""
    return tuned_act


def patch(component_hooks: Sequence[str]) -> dict[str, EditFn]:
    """The edit that replaces each of ``component_hooks`` (e.g. ``blocks.1.hook_attn_out``) in the
    tuned model by the base model's output at the same hook on the same tokens."""
    return {str(h): take_base for h in component_hooks}


def component_hooks(model) -> list[str]:
    """Every layer's attention and MLP output hook (``blocks.L.hook_attn_out``, ``blocks.L.hook_mlp_out``)."""
    return [f"blocks.{layer}.hook_{part}_out" for layer in range(model.cfg.n_layers) for part in ("attn", "mlp")]


def check_own_modules(model, what: str = "the model") -> None:
    """Refuse a model whose modules run another model's: sae-lens's HookedSAETransformer replaces each
    MLP's ``forward`` by a closure over the MLP, and ``copy.deepcopy`` keeps that closure, so a deep
    copy's MLPs still compute with the original's weights (and fire its hooks)."""
    for mod in model.modules():
        fwd = mod.__dict__.get("forward")
        cells = getattr(fwd, "__closure__", None) or ()
        if any(isinstance(c.cell_contents, torch.nn.Module) and c.cell_contents is not mod for c in cells):
            raise BadInputError(
                f"{what} is a copy.deepcopy of a HookedSAETransformer, whose MLPs still run the original's "
                "weights; build each model with lfp_core.models.load_model(...).hooked() or to_hooked"
            )


def _check_pair(base, tuned, names: set[str]) -> int:
    """Refuse mismatched models and unusable hook names; return the base pass's stop layer."""
    if base is tuned:
        raise BadInputError("base and tuned are the same model object; pass a separate copy of the base model")
    check_own_modules(base, "the base model")
    check_own_modules(tuned, "the tuned model")
    for field in ("d_model", "n_layers", "d_vocab"):
        a, b = getattr(base.cfg, field), getattr(tuned.cfg, field)
        if a != b:
            raise BadInputError(f"base and tuned models differ in {field} ({a} vs {b}); lockstep needs one shape")
    stop = 1
    for name in sorted(names):
        if name not in tuned.hook_dict or name not in base.hook_dict:
            raise BadInputError(f"hook {name!r} is not a hook of both models (e.g. blocks.0.hook_mlp_out)")
        m = _BLOCK.match(name)
        if m is None and name not in _EMBED:
            raise BadInputError(f"hook {name!r} is outside the blocks; edits take blocks.L.* or {', '.join(_EMBED)}")
        stop = max(stop, int(m.group(1)) + 1 if m else 1)
    return stop


class _Lockstep:
    """The base and tuned models seen as one model by :func:`ablation.sample` (it reads ``cfg``,
    ``tokenizer``, ``ln_final`` and ``unembed``, all the tuned model's, and calls the model with the
    tuned model's KV cache); the base model's KV cache lives here."""

    def __init__(self, base, tuned, edits: Sequence[Edit | None]):
        self.base, self.tuned = base, tuned
        self.rows = [i for i, e in enumerate(edits) if e is not None]  # rows the base model runs on
        names = {n for e in edits if e is not None for n in e}
        self.stop = _check_pair(base, tuned, names)
        # per hook: groups of rows sharing one function (one call per group), rows as indices into
        # the full batch and into the base sub-batch
        self.plan: dict[str, list[tuple[EditFn, torch.Tensor, torch.Tensor]]] = {}
        for name in sorted(names):
            groups: dict[int, tuple[EditFn, list[int], list[int]]] = {}
            for j, i in enumerate(self.rows):
                fn = edits[i].get(name)  # type: ignore[union-attr]
                if fn is not None:
                    group = groups.setdefault(id(fn), (fn, [], []))
                    group[1].append(i)
                    group[2].append(j)
            self.plan[name] = [(fn, torch.tensor(a), torch.tensor(b)) for fn, a, b in groups.values()]
        self.acts: dict[str, torch.Tensor] = {}
        self.base_cache: Any = None

    def __getattr__(self, name: str):  # cfg, tokenizer, ln_final, unembed: the tuned model's
        if name in ("base", "tuned"):
            raise AttributeError(name)
        return getattr(self.tuned, name)

    def _keep(self, act: torch.Tensor, hook) -> None:
        self.acts[hook.name] = act.detach().clone()

    def _edit(self, act: torch.Tensor, hook) -> torch.Tensor:
        base_act = self.acts[hook.name]
        if base_act.shape[1:] != act.shape[1:]:
            raise RuntimeError(f"{hook.name}: base activation {tuple(base_act.shape)} vs tuned {tuple(act.shape)}")
        for fn, rows, sub in self.plan[hook.name]:
            rows, sub = rows.to(act.device), sub.to(act.device)
            new = fn(base_act[sub], act[rows])
            if new.shape != act[rows].shape:
                raise BadInputError(
                    f"the edit of {hook.name} returned shape {tuple(new.shape)}, not {tuple(act[rows].shape)}"
                )
            act[rows] = new.to(act.dtype)
        return act

    @contextlib.contextmanager
    def hooked(self) -> Iterator[_Lockstep]:
        keep = [(n, self._keep) for n in self.plan]
        edit = [(n, self._edit) for n in self.plan]
        with self.base.hooks(fwd_hooks=keep), self.tuned.hooks(fwd_hooks=edit):
            yield self

    def __call__(self, tokens: torch.Tensor, past_kv_cache=None, stop_at_layer: int | None = None):
        self.acts.clear()
        if self.rows and self.plan:
            sub = tokens[torch.tensor(self.rows, device=tokens.device)]
            if past_kv_cache is not None and self.base_cache is None:  # the prompt pass starts the cache
                from transformer_lens import TransformerLensKeyValueCache

                self.base_cache = TransformerLensKeyValueCache.init_cache(
                    self.base.cfg, self.base.cfg.device, len(self.rows)
                )
            cache = self.base_cache if past_kv_cache is not None else None
            self.base(sub, past_kv_cache=cache, stop_at_layer=self.stop)
        return self.tuned(tokens, past_kv_cache=past_kv_cache, stop_at_layer=stop_at_layer)


def _check_rows(prompts: torch.Tensor, per_row: Sequence[Any], what: str) -> None:
    if prompts.ndim != 2:
        raise BadInputError(f"prompts must be [rows, positions] token ids, got shape {tuple(prompts.shape)}")
    if len(per_row) != prompts.shape[0]:
        raise BadInputError(f"{len(per_row)} {what} for {prompts.shape[0]} prompt rows; give one per row")


@torch.no_grad()
def sample_lockstep(
    base,
    tuned,
    prompts: torch.Tensor,
    max_new_tokens: int,
    seeds: Sequence[int],
    edits: Sequence[Edit | None],
) -> list[list[int]]:
    """Sample the tuned policy with, on each row, its edit applied at every position.

    Args:
        base: the base HookedTransformer (a separate object from ``tuned``, same shape).
        tuned: the tuned HookedTransformer; tokens are drawn from its (edited) logits.
        prompts: [rows, pos] token ids, BOS included, equal lengths.
        max_new_tokens: tokens drawn per row (cut at the first end-of-text token).
        seeds: one per row: the uniforms :func:`ablation.sample` draws from per-row seeds.
        edits: one per row: ``None`` (the clean tuned policy) or an :data:`Edit` {hook name: fn}; on
            that row, at every prompt and generated position, the tuned activation at each hook is
            replaced by ``fn(base_act, tuned_act)``, the base model's activation on the same tokens.

    Returns:
        The new token ids of each row.
    """
    _check_rows(prompts, seeds, "seeds")
    _check_rows(prompts, edits, "edits")
    pair = _Lockstep(base, tuned, edits)
    with pair.hooked():
        return ablation.sample(pair, prompts, max_new_tokens, [int(s) for s in seeds])


@torch.no_grad()
def lockstep_logits(base, tuned, tokens: torch.Tensor, edits: Sequence[Edit | None]) -> torch.Tensor:
    """The tuned model's logits [rows, pos, d_vocab] on fixed ``tokens`` with each row's edit applied
    (one whole-sequence pass of each model, no cache): the teacher-forced view of :func:`sample_lockstep`."""
    _check_rows(tokens, edits, "edits")
    pair = _Lockstep(base, tuned, edits)
    with pair.hooked():
        return pair(tokens)


def _steer_hook(vecs: torch.Tensor, rows: torch.Tensor):
    def hook(act: torch.Tensor, hook) -> torch.Tensor:
        if act.shape[-1] != vecs.shape[-1]:
            raise BadInputError(
                f"steering vectors of width {vecs.shape[-1]} at {hook.name}, whose width is {act.shape[-1]}"
            )
        r = rows.to(act.device)
        act[r] = act[r] + vecs.to(act)[:, None, :]  # every position of the steered rows
        return act

    return hook


@torch.no_grad()
def sample_steered(
    model,
    prompts: torch.Tensor,
    max_new_tokens: int,
    seeds: Sequence[int],
    hook: str,
    vectors: torch.Tensor | Sequence[torch.Tensor | None],
) -> list[list[int]]:
    """Sample ``model`` with a vector added at ``hook`` (e.g. ``blocks.2.hook_resid_post``) at every
    prompt and generated position, rows coupled to :func:`ablation.sample` by the same per-row seeds.

    Args:
        model: a HookedTransformer (e.g. the base model, steered by a difference vector or a
            crosscoder decoder direction).
        prompts: [rows, pos] token ids, BOS included, equal lengths.
        max_new_tokens: tokens drawn per row.
        seeds: one per row.
        hook: the hook the vectors are added at.
        vectors: [rows, d_model], or one per row with ``None`` for a row left unsteered (exactly the
            plain sample's tokens).

    Returns:
        The new token ids of each row.
    """
    _check_rows(prompts, seeds, "seeds")
    _check_rows(prompts, list(vectors), "steering vectors")
    if hook not in model.hook_dict:
        raise BadInputError(f"hook {hook!r} is not a hook of the model (e.g. blocks.0.hook_resid_post)")
    rows = [i for i, v in enumerate(vectors) if v is not None]
    fwd = []
    if rows:
        vecs = torch.stack([torch.as_tensor(vectors[i], dtype=torch.float32).reshape(-1) for i in rows])
        fwd = [(hook, _steer_hook(vecs, torch.tensor(rows)))]
    with model.hooks(fwd_hooks=fwd):
        return ablation.sample(model, prompts, max_new_tokens, [int(s) for s in seeds])
