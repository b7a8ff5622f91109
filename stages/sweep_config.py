"""A training stage's ``sweep:`` section: the Ray Tune search over its own settings (``pipeline.sweep``
runs it as a node of the DAG; the best trial's model is the stage's output).

    sft:
      data: builtin:addition
      sweep:
        search_space:
          peft.r: [4, 8, 16]                         # a list is a grid
          train.lr_schedule: [cosine, constant]
          train.lr: {loguniform: [1.0e-4, 3.0e-3]}  # sampled: search random, num_samples draws
        search: grid
        seed: 0
        metric: final_loss
        mode: min
        scheduler: {name: asha, grace_period: 2, reduction_factor: 2}

A PPO/GRPO stage reports every iteration; its sweep follows a value each iteration logs
(``PPOConfig.iteration_metrics``), e.g. ``metric: final_reward_mean, mode: max``.
"""

from __future__ import annotations

import difflib
import typing
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from stages.config_base import ConfigModel


class SearchDimension(ConfigModel):
    """One swept value: exactly one of grid (every value), choice, uniform, loguniform, randint (sampled)."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = Field(None, description="[low, high): high is excluded.")

    @model_validator(mode="after")
    def _exactly_one(self) -> SearchDimension:
        given = [name for name in type(self).model_fields if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice, uniform, loguniform, randint (got {given or 'none'})")
        values = getattr(self, given[0])
        if given[0] in ("grid", "choice") and not values:
            raise ValueError(f"{given[0]}: needs at least one value")
        if given[0] in ("uniform", "loguniform", "randint") and not values[0] < values[1]:
            raise ValueError(f"{given[0]}: expected [low, high] with low < high")
        if given[0] == "loguniform" and values[0] <= 0:
            raise ValueError("loguniform: low must be > 0")
        return self


class SchedulerConfig(ConfigModel):
    """Early stopping of trials. ``asha``: Tune's ASHAScheduler over the trials' logged steps (each
    trial reports the metric at every ``train.logging_steps``, a PPO/GRPO trial at every iteration); ``none``:
    every trial runs to the end."""

    name: Literal["asha", "none"] = "asha"
    grace_period: int = Field(2, ge=1, description="Reports a trial makes before it can be stopped.")
    reduction_factor: float = Field(2.0, gt=1.0, description="1/reduction_factor of the trials go on at each rung.")
    max_t: int = Field(1000, ge=1, description="Reports after which a trial always completes (ASHA's last rung "
                                               "is at most max_t).")


class SweepConfig(ConfigModel):
    """A Ray Tune sweep of this stage's settings; the stage's output is the best trial's model."""

    search_space: dict[str, SearchDimension] = Field(
        description="Stage key path (peft.r, peft.alpha, train.lr, train.lr_schedule, train.warmup_ratio, ...) "
                    "-> values; a plain list is a grid."
    )
    search: Literal["grid", "random"] = Field(
        "grid", description="grid: every grid point, num_samples times (sampled keys drawn for each); random: "
                            "num_samples draws, grids drawn from as choices. Both seeded."
    )
    seed: int = Field(0, description="Seed of the random search: the same seed draws the same trials.")
    num_samples: int = Field(1, ge=1, description="grid: repeats of every grid point; random: draws.")
    metric: str = Field("final_loss", description="A metric the stage reports (what its gate may name).")
    mode: Literal["min", "max"] = "min"
    max_concurrent_trials: int = Field(1, ge=1, description="Trials in flight; each needs the stage's whole scaling.")
    scheduler: SchedulerConfig = SchedulerConfig()
    trial_cpus: float = Field(
        0.0, ge=0.0, description="CPUs held by each trial's driver; 0: it holds only memory, leaving CPUs to workers."
    )

    @field_validator("search_space", mode="before")
    @classmethod
    def _grid_shorthand(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: {"grid": v} if isinstance(v, list) else v for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> SweepConfig:
        if not self.search_space:
            raise ValueError("search_space: empty; give at least one key, e.g. {peft.r: [8, 16]}")
        return self

    def step_metric(self) -> str | None:
        """The name the trainer logs at every step for ``metric``, for early stopping: final_loss -> loss;
        a PPO stage's final_/last_/late_reward_mean -> reward_mean (its last value, or its mean over the
        last quarter of the iterations, follow the same curve)."""
        if self.metric == "best_eval_loss":
            return "eval_loss"
        prefix = next((p for p in ("final_", "last_", "late_") if self.metric.startswith(p)), None)
        return self.metric.removeprefix(prefix) if prefix else None


# --------------------------------------------------------------------------- trials


def trial_config(config: BaseModel, overrides: dict[str, Any]) -> BaseModel:
    """The stage config one trial trains: ``key.path: value`` overrides applied, without the sweep (and
    its gate, which judges the promoted model). Built from the keys the user set (``exclude_unset``), so
    a trial's config equals what a pipeline file with the same values gives, fingerprint included."""
    raw = config.model_dump(mode="json", by_alias=True, exclude_unset=True, exclude={"sweep", "gate"})
    for key, value in overrides.items():
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            if isinstance(node.get(part), str):  # the data: shorthand
                node[part] = {"path": node[part]}
            node = node.setdefault(part, {})
        node[last] = value
    return type(config).model_validate(raw)


def key_problem(model: type[BaseModel], key: str) -> str | None:
    """Why ``key`` (a dotted path) is not a sweepable value of the config class ``model``."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = {f.alias or name: f for name, f in model.model_fields.items()}
        field = fields.get(part)
        if field is None or part in ("kind", "from", "sweep", "gate"):
            keys = sorted(k for k in fields if k not in ("kind", "from", "sweep", "gate"))
            close = difflib.get_close_matches(part, keys, n=1)
            return (f"{part!r} is not a sweepable key of {'.'.join(parts[:i]) or 'the stage'}"
                    f"{f'; did you mean {close[0]}?' if close else ''} (keys: {', '.join(keys)})")
        section = _section_class(field.annotation)
        if i < len(parts) - 1 and section is None:
            return f"{part!r} is a value, not a section"
        if i == len(parts) - 1 and section is not None:
            return f"{part!r} is a section; sweep one of its keys"
        model = section
    return None


def _section_class(annotation: Any) -> type[BaseModel] | None:
    """The config class a field holds (``CriticConfig | None`` included), None for a plain value."""
    candidates = [annotation, *typing.get_args(annotation)]
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)


def checked_space(config: BaseModel) -> dict[str, SearchDimension]:
    """The sweep's space with every key checked and every listed value validated as the stage reads it
    (YAML reads 1e-3 as a string: the trial gets the float); a ValueError names the key."""
    space = {}
    for key, dimension in config.sweep.search_space.items():
        if problem := key_problem(type(config), key):
            raise ValueError(f"sweep.search_space.{key}: {problem}")
        listed = "grid" if dimension.grid is not None else "choice" if dimension.choice is not None else None
        if listed is None:
            space[key] = dimension
            continue
        values = []
        for value in getattr(dimension, listed):
            try:
                node: Any = trial_config(config, {key: value})
            except ValidationError as err:
                detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
                raise ValueError(f"sweep.search_space.{key}: value {value!r} is not valid: {detail}") from None
            for part in key.split("."):
                node = getattr(node, part)
            values.append(node)
        space[key] = SearchDimension(**{listed: values})
    return space
