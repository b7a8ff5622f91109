"""The rollout interface: sampling parameters, results, the engine ABC and a lazy registry.

Every engine takes prompts as token ids (or strings, tokenized by the engine with the model's
tokenizer, ``add_special_tokens`` as configured) and returns one :class:`Rollout` per sample, the
``n`` samples of a prompt next to each other.

Log-probs convention (both engines): ``Rollout.logprobs[t]`` is ``log softmax(logits)[token]`` of
the model as loaded in the engine (base weights plus the active LoRA adapter, if any), **before any
sampling processor**: no temperature, top-k or top-p. These are "temperature-1 raw log-probs"
(vLLM calls this ``logprobs_mode="raw_logprobs"``, its default; HF gets them from
``generate(output_logits=True)``). They are what a policy-gradient loss and a KL term need, and
what :meth:`RolloutEngine.score` returns for the same tokens (teacher forcing).

Heavy imports (torch, transformers, vllm) happen only inside the engine modules, and an engine's
module is imported only when that engine is chosen by name: ``import stages.rollout`` never
imports vllm.
"""

from __future__ import annotations

import importlib
import json
import os
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

# vLLM's allowed `max_lora_rank` values (`vllm.config.lora.MaxLoRARanks`, vLLM 0.32). Used when
# vllm cannot be imported here; `vllm_lora_ranks()` reads the installed vLLM's list otherwise.
VLLM_LORA_RANKS_FALLBACK: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass
class SamplingParams:
    """What to sample. ``temperature == 0`` means greedy (top_p/top_k/seed are then ignored).

    ``top_k <= 0`` disables top-k. ``seed``: sample ``k`` of a call (``k = prompt_index * n + j``)
    is drawn with seed ``seed + k`` on vLLM (per-request seeds, so results do not depend on how
    the prompts are batched or split across engines); on HF the whole call is seeded once with
    ``seed`` (reproducible for the same batch, not split-invariant). Generation always stops at
    the tokenizer's EOS and at any of ``stop_token_ids``.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    seed: int | None = None
    stop_token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_seed_offset(self, offset: int) -> "SamplingParams":
        """A copy whose seed is shifted by ``offset`` (None stays None); used to split a batch."""
        if self.seed is None or offset == 0:
            return self
        return SamplingParams(**{**asdict(self), "seed": self.seed + offset})


@dataclass
class Rollout:
    """One sample. ``response_ids`` include the terminating EOS/stop token when there is one.

    ``logprobs[t]`` is the raw (temperature-1, unprocessed) log-prob of ``response_ids[t]``, see
    the module docstring. ``finished`` is True when generation ended on EOS or a stop token, False
    when it was cut by ``max_new_tokens``. ``response_text`` is decoded without special tokens.
    ``ref_logprobs``: the reference policy's log-probs of the response at the sampling temperature, when
    the engine's actor holds the reference (``RolloutWorker(reference=True)``). ``weights_version``: the
    trainer step of the weights that generated it (0: the starting model, also after a restart), where
    the engine is driven through ``RolloutWorker`` or ``LocalEngines``.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    response_text: str
    logprobs: list[float]
    finished: bool
    ref_logprobs: list[float] | None = None
    weights_version: int | None = None


@dataclass
class SyncInfo:
    """How a weight update was applied and how long it took (wall-clock seconds)."""

    method: str
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)


# --- weight sources ------------------------------------------------------------------------

FULL_PATH, LORA_PATH, STATE_DICT = "full_path", "lora_path", "state_dict"


