"""``rayalign validate``: everything a run would trip over, checked without training.

    rayalign validate configs/tiny.yaml          # also the first thing `rayalign run` does

:func:`validate_pipeline` raises one :class:`ValidationFailed` (a ``ValueError``: the CLI prints it as
``rayalign: error: ...`` and exits 2) naming the key, file, record or resource and what was expected;
the spec's own errors (unknown keys, types, stage names) come earlier, from ``pipeline.spec``. In order:

1. the DAG: every reference names a stage, no cycle (``pipeline.dag``);
2. the environment: the tracking backend's package imports; a ``reward_fn: module:function`` imports; the
   stage's peft method against ``stages.method_support`` (kind, ZeRO stage, rollout engine; and no stage
   starts from an output that cannot be merged: prompt/prefix tuning, bottleneck adapters);
3. the base model: a builtin name, a Hugging Face model folder (``config.json`` and weights), or a hub
   id; for a local run (no ``ray.address``, no ``RAY_ADDRESS``) a hub id must be in the local cache;
4. the machine, for a local run: ``scaling.use_gpu`` needs a visible GPU, and each stage must fit the
   local Ray instance's CPUs and GPUs (``stages.resources``: the check a joined cluster gets at connect time);
5. the data: every record of every data source is read; a source must keep usable records after the
   loader's filters and the held-out split;
6. the model, where its config and tokenizer are readable without loading weights (builtin bases, local
   folders, cached hub models): LoRA ``target_modules`` exist; the chat template exists and has
   ``{% generation %}`` markers where ``assistant_only_loss`` needs them; TRL's length rules keep some
   records (sft: the prompt before the first assistant token under ``max_length``; dpo: the prompt under
   ``max_length``; reward: both sides at most ``max_length``), and every PPO prompt plus
   ``rollout.max_new_tokens`` fits the model's context; ``peft.method: bitfit`` needs a model with biases;
   an eval stage's prompts, with their ``few_shot`` exemplars (solved, at least k of them), plus
   ``generation.max_new_tokens`` fit its reference model's context.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import statistics
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from pipeline.cluster import cluster_address
from pipeline.dag import BASE, build_dag
from pipeline.spec import PipelineSpec
from stages.adaptation import bitfit_problem
from stages.config import TrainingStageConfig, suggest
from stages.method_support import consumer_problem, support_problem

# Tracking backend -> the packages its Hugging Face callback imports (any one of them).
TRACKING_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "mlflow": ("mlflow",), "wandb": ("wandb",)}
WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json")  # models load with use_safetensors=True: no .bin (pickle)
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
GENERATION_MARKER = re.compile(r"{%-?\s*generation\s*-?%}")


class ValidationFailed(ValueError):
    """A pipeline that would fail when it runs; the message names the key, file, record or resource."""


def validate_pipeline(spec: PipelineSpec, stages: Iterable[str] | None = None,
                      inputs: dict[str, str] | None = None) -> list[str]:
    """Check ``stages`` (default: all; ``rayalign run`` passes the ones it runs) and return one line per
    data source and per note; raise :class:`ValidationFailed` (``DAGError`` for the DAG) on the first problem.
    ``inputs``: stage -> HF folder given with ``--input``; such a stage is not run, and its folder is
    the model the stages after it start from."""
    dag = build_dag(spec)
    inputs = inputs or {}
    wanted = set(spec.stages if stages is None else stages) - set(inputs)
    names = [n for n in dag.order if n in wanted and n in spec.stages]
    lines = [f"DAG: {' -> '.join(dag.order)}"]
    check_tracking(spec)
    for name in names:
        check_reward_fn(name, spec.stages[name], spec)
        check_method_support(spec, name, inputs)
    if BASE not in inputs:
        lines += check_base_model(spec)
    lines += check_machine(spec, names)
    read = lru_cache(maxsize=None)(_read_source)  # stages that share a source read it once
    loaded = {name: load_stage_data(spec, name, lines, read) for name in names}
    lengths: dict[tuple, list[int]] = {}  # ... and have it tokenized once
    for name in names:
        config = spec.stages[name]
        if config.kind == "eval":
            lines += check_eval_stage(spec, name, inputs)
        elif isinstance(config, TrainingStageConfig):
            facts = model_facts(spec, upstream_model(spec, name, inputs))
            if facts is None:
                lines.append(f"{name}: model checks skipped (the model is not readable here)")
                continue
            lines += check_stage_model(spec, name, facts, loaded[name], lengths)
    return lines


def check_eval_stage(spec: PipelineSpec, name: str, inputs: dict[str, str]) -> list[str]:
    """``stages.evaluate.stage.check_eval_data`` with the upstream model's tokenizer and context."""
    from stages.evaluate.stage import check_eval_data

    facts = model_facts(spec, upstream_model(spec, name, inputs))
    try:
        check_eval_data(spec.stages[name], spec.resolve_path, f"stages.{name}",
                        *((facts.tokenizer, facts.context, facts.where) if facts else ()))
    except ValueError as err:
        raise ValidationFailed(str(err)) from None
    return [] if facts else [f"{name}: prompt length checks skipped (the model is not readable here)"]


