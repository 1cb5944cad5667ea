"""Typed settings: every stage is hashed on exactly the settings it is handed.

For every field of every settings group, changing it must change the hash of exactly the stages
whose settings hold that group and of the stages downstream of them, and of no other stage. The
stage functions must take the settings class their registry entry declares (they cannot read
anything else: there is no ``ctx.cfg`` any more).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import subprocess
import sys
import typing

import pytest

from lfp_core import settings as st
from lfp_core.config import DEMO_MODEL_DIR, REPO_ROOT
from lfp_core.errors import ConfigError
from lfp_core.settings import RunConfig, preset_config
from lfp_core.stages import STAGES, stages_for


def _changed(group: str, name: str, value):
    """A valid value different from ``value`` for the field ``group.name``."""
    hint = st._FIELD_HINTS[group][name]
    if (group, name) == ("run", "model"):
        return str(DEMO_MODEL_DIR)  # the same weights under another name: still a different setting
    if (group, name) == ("run", "device"):
        return "cuda"
    if (group, name) == ("run", "data_dir"):
        return "/nonexistent/data"
    if (group, name) == ("labels", "llm_base_url"):
        return "http://127.0.0.1:9/v1"
    if (group, name) == ("rm", "layers"):
        return (1,)
    if (group, name) == ("reward", "spec"):
        return "python:json:dumps"  # parses (not loaded: hashing reads the module's source file only)
    if (group, name) == ("tuned", "path"):
        return str(DEMO_MODEL_DIR)  # a model directory: its files go into the rlhf stage's hash
    if (group, name) == ("diffing", "null_path"):
        return str(DEMO_MODEL_DIR)  # a model directory: its files go into the null stage's hash
    if (group, name) == ("diffing", "layers"):
        return (2,)
    if (group, name) == ("diffing", "tuned_only"):
        return 0.8  # the cut-off must stay in (0.5, 1)
    if name == "source":  # prompts.source, corpus.source: an existing file (the hash reads its bytes)
        return str(DEMO_MODEL_DIR / "train_log.jsonl")
    if group == "sae_source" and name in ("base", "tuned"):
        return "/nonexistent/saes"  # hashed by name (its fingerprint says it cannot be read)
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return next(c for c in typing.get_args(hint) if c != value)
    if origin is tuple:
        return tuple(value[:-1]) if len(value) > 1 else ()
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 if value < 0.5 else value / 2
    if isinstance(value, str):
        return value + "-other"
    raise AssertionError(f"no alternative value for {group}.{name} ({hint})")


def _downstream(task: str, roots: set[str]) -> set[str]:
    out = set(roots)
    for s in stages_for(task):
        if any(a in out for a in s.after):
            out.add(s.name)
    return out


def _all_fields():
    for group, cls in st.GROUPS.items():
        for f in dataclasses.fields(cls):
            yield group, f.name


@pytest.mark.parametrize("task", ["vader", "hh"])
def test_every_field_recomputes_exactly_the_stages_that_hold_it(task):
    from lfp_core.precompute import stage_hashes

    cfg = preset_config("quick", task=task)
    before = stage_hashes(cfg)
    checked = 0
    for group, name in _all_fields():
        value = getattr(getattr(cfg, group), name)
        changed = cfg.with_values({f"{group}.{name}": _changed(group, name, value)})
        after = stage_hashes(changed)
        if (group, name) == ("run", "task"):  # another task: another stage list, every shared name recomputed
            assert all(before[k] != after[k] for k in set(before) & set(after))
            checked += 1
            continue
        holders = {s.name for s in stages_for(task) if group in s.groups}
        expected = _downstream(task, holders)
        moved = {k for k in before if before[k] != after[k]}
        assert moved == expected, f"{group}.{name}: recomputes {sorted(moved)}, expected {sorted(expected)}"
        for s in stages_for(task):
            if group in s.groups:
                assert before[s.name] != after[s.name], f"{s.name} holds {group} but ignores {name}"
        checked += 1
    assert checked == sum(len(dataclasses.fields(c)) for c in st.GROUPS.values())


def test_the_preference_models_saes_recompute_with_the_sae_architecture():
    """The drift the typed settings were built to end: --set sae_arch=relu retrained the policy's
    SAEs and kept the preference model's old ones."""
    from lfp_core.precompute import stage_hashes

    cfg = preset_config("quick")
    a, b = stage_hashes(cfg), stage_hashes(cfg.with_values({"sae_arch": "relu"}))
    assert a["reward_model"] != b["reward_model"] and a["saes"] != b["saes"]
    assert a["activations"] == b["activations"] and a["rlhf"] == b["rlhf"]


def test_unrelated_fields_leave_a_stage_alone():
    from lfp_core.precompute import stage_hashes

    cfg = preset_config("quick")
    a = stage_hashes(cfg)
    b = stage_hashes(cfg.with_values({"atp.top_k": 11, "labels.random": 3, "preset": "other"}))
    assert {k for k in a if a[k] != b[k]} == {"labels", "ablation", "attribution"}


