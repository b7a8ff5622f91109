"""The ``eval`` stage's config (``kind: eval``): the models, the held-out data, how to generate."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from stages.config import ChatTemplateChoice, ConfigModel, DataConfig, DataSection, StageConfig, suggest
from stages.evaluate.few_shot import exemplar_source
from stages.stage import StageKind
from stages.tasks import TASKS


class EvalGenerationConfig(ConfigModel):
    """How the eval stage samples: the rollout engines of ``stages.rollout`` in a Ray Data actor pool."""

    engine: Literal["auto", "hf", "vllm"] = Field("auto", description="auto: vllm where it imports, else hf.")
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0.0, description="0: greedy (the default).")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = 0
    num_samples: int = Field(
        4, ge=0, description="Samples per prompt (temperature 1) for the KL estimate; 0 skips KL."
    )
    kl_prompts: int = Field(32, ge=1, description="Prompts (the first ones) sampled for the KL estimate.")
    batch_size: int = Field(32, ge=1, description="Rows per Ray Data batch.")
    concurrency: int = Field(1, ge=1, description="Engine actors in each model's Ray Data actor pool.")
    max_concurrent_models: int = Field(
        1, ge=1, description="Models evaluated at once, each in its own Ray Data pass and actor pool (its "
                             "resources each); the results are the same at any setting.")
    cpus_per_actor: float = Field(1, gt=0)
    gpus_per_actor: float = Field(0, ge=0)
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Passed to the engine constructor.")


class EvalTaskConfig(ConfigModel):
    """A verifier task; ``data`` absent: ``builtin:<name>/test`` for generator tasks, else the
    ``prompts:`` records that carry an answer (GSM8K files)."""

    name: str
    data: DataSection | None = None
    few_shot_data: DataSection | None = Field(
        None, description="With few_shot: the solved training exemplars (prompt records with an answer, or SFT "
                          "conversations); default builtin:<task>/train for generator tasks. Never the held-out set: "
                          "exemplars equal to a held-out prompt are left out.")

    @field_validator("name")
    @classmethod
    def _known_task(cls, value: str) -> str:
        if value not in TASKS:
            raise ValueError(f"unknown task {value!r}{suggest(value, TASKS)} (valid: {', '.join(sorted(TASKS))})")
        return value



class EvalConfig(StageConfig):
    """Compare models on held-out prompts (verifier accuracy, reward-model score, win rate and KL
    against a reference, perplexity, implicit-reward ranking); see ``stages.evaluate``."""

    kind: Literal["eval"] = "eval"
    # task_data: a property, the tasks' prompt files (builtin:<task>/test by default)
    # few_shot_data: a property, the tasks' exemplar sources when few_shot > 0 (builtin:<task>/train by default)
    data_inputs: ClassVar[dict[str, str]] = {"prompts": "prompt", "task_data": "prompt", "sft_data": "sft",
                                             "preference_data": "preference", "few_shot_data": "prompt"}
    models: list[str] = Field(min_length=1, description="Stages (and base) to evaluate.")
    reward: str | None = Field(None, description="Reward stage that scores responses (and judges win rates).")
    reference: str | None = Field(
        None, description="Model compared against (win rate, KL); default: the first sft stage in models, else the first."
    )
    prompts: list[DataSection] = Field(default_factory=list, description="Held-out prompt sets (any prompt format).")
    tasks: list[EvalTaskConfig] = Field(default_factory=list, description="Verifier tasks: addition, gsm8k, ...")
    sft_data: DataSection | None = Field(None, description="Held-out SFT data for perplexity.")
    preference_data: DataSection | None = Field(None, description="Held-out pairs for implicit-reward ranking.")
    generation: EvalGenerationConfig = EvalGenerationConfig()
    max_prompts: int | None = Field(200, ge=1, description="At most this many prompts (and examples) per set.")
    num_examples: int = Field(5, ge=0, description="Sample responses per model kept for the report.")
    chat_template: ChatTemplateChoice = Field(None, description="None: each model's own; or chatml, alpaca, vicuna.")
    few_shot: int = Field(
        0, ge=0, description="In-context k-shot: each task prompt is preceded by k solved exemplars from the task's "
                             "training data (tasks[i].few_shot_data) as earlier user/assistant turns "
                             "(stages.evaluate.few_shot). 0: the prompts as they are.")
    few_shot_seed: int = Field(0, description="Seeds which exemplars each held-out prompt gets (reproducible).")

    upstream_fields: ClassVar[tuple[str, ...]] = ("models", "reward", "reference")

    @field_validator("prompts", mode="before")
    @classmethod
    def _prompts_shorthand(cls, value: Any) -> Any:
        return [v for v in (value if isinstance(value, list) else [value]) if v is not None]

    @field_validator("tasks", mode="before")
    @classmethod
    def _tasks_shorthand(cls, value: Any) -> Any:
        values = value if isinstance(value, list) else [value]
        return [{"name": v} if isinstance(v, str) else v for v in values if v is not None]


    @model_validator(mode="after")
    def _consistent(self) -> EvalConfig:
        if self.from_ is not None:
            raise ValueError("eval compares the stages listed in `models:`; it has no `from:`")
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"models: listed twice: {sorted({m for m in self.models if self.models.count(m) > 1})}")
        if not (self.prompts or self.tasks or self.sft_data or self.preference_data):
            raise ValueError("eval needs something to evaluate on: prompts, tasks, sft_data or preference_data")
        return self

    @model_validator(mode="after")
    def _few_shot_has_exemplars(self) -> EvalConfig:
        """few_shot needs tasks with training exemplars; few_shot_data and few_shot_seed need few_shot."""
        if self.few_shot == 0:
            given = [f"tasks[{i}].few_shot_data" for i, t in enumerate(self.tasks) if t.few_shot_data is not None]
            given += ["few_shot_seed"] if "few_shot_seed" in self.model_fields_set else []
            if given:
                raise ValueError(f"{', '.join(given)} applies with few_shot > 0 (few_shot is 0: no exemplars)")
            return self
        if not self.tasks:
            raise ValueError(f"few_shot is {self.few_shot}: it puts solved exemplars of a task before the task's "
                             "prompts, but the eval has no tasks (plain prompts: sets have no answers to show)")
        for i, task in enumerate(self.tasks):
            if task.few_shot_data is None and not TASKS[task.name].has_generator:
                raise ValueError(f"few_shot is {self.few_shot}, but task {task.name!r} has no built-in training split; "
                                 f"give its solved training examples as tasks[{i}].few_shot_data (e.g. the GSM8K "
                                 "train file), never its test file")
        return self

    def gate_columns(self) -> list[str]:
        """The summary columns every evaluated model gets (stages.evaluate.stage.summary_row); a gate names
        one as NAME[model]. ``accuracy`` is ``accuracy/<task>`` when there is one task."""
        columns = [f"accuracy/{task.name}" for task in self.tasks] + (["accuracy"] if len(self.tasks) == 1 else [])
        columns += ["length", "kl"] + (["reward_mean", "win_rate", "ties"] if self.reward else [])
        columns += (["perplexity"] if self.sft_data else []) + (["pref_accuracy"] if self.preference_data else [])
        return columns

    def gate_metric_problem(self, name: str, model: str | None) -> str | None:
        if model is None:
            return f"name the evaluated model: {name}[{self.models[0]}] (models: {', '.join(self.models)})"
        if model not in self.models:
            return f"{model!r} is not evaluated here{suggest(model, self.models)} (models: {', '.join(self.models)})"
        if name in self.gate_columns() or any(name.startswith(f"accuracy/{t.name}/") for t in self.tasks):
            return None
        return (f"the eval reports no {name!r}{suggest(name, self.gate_columns())} "
                f"(columns: {', '.join(self.gate_columns())})")

    def gate_value(self, metrics: dict, name: str, model: str | None):
        row = (metrics.get(model) or {}).get("summary", {})
        if name == "accuracy" and len(self.tasks) == 1:
            name = f"accuracy/{self.tasks[0].name}"
        return row.get(name)

    @property
    def task_data(self) -> list[DataConfig]:
        """The prompt files of the tasks (``builtin:<task>/test`` for generator tasks); fingerprinted as data."""
        out = []
        for task in self.tasks:
            if task.data is not None:
                out.append(task.data)
            elif TASKS[task.name].has_generator:
                out.append(DataConfig(path=f"builtin:{task.name}/test"))
        return out

    @property
    def few_shot_data(self) -> list[DataConfig]:
        """The tasks' exemplar sources when few_shot > 0 (``builtin:<task>/train`` by default); read at
        validate and fingerprinted as data."""
        sources = (exemplar_source(task, self.few_shot) for task in self.tasks)
        return [s for s in sources if s is not None]


STAGE = StageKind("eval", EvalConfig, run="stages.evaluate.stage:run")