# --------------------------------------------------------------------------- environment


def check_tracking(spec: PipelineSpec) -> None:
    backend = spec.tracking.backend
    packages = TRACKING_PACKAGES.get(backend, ())
    if packages and not any(importlib.util.find_spec(p) for p in packages):
        raise ValidationFailed(
            f"tracking.backend: {backend}, but the {packages[0]} package is not installed for {sys.executable}; "
            f"install it (pip install {packages[0]}) or choose another backend "
            f"({', '.join(b for b in (*TRACKING_PACKAGES, 'none') if b != backend)})")


def check_reward_fn(name: str, config: Any, spec: PipelineSpec) -> None:
    """A ``reward_fn: package.module:function`` must import (from sys.path, the current folder or the config's)."""
    reward_fn = getattr(config, "reward_fn", None)
    if not reward_fn or ":" not in reward_fn:
        return
    module_name, _, function = reward_fn.partition(":")
    extra = [str(Path.cwd())] + ([str(spec.source.parent)] if spec.source else [])
    sys.path[:0] = extra
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - any failure to import is the user's to fix
        raise ValidationFailed(f"stages.{name}.reward_fn: cannot import module {module_name!r} "
                               f"({type(err).__name__}: {err}); expected package.module:function") from None
    finally:
        del sys.path[:len(extra)]
    if not callable(getattr(module, function, None)):
        functions = [n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_")]
        raise ValidationFailed(f"stages.{name}.reward_fn: module {module_name!r} has no function {function!r}"
                               f"{suggest(function, functions)}")


def check_base_model(spec: PipelineSpec) -> list[str]:
    """``base.model``: a builtin base, a Hugging Face model folder, or a hub id (cached, for a local run)."""
    from stages.pretrained import BUILTIN_BASES

    model = spec.base.model
    if model.startswith("builtin:"):
        name = model.removeprefix("builtin:")
        if name not in BUILTIN_BASES:
            raise ValidationFailed(f"base.model: unknown builtin base {name!r}{suggest(name, BUILTIN_BASES)} "
                                   f"(builtin bases: {', '.join(f'builtin:{b}' for b in BUILTIN_BASES)})")
        return []
    path = Path(spec.resolve_path(model)).expanduser()
    if path.exists() or not HUB_ID.fullmatch(model):
        check_model_folder(path, "base.model")
        return []
    if cluster_address(spec) is None and _hub_offline() and not _hub_cached(model, spec.base.revision):
        raise ValidationFailed(
            f"base.model: {model!r} is not a local folder and not in the local Hugging Face cache, and a local run "
            "reads the hub offline (HF_HUB_OFFLINE=1 unless set to 0): download it first "
            f"(huggingface-cli download {model}), give a local folder, or set HF_HUB_OFFLINE=0")
    return [f"base: hub model {model}"]


def check_model_folder(path: Path, key: str) -> None:
    """A folder ``transformers`` loads a model from: ``config.json`` and weights."""
    if not path.exists():
        raise ValidationFailed(f"{key}: {path}: no such folder (expected a Hugging Face model folder, a hub id "
                               "org/name, or builtin:<name>)")
    if not path.is_dir():
        raise ValidationFailed(f"{key}: {path} is a file; expected a Hugging Face model folder (config.json, weights)")
    if not (path / "config.json").is_file():
        found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
        what = "a peft adapter (adapter_config.json), not a full model" if (path / "adapter_config.json").is_file() \
            else "not a Hugging Face model folder"
        raise ValidationFailed(f"{key}: {path} is {what}: it has no config.json (found: {found}); expected a "
                               "folder written by save_pretrained (config.json, *.safetensors, tokenizer files)")
    if not any(next(path.glob(pattern), None) for pattern in WEIGHT_FILES):
        raise ValidationFailed(f"{key}: {path} has config.json but no weights (expected *.safetensors; "
                               "pytorch_model*.bin is a pickle and is not loaded)")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "1").lower() not in ("0", "false", "no", "off")