def classify_weight_source(source: Any) -> str:
    """``"state_dict"`` (a mapping name -> tensor), ``"lora_path"`` (a folder with
    ``adapter_config.json``) or ``"full_path"`` (a folder with ``config.json``)."""
    if isinstance(source, Mapping):
        if not source:
            raise ValueError("update_weights got an empty state_dict")
        return STATE_DICT
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if (path / "adapter_config.json").is_file():
            return LORA_PATH
        if (path / "config.json").is_file():
            return FULL_PATH
        raise ValueError(
            f"update_weights: {path} is neither a peft adapter folder (adapter_config.json) "
            "nor a Hugging Face model folder (config.json)"
        )
    raise TypeError(
        "update_weights takes a model folder, a peft adapter folder or a state_dict "
        f"(mapping name -> tensor), got {type(source).__name__}"
    )


def read_adapter_config(path: str | os.PathLike) -> dict:
    return json.loads((Path(path) / "adapter_config.json").read_text())


def adapter_rank(adapter_config: dict) -> int:
    """The largest LoRA rank used anywhere in the adapter (``r`` and any ``rank_pattern``)."""
    ranks = [int(adapter_config.get("r") or 0)]
    ranks += [int(v) for v in (adapter_config.get("rank_pattern") or {}).values()]
    return max(ranks)


def vllm_lora_ranks() -> tuple[int, ...]:
    """vLLM's allowed ``max_lora_rank`` values, from the installed vLLM when it imports."""
    try:
        import typing

        from vllm.config.lora import MaxLoRARanks  # type: ignore[import-not-found]

        ranks = tuple(int(r) for r in typing.get_args(MaxLoRARanks))
        if ranks:
            return ranks
    except Exception:  # noqa: BLE001 - vllm absent or moved: use the recorded list
        pass
    return VLLM_LORA_RANKS_FALLBACK


def choose_max_lora_rank(rank: int, allowed: Sequence[int] | None = None) -> int:
    """The smallest allowed vLLM ``max_lora_rank`` that holds an adapter of rank ``rank``."""
    allowed = tuple(sorted(allowed or vllm_lora_ranks()))
    for value in allowed:
        if value >= rank:
            return value
    raise ValueError(
        f"LoRA rank {rank} is larger than any rank vLLM supports (max_lora_rank must be one of "
        f"{list(allowed)}); train the adapter with r <= {allowed[-1]}"
    )


def validate_max_lora_rank(max_lora_rank: int, allowed: Sequence[int] | None = None) -> None:
    allowed = tuple(sorted(allowed or vllm_lora_ranks()))
    if max_lora_rank not in allowed:
        raise ValueError(
            f"max_lora_rank={max_lora_rank} is not a rank vLLM accepts; use one of {list(allowed)} "
            f"(e.g. {choose_max_lora_rank(max_lora_rank, allowed)})"
        )


def validate_lora_for_vllm(
    adapter_config: dict, max_lora_rank: int | None, allowed: Sequence[int] | None = None
) -> int:
    """Raise a clear ``ValueError`` unless vLLM can serve this adapter; returns its rank."""
    allowed = tuple(sorted(allowed or vllm_lora_ranks()))
    rank = adapter_rank(adapter_config)
    if rank < 1:
        raise ValueError(f"adapter_config.json has no usable LoRA rank r (got {adapter_config.get('r')!r})")
    choose_max_lora_rank(rank, allowed)  # raises when no vLLM rank is big enough
    if max_lora_rank is not None and rank > max_lora_rank:
        raise ValueError(
            f"LoRA adapter rank {rank} exceeds this engine's max_lora_rank={max_lora_rank}; create "
            f"the engine with max_lora_rank={choose_max_lora_rank(rank, allowed)} (vLLM accepts "
            f"{list(allowed)})"
        )
    if adapter_config.get("use_dora"):
        raise ValueError("DoRA adapters (use_dora=True) are not supported by vLLM")
    return rank


# --- the interface -------------------------------------------------------------------------