@pytest.mark.parametrize("spec", STAGES, ids=lambda s: f"{s.name}-{'/'.join(s.tasks)}")
def test_stage_functions_take_the_settings_their_registry_entry_declares(spec):
    fn = spec.load()
    params = list(inspect.signature(fn).parameters)
    assert params == ["ctx", "s", "config_hash"], f"{spec.run} takes {params}"
    hints = typing.get_type_hints(fn)
    assert hints["s"] is spec.settings, f"{spec.run} is annotated {hints['s']} but registered with {spec.settings}"
    src = inspect.getsource(inspect.getmodule(fn))
    assert "ctx.cfg" not in src and "cfg.seed" not in src


def test_every_group_is_read_by_some_stage():
    used = {g for s in STAGES for g in s.groups}
    assert used == set(st.GROUPS), f"groups no stage reads: {set(st.GROUPS) - used}"


def test_the_registry_imports_without_torch():
    code = (
        "import sys, lfp_core.stages, lfp_core.settings, lfp_core.report; "
        "bad = [m for m in ('torch', 'transformer_lens', 'sae_lens', 'trl') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_config_round_trips_and_reads_the_old_flat_layout():
    cfg = preset_config("demo", rl_steps=7, sae_variants="relu-2x", rm_layers="1,3")
    assert RunConfig.from_json(cfg.to_json()) == cfg
    assert json.loads(cfg.to_json())["layout"] == st.LAYOUT
    old = {
        "model": "demo",
        "task": "vader",
        "rl_steps": 30,
        "sae_variants": "relu-1x,tied-1x",
        "sae_sweep_l1": "0.5,2",
        "rm_layers": "auto",
        "extra": {},
        "preset": "quick",
        "n_prompts": 64,
    }
    up = RunConfig.from_dict(old)
    assert RunConfig.layout_of(old) == 1
    assert up.rl.steps == 30 and up.prompts.n_train == 64 and up.preset == "quick"
    assert up.sae_suite.variants == (st.SAEVariant("relu", 1), st.SAEVariant("tied", 1))
    assert up.sae_suite.sweep_l1 == (0.5, 2.0)


@pytest.mark.parametrize(
    "item, words",
    [
        ("rl_stepz=3", ["unknown setting 'rl_stepz'", "rl_steps"]),
        ("rl.lr=-1e-4", ["rl.lr", "must be > 0"]),
        ("rl_beta=-0.1", ["rl.beta", ">= 0"]),
        ("sae_arch=gated", ["sae.arch", "topk, relu, tied", "'gated'"]),
        ("n_prompts=many", ["prompts.n_train", "int", "'many'"]),
        ("sae_sweep_l1=0.5,x", ["sae_suite.sweep_l1", "float"]),
        ("sae_variants=relu-two", ["ARCH-Nx"]),
        ("rm_layers=middle", ["rm.layers", "auto"]),
        ("dpo.max_prompt_length=300", ["dpo.max_prompt_length", "dpo.max_length"]),
        ("ablation_random=2", [">= 20", "1/(N+1)", "p < 0.05"]),
        ("noequals", ["FIELD=VALUE"]),
    ],
)
def test_bad_set_values_name_the_field_and_what_it_expects(item, words):
    from lfp_core.precompute import parse_overrides

    with pytest.raises(ConfigError) as exc:
        preset_config("quick", **parse_overrides([item]))
    for w in words:
        assert w in str(exc.value), f"{w!r} not in {exc.value}"


def test_bad_set_exits_2_before_anything_is_computed(tmp_path):
    from lfp_core.precompute import main

    out = tmp_path / "run"
    assert main(["--preset", "quick", "--out", str(out), "--set", "sae_arch=gated"]) == 2
    assert not out.exists()


def test_dotted_and_flat_names_are_the_same_setting():
    from lfp_core.precompute import parse_overrides

    a = preset_config("quick", **parse_overrides(["rl.steps=12", "sae.arch=relu"]))
    b = preset_config("quick", **parse_overrides(["rl_steps=12", "sae_arch=relu"]))
    assert a == b and a.rl.steps == 12 and a.sae.arch == "relu"


def test_an_old_layout_run_is_refused_with_the_command_that_rebuilds_it(tmp_path):
    from lfp_core.precompute import main
    from lfp_core.store import RunWriter

    run = tmp_path / "old"
    w = RunWriter(run)
    w.set_config("quick", json.dumps({"model": "demo", "task": "vader", "rl_steps": 60, "preset": "quick"}))
    w.mark_stage("model", 0, "0123456789abcdef", "done", 1.0)
    before = (run / "run.duckdb").read_bytes()
    assert main(["--preset", "quick", "--out", str(run), "--until", "model"]) == 2
    assert (run / "run.duckdb").read_bytes() == before


def test_the_command_line_keeps_the_presets_values_for_flags_it_was_not_given():
    """A flag left unset must not reset the preset's value to the default (it did: the quick preset ran
    256 prompts instead of 64 while the refactor was being checked)."""
    from lfp_core.precompute import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(["--preset", "quick", "--out", "x"]))
    assert cfg == preset_config("quick", data_dir=cfg.run.data_dir)
    assert cfg.prompts.n_train == 64 and cfg.generation.batch_size == 32 and cfg.labels.probe_top == 8
    cfg = config_from_args(
        build_parser().parse_args(["--preset", "quick", "--out", "x", "--n-prompts", "9", "--set", "rl.steps=3"])
    )
    assert cfg.prompts.n_train == 9 and cfg.rl.steps == 3 and cfg.prompts.n_eval == 64