def _hub_cached(repo: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, "config.json", revision=revision), str)


# --------------------------------------------------------------------------- this machine


def check_machine(spec: PipelineSpec, names: list[str]) -> list[str]:
    """For a local run: GPUs for ``use_gpu``, and each stage's resource plan against the local Ray instance."""
    from stages.resources import InsufficientResources, check_fits, stage_resources

    address = cluster_address(spec)
    if address:
        return [f"ray: joins {address}; each stage's resources are checked there when it starts"]
    plans = {name: stage_resources(spec.stages[name], name) for name in names}
    for name in names:
        scaling = getattr(spec.stages[name], "scaling", None)
        if scaling is not None and scaling.use_gpu and not _gpu_count():
            raise ValidationFailed(
                f"stages.{name}.scaling.use_gpu: true, but this machine has no GPU (torch.cuda.is_available() is "
                "false) and the run starts a local Ray instance (no ray.address, no RAY_ADDRESS); set use_gpu: "
                "false, or join a cluster with GPUs (ray.address)")
    if not spec.ray.check_resources:
        return []
    needs_gpus = any(plan.total["GPU"] for plan in plans.values())
    available = {"CPU": spec.ray.num_cpus or os.cpu_count() or 1,
                 "GPU": spec.ray.num_gpus if spec.ray.num_gpus is not None else (_gpu_count() if needs_gpus else 0)}
    for name, plan in plans.items():
        try:
            check_fits(plan, available)
        except InsufficientResources as err:
            cpus = "ray.num_cpus" if spec.ray.num_cpus else "this machine's CPUs"
            gpus = "ray.num_gpus" if spec.ray.num_gpus is not None else "the GPUs visible here"
            message = str(err).replace("but the Ray cluster has", "but the local Ray instance would have")
            raise ValidationFailed(f"stages.{name}: {message} (no ray.address or RAY_ADDRESS: the run starts a local "
                                   f"instance with {available['CPU']:g} CPU from {cpus} and {available['GPU']:g} GPU "
                                   f"from {gpus})") from None
    return []


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# --------------------------------------------------------------------------- data


def _read_source(path: str, kind: str, format: str | None):
    from stages.sources import load_records

    return load_records(path, kind, format=format)  # every record, not just `limit`


def load_stage_data(spec: PipelineSpec, name: str, lines: list[str], read=_read_source) -> dict[str, Any]:
    """Read every record of every data source of a stage; field -> (DataConfig, kind, the records it trains on)."""
    from stages.data.errors import DataError
    from stages.stage import data_sources

    used = {}
    for field, (data, kind) in data_sources(spec.stages[name]).items():
        key = f"stages.{name}.{field}"
        try:
            loaded = read(spec.resolve_path(data.path), kind, data.format)
            held_out = read(spec.resolve_path(data.eval_path), kind, data.format) if data.eval_path else None
        except DataError as err:
            raise ValidationFailed(f"{key}: {err}") from None
        lines.append(f"{name}.{field}: {data.path} [{loaded.format}] {loaded.read} read, "
                     f"{len(loaded.records)} usable {kind} records, skipped {loaded.skipped or 'none'}")
        if not loaded.records:
            raise ValidationFailed(
                f"{key}: {data.path}: no usable {kind} records: {loaded.read} read, all skipped by the loader "
                f"({_skipped(loaded.skipped)}); fix the records, or data.format (read as {loaded.format})")
        if held_out is not None:
            lines.append(f"{name}.{field}.eval_path: {len(held_out.records)} usable records")
            if not held_out.records:
                raise ValidationFailed(f"{key}.eval_path: {data.eval_path}: no usable {kind} records "
                                       f"({held_out.read} read; {_skipped(held_out.skipped)})")
        records = loaded.records[:data.limit] if data.limit else loaded.records
        if not data.eval_path and data.eval_fraction > 0:
            n_eval = min(max(1, int(len(records) * data.eval_fraction)), data.eval_limit or len(records))
            if len(records) - n_eval < 1:
                raise ValidationFailed(
                    f"{key}.eval_fraction: holding out {n_eval} of the {len(records)} usable records leaves none "
                    "to train on; lower eval_fraction, or give held-out data in eval_path")
        used[field] = (data, kind, records)
    return used


