"""Bad input, table-driven: every row is a pipeline that ``rayalign validate`` (the real CLI, ``pipeline.cli.main``)
must refuse with exit code 2 and exactly one message, ``rayalign: error: ...``, that names the key, file,
record or resource and says what was expected, without a traceback. One row goes through ``rayalign run``
(it must stop before any training), and one through the installed ``rayalign`` console script.

A row is a :class:`Case`: edits merged into :data:`BASE` (``DROP`` deletes a key), files written beside the
config, extra arguments, and the substrings the message must hold. ``{shared}`` in a value is
../shared/data (rows that read it skip without it); ``{model}`` and ``{model_without_template}`` are copies
of the session's tiny base whose chat template has no ``{% generation %}`` markers, or none at all.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.cluster import QUIET_ENV, VERBOSE

DROP = object()  # an edit that deletes the key

ALPACA = [{"instruction": f"Add {a} and {b}.", "input": "", "output": str(a + b)} for a, b in ((2, 3), (10, 7), (4, 4))]
BASE = {
    "name": "bad",
    "storage": "store",
    "ray": {"num_cpus": 4},
    "tracking": {"backend": "none"},
    "stages": {"sft": {"data": "data/sft.jsonl", "train": {"max_steps": 1, "max_length": 128}}},
}
BASE_FILES = {"data/sft.jsonl": "".join(json.dumps(r) + "\n" for r in ALPACA)}
PPO = {"kind": "ppo", "from": "sft", "prompts": "builtin:addition", "reward_fn": "addition"}
GRPO = {**PPO, "peft": {"method": "lora", "r": 16}, "algorithm": {"advantage": "grpo"},
        "rollout": {"engine": "vllm", "n": 2}}
LLAMA_CONFIG = json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant: {% endif %}")


@dataclass
class Case:
    edits: dict = field(default_factory=dict)
    expect: tuple[str, ...] = ()
    files: dict[str, str] = field(default_factory=dict)
    args: tuple[str, ...] = ()
    command: str = "validate"
    config_text: str | None = None  # the config file's text as it is (not YAML of BASE)
    config: str | None = None  # run on this file (relative to the test's folder) instead
    needs: tuple[str, ...] = ()  # "shared", "no-wandb", "no-gpu", "model"


def stage(**fields) -> dict:
    return {"stages": {"sft": fields}}


CASES = [
    # --- the spec: keys, types, names (pipeline.spec)
    pytest.param(Case(stage(train={"lerning_rate": 1e-4}),
                      ("stages.sft.train.lerning_rate: unknown key; did you mean lr?",)), id="unknown-key"),
    pytest.param(Case({"strage": "x"}, ("strage: unknown key; did you mean storage?",)), id="unknown-top-level-key"),
    # Optional sections (a `X | None` field) get suggestions too.
    pytest.param(Case(stage(sweep={"search_space": {"train.lr": [1e-4]}, "schedular": {"name": "asha"}}),
                      ("stages.sft.sweep.schedular: unknown key; did you mean scheduler?",)),
                 id="unknown-key-in-an-optional-section"),
    pytest.param(Case(stage(train={"lr": "fast"}), ("stages.sft.train.lr:", "valid number", "'fast'")),
                 id="wrong-type"),
    pytest.param(Case(stage(deepspeed={"zero_stage": 5}), ("stages.sft.deepspeed.zero_stage:", "0, 1, 2 or 3", "5")),
                 id="value-out-of-range"),
    pytest.param(Case({"stages": {"sfx": {"data": "data/sft.jsonl"}}},
                      ("stages.sfx: unknown stage kind 'sfx'; did you mean sft?",)), id="unknown-stage-kind"),
    pytest.param(Case(stage(data=DROP), ("stages.sft.data: required key is missing",)), id="required-key-missing"),
    pytest.param(Case({"stages": {"../x": {"kind": "sft", "data": "data/sft.jsonl"}}},
                      ("stages: '../x' is not a valid stage name", "^[a-z][a-z0-9_-]{0,63}$")),
                 id="stage-name-escapes"),
    pytest.param(Case({"stages": {"a/b": {"kind": "sft", "data": "data/sft.jsonl"}}},
                      ("'a/b' is not a valid stage name", "folder of the store")), id="stage-name-with-slash"),
    pytest.param(Case({"stages": {"report": {"kind": "sft", "data": "data/sft.jsonl"}}},
                      ("stages: stage name 'report' is reserved",)), id="stage-name-reserved"),
    pytest.param(Case({"name": ".."}, ("name:", "'..'", "pattern")), id="pipeline-name-escapes"),
    pytest.param(Case(args=("--set", "stages.sfx.train.lr=1e-4"),
                      expect=("--set stages.sfx.train.lr: there is no stage 'sfx'", "did you mean sft?")),
                 id="set-on-missing-stage"),
    pytest.param(Case(args=("--set", "stages.sft.train.lr"), expect=("--set", "expected KEY.PATH=VALUE")),
                 id="set-without-value"),
    pytest.param(Case(stage(chat_template="chatlm"), ("stages.sft.chat_template: unknown chat template 'chatlm'",
                                                      "did you mean chatml?")), id="unknown-chat-template"),
    pytest.param(Case(stage(**{"from": "pretrain"}), ("stage 'sft': from: 'pretrain' is not a stage",)),
                 id="from-missing-stage"),
    pytest.param(Case({"stages": {"a": {"kind": "sft", "from": "b", "data": "data/sft.jsonl"},
                                  "b": {"kind": "sft", "from": "a", "data": "data/sft.jsonl"}}},
                      ("the stages form a cycle:", "a -> b")), id="dag-cycle"),
    pytest.param(Case({"stages": {"grpo": {**GRPO, "peft": {"method": "lora", "r": 1024}}}},
                      ("stages.grpo.peft.r: LoRA rank 1024", "vLLM", "r <= 512")), id="vllm-lora-rank-too-big"),
    pytest.param(Case({"stages": {"grpo": {**GRPO, "rollout": {**GRPO["rollout"],
                                                               "engine_kwargs": {"max_lora_rank": 24}}}}},
                      ("stages.grpo.rollout.engine_kwargs.max_lora_rank: 24",
                       "[1, 8, 16, 32, 64, 128, 256, 320, 512]")),
                 id="vllm-max-lora-rank-invalid"),
    pytest.param(Case({"stages": {"ppo": {**PPO, "reward_fn": DROP}}}, ("stages.ppo:", "ppo needs a reward")),
                 id="ppo-without-reward"),
    pytest.param(Case({"stages": {"grpo": {**GRPO, "rollout": {**GRPO["rollout"], "off_policy_steps": 1,
                                                               "colocate": True}}}},
                      ("stages.grpo.rollout.off_policy_steps: 1 generates", "colocate: false")), id="off-policy-colocated"),
    pytest.param(Case({"stages": {"grpo": {**GRPO, "rollout": {**GRPO["rollout"], "off_policy_steps": 2}}}},
                      ("stages.grpo.rollout.off_policy_steps", "less than or equal to 1")), id="off-policy-two-steps"),
    pytest.param(Case({"stages": {"grpo": {**GRPO, "algorithm": {**GRPO["algorithm"], "tis_cap": 2.0},
                                           "rollout": {**GRPO["rollout"], "temperature": 0.7}}}},
                      ("stages.grpo:", "algorithm.tis_cap", "rollout.temperature is 0.7")), id="tis-needs-temperature-1"),
    pytest.param(Case({"stages": {"dpo": {"from": "sft", "data": "builtin:addition", "loss": "dpop"}}},
                      ("stages.dpo.loss: unknown loss 'dpop'",)), id="unknown-dpo-loss"),
    pytest.param(Case(config_text="name: bad\nstages: {sft: {data: [}\n",
                      expect=("pipeline.yaml line 2 column 23: not valid YAML: expected the node content",)),
                 id="config-not-yaml"),
    pytest.param(Case(config="missing.yaml", expect=("missing.yaml: no such file",)), id="config-file-missing"),
    # --- the environment
    pytest.param(Case({"tracking": {"backend": "wandb"}}, ("tracking.backend: wandb", "pip install wandb"),
                      needs=("no-wandb",)), id="tracking-package-missing"),
    pytest.param(Case({"stages": {"ppo": {**PPO, "reward_fn": "no_such_rewards:score"}}},
                      ("stages.ppo.reward_fn: cannot import module 'no_such_rewards'", "package.module:function")),
                 id="reward-fn-unknown-module"),
    pytest.param(Case({"stages": {"ppo": {**PPO, "reward_fn": "json:scores"}}},
                      ("stages.ppo.reward_fn: module 'json' has no function 'scores'",)),
                 id="reward-fn-unknown-function"),
    # --- the base model
    pytest.param(Case({"base": {"model": "notamodel"}}, ("base.model:", "notamodel is not a Hugging Face model folder",
                                                         "no config.json", "README.md"),
                      files={"notamodel/README.md": "not a model\n"}), id="base-not-an-hf-folder"),
    pytest.param(Case({"base": {"model": "noweights"}}, ("base.model:", "noweights has config.json but no weights",),
                      files={"noweights/config.json": LLAMA_CONFIG}), id="base-without-weights"),
    pytest.param(Case({"base": {"model": "pickled"}}, ("base.model:", "pickled has config.json but no weights",
                                                       "pytorch_model*.bin is a pickle and is not loaded"),
                      files={"pickled/config.json": LLAMA_CONFIG, "pickled/pytorch_model.bin": "not loaded\n"}),
                 id="base-with-only-pickle-weights"),
    pytest.param(Case({"base": {"model": "./models/missing"}}, ("base.model:", "models/missing: no such folder")),
                 id="base-folder-missing"),
    pytest.param(Case({"base": {"model": "builtin:tiny-lama"}},
                      ("base.model: unknown builtin base 'tiny-lama'; did you mean tiny-llama?",)),
                 id="base-unknown-builtin"),
    pytest.param(Case({"base": {"model": "no-such-org/no-such-model"}},
                      ("base.model: 'no-such-org/no-such-model'", "not in the local Hugging Face cache")),
                 id="base-hub-model-not-cached"),
    # --- this machine (a local run: no ray.address, no RAY_ADDRESS)
    pytest.param(Case(stage(scaling={"use_gpu": True}), ("stages.sft.scaling.use_gpu: true", "no GPU",
                                                         "torch.cuda.is_available() is false"), needs=("no-gpu",)),
                 id="use-gpu-without-gpu"),
    pytest.param(Case(stage(scaling={"num_workers": 64}),
                      ("stages.sft: stage 'sft' needs 64 CPU (64 training workers x 1 CPU)",
                       "the local Ray instance would have 4 CPU", "no ray.address or RAY_ADDRESS")),
                 id="more-workers-than-cpus"),
    pytest.param(Case({"ray": {"num_gpus": 1}, "stages": {"ppo": {**PPO, "rollout": {"num_engines": 2,
                                                                                       "gpus_per_engine": 2}}}},
                      ("stages.ppo: stage 'ppo' needs 4 GPU (2 rollout engines x 2 GPU)", "would have 1 GPU",
                       "1 GPU from ray.num_gpus")),
                 id="more-gpus-than-the-machine"),
    # --- the data
    pytest.param(Case(stage(data="data/missing.jsonl"), ("stages.sft.data: data/missing.jsonl: no such file",)),
                 id="data-file-missing"),
    pytest.param(Case(stage(data="data/bad.jsonl"), ("stages.sft.data:", "bad.jsonl line 3: invalid JSON"),
                      files={"data/bad.jsonl": "".join(json.dumps(r) + "\n" for r in ALPACA[:2])
                             + '{"instruction": "x", oops}\n'}), id="malformed-jsonl-line"),
    pytest.param(Case(stage(data="data/empty.jsonl"), ("stages.sft.data: data/empty.jsonl: no usable sft records",
                                                       "3 read", "empty_response: 3"),
                      files={"data/empty.jsonl": "".join(json.dumps({**r, "output": ""}) + "\n" for r in ALPACA)}),
                 id="empty-after-filtering"),
    pytest.param(Case(stage(data={"path": "data/sft.jsonl", "format": "alpacca"}),
                      ("stages.sft.data:", "unknown format 'alpacca'")), id="unknown-data-format"),
    pytest.param(Case(stage(data="builtin:subtraction"), ("stages.sft.data: builtin:subtraction",
                                                          "unknown built-in source 'subtraction'")),
                 id="unknown-builtin-data"),
    pytest.param(Case(stage(data={"path": "data/sft.jsonl", "limit": 1, "eval_fraction": 0.5}),
                      ("stages.sft.data.eval_fraction: holding out 1 of the 1 usable records leaves none",)),
                 id="held-out-split-leaves-nothing"),
    # --- the model: modules, chat template, lengths (pipeline.validate, stages.training_data)
    pytest.param(Case(stage(peft={"method": "lora", "target_modules": ["q_proj", "query_key_value"]}),
                      ("stages.sft.peft.target_modules: base.model builtin:tiny-llama has no module 'query_key_value'",
                       "q_proj", "v_proj")), id="lora-target-module-missing"),
    pytest.param(Case(stage(peft={"method": "lora", "target_modules": "model.*(q_proj"}),
                      ("stages.sft.peft.target_modules: 'model.*(q_proj' is not a regular expression",)),
                 id="lora-target-regex-invalid"),
    pytest.param(Case(stage(peft={"method": "lora", "target_modules": ".*attention.query"}),
                      ("stages.sft.peft.target_modules:", "has no module '.*attention.query'", "or all-linear")),
                 id="lora-target-regex-matches-nothing"),
    pytest.param(Case(stage(data="{shared}/sft/alpaca/alpaca_en_demo.json", train={"max_length": 32}),
                      ("stages.sft.data:", "alpaca_en_demo.json: all 999 sft records", "dropped for length",
                       "train.max_length (32 tokens)", "raise stages.sft.train.max_length to at least 36"),
                      needs=("shared",)), id="sft-every-record-too-long"),
    pytest.param(Case(stage(data="{shared}/sft/alpaca/alpaca_en_demo.json", train={"max_length": 32}),
                      ("stages.sft.data:", "all 999 sft records", "dropped for length"), command="run",
                      needs=("shared",)), id="run-stops-before-training"),
    pytest.param(Case({"stages": {"dpo": {"from": "sft", "data": "{shared}/preference/hh-rlhf/helpful-base/"
                                                                 "test.jsonl.gz", "train": {"max_length": 16}}}},
                      ("stages.dpo.data:", "test.jsonl.gz: all 2348 preference records",
                       "the prompt is at least train.max_length (16 tokens)", "to at least 21"), needs=("shared",)),
                 id="dpo-prompt-longer-than-max-length"),
    pytest.param(Case({"stages": {"reward": {"from": "sft", "data": "{shared}/preference/llamafactory/"
                                                                    "dpo_en_demo.json", "train": {"max_length": 64}}}},
                      ("stages.reward.data:", "dpo_en_demo.json: all", "the longer side of the pair",
                       "over train.max_length (64 tokens)"), needs=("shared",)),
                 id="reward-pairs-longer-than-max-length"),
    pytest.param(Case({"stages": {"ppo": {**PPO, "prompts": "{shared}/verifiable/gsm8k/test.jsonl",
                                          "reward_fn": "gsm8k"}}},
                      ("stages.ppo.prompts:", "gsm8k/test.jsonl: prompt record 1", "context of 256 tokens",
                       "rollout.max_new_tokens (32)"), needs=("shared",)), id="ppo-prompt-longer-than-context"),
    pytest.param(Case({"base": {"model": "{model}"}}, ("stages.sft.assistant_only_loss: true needs {% generation %} "
                                                       "markers", "chat_template to chatml"), needs=("model",)),
                 id="assistant-only-loss-without-markers"),
    pytest.param(Case({"base": {"model": "{model_without_template}"}},
                      ("stages.sft.chat_template: the tokenizer of base.model", "has no chat template"),
                      needs=("model",)), id="tokenizer-without-chat-template"),
    # --- quality gates (stages.gates): checked when the file loads, before anything runs
    pytest.param(Case(stage(gate=["final_los < 1.0"]), ("stages.sft.gate:", "do not report 'final_los'",
                                                        "did you mean final_loss?")), id="gate-unknown-metric"),
    pytest.param(Case(stage(gate=["final_loss => 1.0"]), ("stages.sft.gate:", "'final_loss => 1.0' is not a condition",
                                                          "OP one of >= > <= < == !=")), id="gate-bad-operator"),
    pytest.param(Case({"stages": {"eval": {"models": ["sft"], "tasks": ["addition"], "gate": "accuracy[spt] >= 0.5"}}},
                      ("stages.eval.gate:", "'spt' is not evaluated here; did you mean sft?")),
                 id="gate-eval-unknown-model"),
    # --- mixtures (stages.data.mixture): a list of weighted datasets
    pytest.param(Case(stage(data=[{"path": "builtin:addition", "weight": 3}, {"path": "builtin:reversal", "weight": 0}]),
                      ("stages.sft.data.1.weight", "greater than 0")), id="mixture-zero-weight"),
    pytest.param(Case(stage(data=[{"path": "builtin:addition", "sampling_temperature": 2},
                                  {"path": "builtin:reversal", "sampling_temperature": 3}]),
                      ("stages.sft.data", "sampling_temperature", "disagree")), id="mixture-options-disagree"),
    pytest.param(Case(stage(data={"path": "builtin:addition", "weight": 2}),
                      ("stages.sft.data.weight", "give a training stage's data as a list")), id="weight-without-mixture"),
    pytest.param(Case(stage(data=[{"path": "builtin:addition"}, {"path": "missing.jsonl"}]),
                      ("stages.sft.data[1]", "missing.jsonl")), id="mixture-missing-file"),
    # --- few-shot eval: exemplars and context checked at validate
    pytest.param(Case({"stages": {"eval": {"models": ["sft"], "tasks": ["addition"], "few_shot": 9}}},
                      ("stages.eval.few_shot:", "9 exemplars", "256 tokens")), id="few-shot-longer-than-context"),
    pytest.param(Case({"stages": {"eval": {"models": ["sft"], "tasks": ["gsm8k"], "few_shot": 2}}},
                      ("stages.eval", "few_shot_data")), id="few-shot-without-training-split"),
    # --- where each adaptation method runs (stages.method_support)
    pytest.param(Case({"stages": {"dpo": {"kind": "dpo", "from": "sft", "data": "builtin:addition",
                                          "peft": {"method": "adapter"}}}},
                      ("peft.method: adapter does not work in dpo stages", "use lora")), id="adapter-in-dpo"),
    pytest.param(Case(stage(peft={"method": "lora", "adapter_size": 8}),
                      ("peft.adapter_size applies to adapter, not 'lora'",)), id="option-of-another-method"),
    # --- where the store and the cluster are
    pytest.param(Case({"storage": "s3://user:hunter2@bucket/runs"}, ("storage:", "credentials")),
                 id="storage-uri-with-credentials"),
    pytest.param(Case({"ray": {"address": "ray://head:10001"}}, ("ray.address=ray://head:10001", "Ray Client")),
                 id="ray-client-address"),
]


@pytest.fixture
def quiet_cli(monkeypatch):
    """``main`` sets the quiet environment for the processes it would start; undo it after each row, and run
    as a local run (no RAY_ADDRESS)."""
    for key in (*QUIET_ENV, VERBOSE, "RAY_ADDRESS"):
        monkeypatch.setenv(key, "x")
        monkeypatch.delenv(key)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def template_models(tiny_base, tmp_path_factory) -> dict[str, str]:
    """Copies of the tiny base: one whose chat template has no generation markers, one with no template."""
    folders = {}
    for name in ("model", "model_without_template"):
        folder = tmp_path_factory.mktemp(name) / "model"
        shutil.copytree(tiny_base, folder)
        (folder / "chat_template.jinja").unlink(missing_ok=True)
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
        tokenizer_config.pop("chat_template", None)
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
        if name == "model":
            (folder / "chat_template.jinja").write_text(PLAIN_TEMPLATE)
        folders[name] = str(folder)
    return folders


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_clear_error(case: Case, tmp_path, request, capsys, monkeypatch, quiet_cli):
    values = prepare(case, request, monkeypatch)
    config = write_config(case, tmp_path, values) if case.config is None else tmp_path / case.config
    code = main([case.command, str(config), *case.args])
    out, err = capsys.readouterr()
    assert code == 2, f"exit code {code}\nstdout: {out}\nstderr: {err}"
    assert err.startswith("rayalign: error: ") and err.count("rayalign: error:") == 1, err
    assert len(err.strip().splitlines()) == 1, f"more than one message:\n{err}"
    assert "Traceback" not in err and "OK" not in out
    for expected in case.expect:
        assert expected in err, f"{expected!r} not in: {err}"
    assert not (tmp_path / "store").exists(), "a refused pipeline wrote to the store"


def test_the_console_script_refuses_bad_input(tmp_path):
    """The installed entry point (``rayalign`` in the venv), in its own process."""
    script = Path(sys.executable).with_name("rayalign")
    if not script.exists():
        pytest.skip(f"no console script at {script} (package not installed in this environment)")
    config = write_config(Case({"stages": {"../x": {"kind": "sft", "data": "data/sft.jsonl"}}}), tmp_path, {})
    result = subprocess.run([str(script), "validate", str(config)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result
    assert result.stderr.startswith("rayalign: error: ") and "Traceback" not in result.stderr, result.stderr
    assert "'../x' is not a valid stage name" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_the_table_has_at_least_30_rows():
    assert len(CASES) >= 30


def test_a_good_config_passes(tmp_path, capsys, quiet_cli):
    """The table's base pipeline itself validates: each row fails for its own reason."""
    assert main(["validate", str(write_config(Case(), tmp_path, {}))]) == 0
    out, err = capsys.readouterr()
    assert out.rstrip().endswith(": OK") and "sft.data: data/sft.jsonl [alpaca] 3 read, 3 usable" in out, out


