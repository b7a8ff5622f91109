"""The compatibility matrix (``stages.method_support``): every refused combination raises with its reason,
when the pipeline file loads (sft, reward, dpo) or at ``rayalign validate`` (every kind, and what a stage takes
from its upstream). No Ray, no training."""

from __future__ import annotations

import pytest

from pipeline.spec import SpecError, parse_spec
from pipeline.validate import ValidationFailed, validate_pipeline
from stages.config import PeftConfig
from stages.method_support import REFUSALS, support_problem

PPO = {"kind": "ppo", "prompts": "builtin:addition", "reward_fn": "addition"}


def spec_with(stages: dict, model: str = "builtin:tiny-llama"):
    return parse_spec({"name": "t", "ray": {"num_cpus": 4}, "tracking": {"backend": "none"},
                       "base": {"model": model}, "stages": stages})


def example(row) -> tuple[str, PeftConfig, int | None, str | None]:
    """A combination this row refuses: its first method, kind, ZeRO stage and engine."""
    peft = {"method": row.methods[0]}
    if row.option == "init":
        peft["init"] = "olora"
    if row.option == "quant_bits":
        peft["quant_bits"] = 8
    return ((row.kinds or ("sft",))[0], PeftConfig(**peft), (row.zero_stages or (None,))[0],
            (row.engines or (None,))[0])


@pytest.mark.parametrize("row", REFUSALS, ids=lambda r: f"{r.methods[0]}-{r.option}-{r.kinds}-{r.zero_stages}-"
                                                         f"{r.engines}")
def test_every_refusal_gives_its_reason(row):
    kind, peft, zero_stage, engine = example(row)
    problem = support_problem(kind, peft, zero_stage, engine)
    assert problem is not None and problem.endswith(row.reason)
    assert problem.startswith(f"peft.{row.option}: ")
    # Each method the row lists is refused there too.
    for method in row.methods:
        other = PeftConfig(method=method, **({"init": "olora"} if row.option == "init" else {}),
                           **({"quant_bits": 8} if row.option == "quant_bits" else {}))
        assert support_problem(kind, other, zero_stage, engine) is not None


@pytest.mark.parametrize(("stage", "message"), [
    ({"kind": "reward", "data": "builtin:addition", "peft": {"method": "prompt_tuning"}},
     r"stages\.s\.peft\.method: prompt_tuning does not work in reward stages: the reward stage's output is its "
     r"adapter merged into a plain classifier"),
    ({"kind": "ppo", "prompts": "builtin:addition", "reward_fn": "addition", "rollout": {"engine": "vllm"},
      "peft": {"method": "qlora", "quant_bits": 8}},
     r"stages\.s\.peft\.quant_bits: 8 does not work in ppo stages with rollout\.engine vllm: vLLM quantizes a base "
     r"in flight to 4 bits only"),
    ({"kind": "reward", "data": "builtin:addition", "peft": {"method": "prefix_tuning"}},
     r"stages\.s\.peft\.method: prefix_tuning does not work in reward stages"),
    ({"kind": "sft", "data": "builtin:addition", "peft": {"method": "lora", "init": "pissa"},
      "deepspeed": {"zero_stage": 3}},
     r"stages\.s\.peft\.init: pissa does not work in sft stages with deepspeed\.zero_stage 3: pissa/olora save "
     r"the untrained adapter"),
    ({"kind": "sft", "data": "builtin:addition", "peft": {"method": "prompt_tuning"}, "merge": True},
     r"stages\.s\.merge: peft\.method prompt_tuning cannot be merged into the weights \(virtual tokens are not "
     r"weights\)"),
    ({"kind": "sft", "data": "builtin:addition", "peft": {"method": "adapter"}, "merge": True},
     r"stages\.s\.merge: peft\.method adapter cannot be merged into the weights \(a bottleneck adapter is "
     r"nonlinear\)"),
])
def test_refused_combinations_fail_when_the_file_loads(stage, message):
    with pytest.raises(SpecError, match=message):
        spec_with({"s": stage})


@pytest.mark.parametrize(("peft", "engine", "reason"), [
    ({"method": "dora"}, "vllm", "rollout.engine vllm serves full weights or a LoRA adapter (LoRARequest)"),
    ({"method": "prefix_tuning"}, "hf", "the PPO/GRPO policy updates full weights or a LoRA adapter"),
    ({"method": "bitfit"}, "trainer", "the PPO/GRPO policy updates full weights or a LoRA adapter"),
])
def test_ppo_and_grpo_rows(peft, engine, reason):
    problem = support_problem("ppo", PeftConfig(**peft), None, engine)
    assert problem is not None and reason in problem
    assert support_problem("ppo", PeftConfig(method="qlora"), 3, "hf").startswith(
        "peft.method: qlora does not work in ppo stages with deepspeed.zero_stage 3")


def test_supported_combinations_pass():
    # The shipped 8B config trains QLoRA under ZeRO-3 (stages.models skips the k-bit upcast there).
    assert support_problem("sft", PeftConfig(method="qlora"), 3) is None
    for method in ("lora", "qlora", "full"):
        assert support_problem("ppo", PeftConfig(method=method), 2, "vllm") is None
    for method in ("prompt_tuning", "prefix_tuning", "ia3", "dora", "bitfit"):
        assert support_problem("sft", PeftConfig(method=method), 2) is None
        assert support_problem("dpo", PeftConfig(method=method), 2) is None  # TRL aligns log-probs to the input


@pytest.mark.parametrize("consumer", [
    {"kind": "dpo", "from": "sft", "data": "builtin:addition"},
    {**PPO, "from": "sft"},
    {"kind": "eval", "models": ["sft"], "prompts": "builtin:addition"},
])
@pytest.mark.parametrize("method", ["prefix_tuning", "adapter"])
def test_a_stage_cannot_start_from_an_unmergeable_output(consumer, method):
    spec = spec_with({"sft": {"data": "builtin:addition", "peft": {"method": method}}, "next": consumer})
    with pytest.raises(ValidationFailed, match=rf"stages\.next\.(from|models): sft trains peft\.method {method}, "
                                               r"whose output is an adapter that loads only on its base"):
        validate_pipeline(spec, ["next"])


def test_bitfit_on_a_base_without_biases_fails_at_validate():
    stages = {"sft": {"data": {"path": "builtin:addition", "limit": 8}, "peft": {"method": "bitfit"}}}
    with pytest.raises(ValidationFailed, match=r"stages\.sft\.peft\.method: peft\.method bitfit trains only biases, "
                                               r"and base\.model builtin:tiny-llama has none"):
        validate_pipeline(spec_with(stages))
    lines = validate_pipeline(spec_with(stages, model="builtin:tiny-llama-bias"))
    assert lines[0].startswith("DAG:")