def _skipped(skipped: dict[str, int]) -> str:
    return ", ".join(f"{reason}: {count}" for reason, count in skipped.items()) or "no records"


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelFacts:
    """What the checks read from a model without loading its weights."""

    where: str  # how messages name it: "base.model builtin:tiny-llama"
    tokenizer: Any
    module_names: tuple[str, ...]
    linear_names: tuple[str, ...]  # the distinct last parts of its nn.Linear modules (q_proj, ...)
    context: int | None  # max_position_embeddings
    parameter_names: tuple[str, ...] = ()  # what BitFit would train (its *.bias entries)


def upstream_model(spec: PipelineSpec, name: str, inputs: dict[str, str]) -> tuple[str, str]:
    """Where the stage's starting model comes from, as (kind, source): ("input", folder) when a stage up
    its ``from:`` chain is given with ``--input``, else ("base", base.model). Stages keep the base's
    architecture and tokenizer."""
    node = spec.stages[name].from_
    while node is not None and node != BASE:
        if node in inputs:
            return "input", inputs[node]
        node = spec.stages[node].from_
    return ("input", inputs[BASE]) if BASE in inputs else ("base", spec.base.model)


def model_facts(spec: PipelineSpec, source: tuple[str, str]) -> ModelFacts | None:
    kind, model = source
    if kind == "base" and model.startswith("builtin:"):
        return _builtin_facts(model.removeprefix("builtin:"))
    path = Path(spec.resolve_path(model) if kind == "base" else model).expanduser()
    where = f"base.model {model}" if kind == "base" else f"--input {model}"
    trust = spec.base.trust_remote_code
    if (path / "config.json").is_file():  # an adapter folder given with --input has none: not checked
        return _folder_facts(str(path), (path / "config.json").stat().st_mtime, where, trust, None)
    if kind == "base" and HUB_ID.fullmatch(model) and _hub_cached(model, spec.base.revision):
        return _folder_facts(model, 0.0, where, trust, spec.base.revision)
    return None


@lru_cache(maxsize=4)
def _builtin_facts(name: str) -> ModelFacts:
    """The builtin tiny base as ``stages.tiny_base`` builds it (its defaults), on the meta device: no weights."""
    import torch

    from stages.tiny_base import VARIANTS, build_char_tokenizer, build_llama, build_tiny_base

    defaults = {k: p.default for k, p in inspect.signature(build_tiny_base).parameters.items()
                if p.default is not inspect.Parameter.empty}
    defaults.update(VARIANTS.get(name, {}))  # tiny-llama-bias: biases in every projection
    tokenizer = build_char_tokenizer(model_max_length=defaults["max_position_embeddings"])
    shape = {k: defaults[k] for k in inspect.signature(build_llama).parameters if k in defaults}
    with torch.device("meta"):
        model = build_llama(tokenizer, **shape)
    return _facts(f"base.model builtin:{name}", tokenizer, model)