class RolloutEngine(ABC):
    """Generation, teacher-forced scoring and weight sync behind one small interface."""

    name: str = "?"
    # The trainer step of the weights it serves, recorded by the in-process driver that applied them
    # (LocalEngines; several of them may wrap one engine). RolloutWorker keeps its own, per actor process.
    weights_version: int = 0

    @abstractmethod
    def generate(
        self, prompts: Sequence[Sequence[int]] | Sequence[str], params: SamplingParams
    ) -> list[Rollout]:
        """``len(prompts) * params.n`` rollouts; the ``n`` samples of prompt ``i`` are at
        ``[i*n, (i+1)*n)``."""

    @abstractmethod
    def score(
        self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]
    ) -> list[list[float]]:
        """Raw log-probs of each ``response_ids[i]`` given ``prompt_ids[i]`` (teacher forcing)."""

    @abstractmethod
    def update_weights(self, source: Any) -> SyncInfo:
        """Load new weights: a full HF model folder, a peft adapter folder or a state_dict."""

    @property
    def active_adapter(self) -> str | None:
        """The name of the LoRA adapter every call uses now (a new one per adapter update), or None."""
        return None

    # -- streamed full weights (stages.rollout.weight_stream); optional: the default makes the caller
    #    fall back to update_weights(state_dict) --

    def weight_group_size(self) -> int:
        """How many processes of this engine hold weights and join a weight-stream group (vLLM: its TP workers)."""
        raise NotImplementedError(f"the {self.name!r} engine cannot receive streamed weights")

    def join_weight_group(self, host: str, port: int, first_rank: int, world: int, backend: str,
                          timeout_s: float) -> int:
        """Join the trainer's group as ranks ``first_rank ..``; blocks until it is formed; returns the ranks taken."""
        raise NotImplementedError(f"the {self.name!r} engine cannot receive streamed weights")

    def receive_weights(self, metas: Sequence[tuple[str, str, tuple[int, ...]]], bucket_bytes: int) -> SyncInfo:
        """Take the broadcasts described by ``metas`` (name, dtype, shape, in send order; bucketed as
        ``weight_stream.bucket_plan(metas, bucket_bytes)``) as the new full weights."""
        raise NotImplementedError(f"the {self.name!r} engine cannot receive streamed weights")

    def sleep(self) -> None:  # noqa: B027 - optional
        """Free accelerator memory between rollouts where supported; otherwise a no-op."""

    def wake(self) -> None:  # noqa: B027 - optional
        """Undo :meth:`sleep`; a no-op where unsupported."""

    def close(self) -> None:  # noqa: B027 - optional
        """Release the engine's resources (processes, memory)."""

    # -- helpers shared by engines --

    tokenizer: Any = None
    add_special_tokens: bool = True

    def encode_prompts(self, prompts: Sequence[Sequence[int]] | Sequence[str]) -> list[list[int]]:
        out: list[list[int]] = []
        for p in prompts:
            if isinstance(p, str):
                out.append(list(self.tokenizer(p, add_special_tokens=self.add_special_tokens)["input_ids"]))
            else:
                out.append([int(t) for t in p])
            if not out[-1]:
                raise ValueError("empty prompt")
        return out

    def stop_ids(self, params: SamplingParams) -> list[int]:
        eos = self.tokenizer.eos_token_id
        ids = [] if eos is None else [int(eos)]
        for t in params.stop_token_ids or []:
            if int(t) not in ids:
                ids.append(int(t))
        return ids


class EngineRestarted(RuntimeError):
    """Rollout engine(s) died during ``call`` and Ray restarted them on their starting model: they need
    the current weights before the call is retried."""

    def __init__(self, engines: list[int], call: str, cause: str) -> None:
        which = f" {engines}" if engines else ""
        super().__init__(f"rollout engine(s){which} died during {call} and were restarted ({cause})")
        self.engines, self.call = engines, call


def serving_report(engine: RolloutEngine, version: int, prompt_ids: Sequence[int], response_ids: Sequence[int],
                   **extra: Any) -> dict:
    """What one engine serves: the weights version it applied last, its adapter, and its log-probs of a
    fixed probe (``score`` of one prompt+response), for the trainer to compare with its own."""
    return {"engine": engine.name, "version": version, "adapter": engine.active_adapter,
            "logprobs": engine.score([list(prompt_ids)], [list(response_ids)])[0], **extra}


