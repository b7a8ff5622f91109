"""The spec: defaults, overrides, and errors that name the key path and suggest the right key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.dag import DAGError, build_dag
from pipeline.spec import SpecError, apply_override, load_spec, parse_spec

REPO = Path(__file__).resolve().parents[2]


def spec_with(stage: dict, **top) -> dict:
    return {"name": "t", "stages": {"sft": {"data": "builtin:addition", **stage}}, **top}


def test_every_shipped_config_validates():
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert configs, "configs/ has no pipeline files"
    for path in configs:
        spec = load_spec(path)
        build_dag(spec)


def test_defaults_and_data_shorthand():
    spec = parse_spec(spec_with({}))
    sft = spec.stages["sft"]
    assert sft.kind == "sft" and sft.from_ == "base"
    assert sft.data.path == "builtin:addition" and sft.data.format is None
    assert sft.train.epochs == 1.0 and sft.train.max_steps is None
    assert spec.ray.address is None and spec.tracking.backend == "tensorboard"


def test_unknown_key_suggests_the_valid_one():
    with pytest.raises(SpecError, match=r"stages\.sft\.train\.lerning_rate: unknown key; did you mean lr\?"):
        parse_spec(spec_with({"train": {"lerning_rate": 1e-4}}))
    with pytest.raises(SpecError, match=r"stages\.sft\.deepspeed\.zero_stag: unknown key; did you mean zero_stage\?"):
        parse_spec(spec_with({"deepspeed": {"zero_stag": 2}}))
    with pytest.raises(SpecError, match=r"strage: unknown key; did you mean storage\?"):
        parse_spec({"name": "t", "strage": "x"})


def test_wrong_type_names_the_path():
    with pytest.raises(SpecError, match=r"stages\.sft\.train\.lr: .*number.*'fast'"):
        parse_spec(spec_with({"train": {"lr": "fast"}}))
    with pytest.raises(SpecError, match=r"stages\.sft\.deepspeed\.zero_stage"):
        parse_spec(spec_with({"deepspeed": {"zero_stage": 5}}))
    with pytest.raises(SpecError, match=r"offload_params needs zero_stage 3"):
        parse_spec(spec_with({"deepspeed": {"zero_stage": 2, "offload_params": True}}))


def test_unknown_kind_and_missing_data():
    with pytest.raises(SpecError, match=r"stages\.sfx: unknown stage kind 'sfx'; did you mean sft\?"):
        parse_spec({"name": "t", "stages": {"sfx": {"data": "x"}}})
    with pytest.raises(SpecError, match=r"stages\.sft\.data: required key is missing"):
        parse_spec({"name": "t", "stages": {"sft": {}}})


def test_several_stages_share_a_kind():
    spec = parse_spec({"name": "t", "stages": {"sft_a": {"kind": "sft", "data": "x"},
                                                "sft_b": {"kind": "sft", "from": "sft_a", "data": "x"}}})
    assert build_dag(spec).order == ("base", "sft_a", "sft_b")


def test_missing_upstream_and_cycle_name_the_stages():
    spec = parse_spec({"name": "t", "stages": {"sft": {"from": "warmup", "data": "x"}}})
    with pytest.raises(DAGError, match=r"stage 'sft': from: 'warmup' is not a stage"):
        build_dag(spec)
    spec = parse_spec({"name": "t", "stages": {"a": {"kind": "sft", "from": "b", "data": "x"},
                                                "b": {"kind": "sft", "from": "a", "data": "x"}}})
    with pytest.raises(DAGError, match=r"cycle: (a -> b -> a|b -> a -> b)"):
        build_dag(spec)


def test_overrides_are_typed_like_yaml(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("name: t\nstages:\n  sft:\n    data: builtin:addition\n")
    spec = load_spec(path, ["stages.sft.train.lr=1e-5", "stages.sft.scaling.num_workers=2", "ray.num_cpus=3"])
    assert spec.stages["sft"].train.lr == 1e-5 and spec.stages["sft"].scaling.num_workers == 2
    assert spec.ray.num_cpus == 3
    with pytest.raises(SpecError, match="expected KEY.PATH=VALUE"):
        apply_override({}, "nonsense")
    with pytest.raises(SpecError, match=r"stages\.sft\.train\.lr"):
        load_spec(path, ["stages.sft.train.lr=fast"])


def test_storage_resolves_against_the_file(tmp_path):
    path = tmp_path / "sub" / "p.yaml"
    path.parent.mkdir()
    path.write_text("name: t\nstorage: ../runs\n")
    assert load_spec(path).run_root() == (tmp_path / "runs" / "t").resolve()