@lru_cache(maxsize=8)
def _folder_facts(path: str, mtime: float, where: str, trust_remote_code: bool, revision: str | None) -> ModelFacts:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    options = {"trust_remote_code": trust_remote_code, "revision": revision, "local_files_only": True}
    try:
        config = AutoConfig.from_pretrained(path, **options)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - transformers raises many types for unusable configs
        raise ValidationFailed(f"{where}: not a causal language model transformers can build "
                               f"({type(err).__name__}: {str(err).splitlines()[0][:300]})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **options)
    except Exception as err:  # noqa: BLE001
        raise ValidationFailed(f"{where}: cannot load its tokenizer ({type(err).__name__}: "
                               f"{str(err).splitlines()[0][:300]}); expected tokenizer files beside config.json") \
            from None
    return _facts(where, tokenizer, model)


def _facts(where: str, tokenizer, model) -> ModelFacts:
    import torch

    names = tuple(n for n, _ in model.named_modules() if n)
    linear = tuple(sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}))
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    return ModelFacts(where, tokenizer, names, linear, context, tuple(n for n, _ in model.named_parameters()))


def check_stage_model(spec: PipelineSpec, name: str, facts: ModelFacts, data: dict[str, Any],
                      memo: dict | None = None) -> list[str]:
    """Target modules, chat template and TRL's length rules for one training stage."""
    config = spec.stages[name]
    check_target_modules(name, config, facts)
    if config.peft.method == "bitfit" and (problem := bitfit_problem(facts.parameter_names, facts.where)):
        raise ValidationFailed(f"stages.{name}.peft.method: {problem}")
    if not data:
        return []
    template, template_from = stage_template(spec, name, facts)
    needs_markers = config.kind == "sft" and getattr(config, "assistant_only_loss", False)
    if needs_markers and not GENERATION_MARKER.search(template):
        raise ValidationFailed(
            f"stages.{name}.assistant_only_loss: true needs {{% generation %}} markers in the chat template to find "
            f"the assistant tokens, and {template_from} has none; set stages.{name}.chat_template to chatml, alpaca "
            "or vicuna (they have the markers), or assistant_only_loss: false")
    return check_lengths(name, config, facts, template, data, {} if memo is None else memo)


def check_method_support(spec: PipelineSpec, name: str, inputs: dict[str, str]) -> None:
    """``stages.method_support``: the stage's peft method against its kind, ZeRO stage and rollout engine
    (every training kind, PPO and GRPO included), and each upstream it takes a model from must be one a
    later stage can load as full weights (not given with ``--input``: that folder is checked as it is)."""
    config = spec.stages[name]
    if isinstance(config, TrainingStageConfig):
        rollout = getattr(config, "rollout", None)
        if problem := support_problem(config.kind, config.peft, config.deepspeed.zero_stage,
                                      getattr(rollout, "engine", None)):
            key, _, rest = problem.partition(": ")
            raise ValidationFailed(f"stages.{name}.{key}: {rest}")
    for role, upstream in config.upstream().items():
        source = spec.stages.get(upstream)
        if upstream in inputs or not isinstance(source, TrainingStageConfig):
            continue
        if problem := consumer_problem(upstream, source.peft.method):
            raise ValidationFailed(f"stages.{name}.{role.split('[')[0]}: {problem}")


def check_target_modules(name: str, config: TrainingStageConfig, facts: ModelFacts) -> None:
    """LoRA ``target_modules`` (names: a module's last parts; a string: a regex over full names) and
    ``modules_to_save`` must name modules the model has (peft would skip a missing name, or fail in a worker)."""
    peft = config.peft
    if peft.method in ("full", "prompt_tuning", "prefix_tuning", "adapter"):  # no target modules
        return
    names = facts.module_names + (("score",) if config.kind == "reward" else ())
    for field, targets in (("target_modules", peft.target_modules), ("modules_to_save", peft.modules_to_save)):
        if targets is None or targets == "all-linear":
            continue
        if isinstance(targets, str):  # a regex (stages.config.PeftConfig checks that it compiles)
            missing = [] if any(re.fullmatch(targets, n) for n in names) else [targets]
        else:
            missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
        if missing:
            raise ValidationFailed(
                f"stages.{name}.peft.{field}: {facts.where} has no module {' or '.join(map(repr, missing))}"
                f"{suggest(missing[0], facts.linear_names)} (its linear layers: {', '.join(facts.linear_names)}; "
                "or all-linear)")


