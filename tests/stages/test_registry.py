"""Stage kinds are found from their modules: a new kind is one module that declares ``STAGE``."""

from __future__ import annotations

from stages.registry import declares_stage, stage_kinds, stage_modules


def test_declaring_modules_are_found_by_reading_them():
    assert declares_stage("from stages.stage import StageKind\nSTAGE = StageKind('x', object, run='m:f')\n")
    assert not declares_stage("STAGE = 'sft'\n")  # not a StageKind
    assert not declares_stage("def f():\n    STAGE = StageKind('x', object, run='m:f')\n")  # not at module level
    assert set(stage_modules()) >= {"stages.pretrained", "stages.sft", "stages.reward", "stages.dpo",
                                    "stages.ppo.config", "stages.evaluate.config"}


def test_every_kind_once_with_its_config_and_runner():
    kinds = stage_kinds()
    assert set(kinds) == {"base", "sft", "reward", "dpo", "ppo", "eval"}
    for kind, entry in kinds.items():
        assert entry.kind == kind and ":" in entry.run
        if kind != "base":
            assert entry.config.model_fields["kind"].default == kind