def vllm_cpu_env_vars(prefix: str | None = None, kv_cache_gib: int | str = 1) -> dict[str, str]:
    """Env vars the vLLM CPU build needs in the processes that run the model:
    ``VLLM_CPU_KVCACHE_SPACE`` (GiB) and, only if ``<prefix>/lib/libiomp5.so`` exists,
    ``LD_PRELOAD``. ``prefix`` defaults to this interpreter's ``sys.prefix`` (its venv)."""
    import sys

    env = {"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib)}
    lib = Path(prefix or sys.prefix) / "lib" / "libiomp5.so"
    if lib.is_file():
        env["LD_PRELOAD"] = str(lib)
    return env


# --- registry ------------------------------------------------------------------------------

# name -> "module:class"; imported only when chosen.
ENGINES: dict[str, str] = {
    "hf": "stages.rollout.hf_engine:HFEngine",
    "vllm": "stages.rollout.vllm_engine:VLLMEngine",
}


def register_engine(name: str, target: str) -> None:
    """Register ``"module:Class"`` under ``name`` (lazy: nothing is imported now)."""
    ENGINES[name] = target


def vllm_status() -> tuple[bool, str]:
    """(True, version) when ``import vllm`` works in this process, else (False, the reason)."""
    try:
        import vllm  # type: ignore[import-not-found]
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install (torchvision ops)
        return False, f"import vllm failed: {type(exc).__name__}: {exc}"
    return True, str(getattr(vllm, "__version__", "?"))


# `auto` on a machine without a GPU picks vLLM only for models this big (benchmarks/engine_compare.py,
# 2-core CPU: on a 99M Llama vLLM decoded 1.6-2.3x faster than hf and repaid its ~95-136 s start after
# ~20k tokens; on the 0.5M tiny model it was 0.25-0.77x at 8-token answers and repaid its start only after
# 200k-1M tokens).
AUTO_VLLM_MIN_PARAMETERS_ON_CPU = 50_000_000


def saved_parameters(model_path: str | os.PathLike) -> int | None:
    """Parameters in a saved HF folder, read from the safetensors headers (no weights loaded); None if unknown."""
    import math

    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    for path in files:
        with safe_open(str(path), "pt") as handle:
            total += sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())
    return total


def resolve_engine_name(name: str, model_path: str | os.PathLike | None = None) -> str:
    """``"auto"`` -> ``"vllm"`` when vllm imports in this process and either a GPU is visible or the model
    (when ``model_path`` is given) has at least :data:`AUTO_VLLM_MIN_PARAMETERS_ON_CPU` parameters; else ``"hf"``."""
    if name == "auto":
        if not vllm_status()[0]:
            return "hf"
        if model_path is None or _cuda_visible():
            return "vllm"
        params = saved_parameters(model_path)
        return "vllm" if params is None or params >= AUTO_VLLM_MIN_PARAMETERS_ON_CPU else "hf"
    if name not in ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}; known: {sorted(ENGINES)} or 'auto'")
    return name


def _cuda_visible() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def engine_class(name: str) -> type[RolloutEngine]:
    name = resolve_engine_name(name)
    module_name, _, class_name = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def create_engine(name: str, model_path: str | os.PathLike, **kwargs: Any) -> RolloutEngine:
    """Build the engine registered as ``name`` (``"hf"``, ``"vllm"`` or ``"auto"``)."""
    return engine_class(resolve_engine_name(name, model_path))(model_path, **kwargs)


def split_ranges(count: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous, balanced [start, end) ranges of ``count`` items over ``parts`` engines; empty ranges dropped."""
    base, extra = divmod(count, parts)
    ranges, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        if end > start:
            ranges.append((start, end))
        start = end
    return ranges