def stage_template(spec: PipelineSpec, name: str, facts: ModelFacts) -> tuple[str, str]:
    """The chat template a stage trains with: its own ``chat_template``, else the nearest one up its
    ``from:`` chain (a stage saves the tokenizer with the template it applied), else the model's own."""
    from stages.chat_templates import TEMPLATES

    node = name
    while node in spec.stages:
        choice = spec.stages[node].chat_template
        if choice in TEMPLATES:
            return TEMPLATES[choice], f"chat_template {choice}"
        node = spec.stages[node].from_
    own = facts.tokenizer.chat_template
    if not isinstance(own, str) or not own:
        raise ValidationFailed(f"stages.{name}.chat_template: the tokenizer of {facts.where} has no chat template; "
                               "set chat_template: chatml, alpaca or vicuna")
    return own, f"the chat template of {facts.where}"


def check_lengths(name: str, config: TrainingStageConfig, facts: ModelFacts, template: str,
                  data: dict[str, Any], memo: dict) -> list[str]:
    """TRL's length rules (``stages.training_data.length_rule``) must keep records; PPO prompts must fit the context.
    ``memo``: token lengths already measured, by (source, kind, measure, template, model)."""
    from stages.training_data import length_rule, token_lengths

    def measured(source, kind, records, measure):
        key = (source.path, source.format, source.limit, kind, measure, template, facts.where)
        if key not in memo:
            try:
                memo[key] = token_lengths(records, measure, facts.tokenizer, template)
            except Exception as err:  # noqa: BLE001 - jinja's TemplateError and friends
                raise ValidationFailed(f"stages.{name}.chat_template: the chat template cannot render the records "
                                       f"of {source.path} ({type(err).__name__}: {err}); choose chatml, alpaca or "
                                       "vicuna") from None
        return memo[key]

    lines = []
    for field, (source, kind, records) in data.items():
        key = f"stages.{name}.{field}"
        if config.kind == "ppo":
            check_context(key, config, facts, source, records, measured(source, kind, records, "prompt"))
            continue
        rule = length_rule(config.kind, getattr(config, "assistant_only_loss", True), getattr(config, "packing", False),
                           kind)
        if rule is None:
            continue
        max_length = config.train.max_length
        lengths = measured(source, kind, records, rule.measure)
        dropped = sum(not rule.keeps(n, max_length) for n in lengths)
        if dropped == len(lengths):
            need = min(lengths) + (1 if rule.strict else 0)
            raise ValidationFailed(
                f"{key}: {source.path}: all {len(lengths)} {kind} records the stage trains on would be dropped for "
                f"length: {rule.what} is {'at least' if rule.strict else 'over'} train.max_length ({max_length} "
                f"tokens) in every one, which TRL drops (shortest {min(lengths)} tokens, median {_median(lengths)}); "
                f"raise stages.{name}.train.max_length to at least {need} (to keep half: "
                f"{_median(lengths) + (1 if rule.strict else 0)}), or use shorter records")
        if dropped:
            lines.append(f"{name}.{field}: {dropped} of {len(lengths)} records would be dropped for length "
                         f"({rule.what} against train.max_length {max_length})")
    return lines


def check_context(key: str, config, facts: ModelFacts, source, records: list, lengths: list[int]) -> None:
    """Every PPO prompt plus ``rollout.max_new_tokens`` must fit the model's context (vLLM refuses longer ones)."""
    room = (facts.context or 0) - config.rollout.max_new_tokens
    too_long = [i for i, n in enumerate(lengths) if facts.context and n > room]
    if not too_long:
        return
    first = too_long[0]
    text = records[first].prompt[-1].content
    shown = text[:40] + ("..." if len(text) > 40 else "")
    raise ValidationFailed(
        f"{key}: {source.path}: prompt record {first + 1} ({shown!r}) is {lengths[first]} tokens, and with "
        f"rollout.max_new_tokens ({config.rollout.max_new_tokens}) that is over the model's context of "
        f"{facts.context} tokens (max_position_embeddings of {facts.where}); {len(too_long)} of {len(lengths)} "
        f"prompts are longer than {room} tokens: filter them out, lower rollout.max_new_tokens, or use a model "
        "with a longer context")


def _median(values: list[int]) -> int:
    return int(statistics.median(values)) if values else 0