# --------------------------------------------------------------------------- helpers


def prepare(case: Case, request, monkeypatch) -> dict[str, str]:
    """Skip a row whose needs this machine does not meet; the placeholder values of the rest."""
    values = {}
    if "shared" in case.needs:
        values["shared"] = str(request.getfixturevalue("shared_data"))
    if "no-wandb" in case.needs and importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    if "no-gpu" in case.needs:
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if "model" in case.needs:
        values.update(request.getfixturevalue("template_models"))
    return values


def write_config(case: Case, folder: Path, values: dict[str, str]) -> Path:
    for name, text in {**BASE_FILES, **case.files}.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    config = folder / "pipeline.yaml"
    if case.config_text is not None:
        config.write_text(case.config_text)
        return config
    raw = merged(copy.deepcopy(BASE), case.edits)
    config.write_text(yaml.safe_dump(filled(raw, values), sort_keys=False))
    return config


def merged(base: dict, edits: dict) -> dict:
    for key, value in edits.items():
        if value is DROP:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = merged(base[key], value)
        else:
            base[key] = merged({}, value) if isinstance(value, dict) else value
    return base


def filled(value, values: dict[str, str]):
    if isinstance(value, dict):
        return {k: filled(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [filled(v, values) for v in value]
    if isinstance(value, str):
        for name, text in values.items():
            value = value.replace("{" + name + "}", text)
    return value
