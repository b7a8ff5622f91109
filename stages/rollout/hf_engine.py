"""The ``hf`` rollout engine: ``transformers`` ``generate`` with a KV cache, batched, left padded.

Log-probs come from ``generate(output_logits=True)``: the model's raw logits at each step, before
temperature/top-k/top-p, through ``log_softmax`` (see ``stages.rollout.base``). ``score`` is one
teacher-forced forward per batch. Weight sync: full folders are reloaded, state_dicts are copied
into the live model, peft adapters are loaded with peft and replace the previous adapter.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from stages.rollout.base import (
    FULL_PATH,
    LORA_PATH,
    Rollout,
    RolloutEngine,
    SamplingParams,
    SyncInfo,
    classify_weight_source,
)


class HFEngine(RolloutEngine):
    """Rollouts with a Hugging Face causal LM on this actor's GPU when it has one, else the CPU.

    ``device`` / ``dtype`` "auto" are decided here (``stages.devices``): the GPU Ray gave the actor,
    in the checkpoint's 16-bit dtype (bf16 by default); the CPU in fp32.
    """

    name = "hf"
    weight_group: Any = None  # this process's end of a weight-stream group, once joined

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        tokenizer_path: str | os.PathLike | None = None,
        dtype: str | torch.dtype = "auto",
        device: str = "auto",
        max_batch_size: int = 64,
        add_special_tokens: bool = True,
        num_threads: int | None = None,
        quantized_base: int | None = None,
        **_ignored: Any,  # vLLM-only options (tensor_parallel_size, enable_lora, ...) are accepted
    ) -> None:
        from transformers import AutoTokenizer

        if num_threads:
            torch.set_num_threads(num_threads)
        self.model_path = str(model_path)
        from stages.devices import inference_dtype, local_device

        self.device = local_device(str(device))
        self.dtype = dtype if isinstance(dtype, torch.dtype) else inference_dtype(str(dtype), self.device, model_path)
        self.max_batch_size = max_batch_size
        self.add_special_tokens = add_special_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path or model_path))
        self.adapter_name: str | None = None
        self._adapter_counter = 0
        # QLoRA's policy (peft.quant_bits): the base quantized as the trainer quantizes it (stages.models),
        # so that the engine's log-probs are the trainer's and not the unquantized base's.
        self.quantized_base = quantized_base
        self.model = self._load_full(self.model_path)

    # -- loading --

    def _load_full(self, path: str):
        from transformers import AutoModelForCausalLM

        if self.quantized_base:
            from stages.models import quantization_config, without_cpu_repacking

            precision = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[self.dtype]
            model = AutoModelForCausalLM.from_pretrained(  # bitsandbytes models are placed, not moved
                path, dtype=self.dtype, use_safetensors=True, device_map={"": self.device},
                quantization_config=quantization_config(self.quantized_base, precision))
            return without_cpu_repacking(model).eval()  # the trainer's kernel, so the same numbers
        model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype, use_safetensors=True)
        return model.to(self.device).eval()

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    # -- generation --

    @torch.inference_mode()
    def generate(self, prompts, params: SamplingParams) -> list[Rollout]:
        from transformers import GenerationConfig

        prompt_ids = self.encode_prompts(prompts)
        stop = self.stop_ids(params)
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=not params.greedy,
            temperature=None if params.greedy else params.temperature,
            top_p=None if params.greedy else params.top_p,
            top_k=0 if params.greedy else max(params.top_k, 0),
            eos_token_id=stop or None,
            pad_token_id=self.pad_id,
            bos_token_id=self.tokenizer.bos_token_id,
            output_logits=True,
            return_dict_in_generate=True,
            use_cache=True,
        )
        # n samples per prompt, grouped consecutively.
        rows = [ids for ids in prompt_ids for _ in range(params.n)]
        out: list[Rollout] = []
        with torch.random.fork_rng(devices=[] if self.device.type == "cpu" else [self.device]):
            if params.seed is not None:
                torch.manual_seed(params.seed)
            for start in range(0, len(rows), self.max_batch_size):
                out.extend(self._generate_batch(rows[start : start + self.max_batch_size], config, stop))
        return out

    def _generate_batch(self, rows: list[list[int]], config, stop: list[int]) -> list[Rollout]:
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding
            input_ids[i, width - len(r) :] = torch.tensor(r)
            attention[i, width - len(r) :] = 1
        result = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention.to(self.device),
            generation_config=config,
        )
        new_tokens = result.sequences[:, width:].cpu()
        # (batch, steps, vocab) raw logits -> log-probs of the chosen tokens
        logits = torch.stack(result.logits, dim=1).float()
        chosen = torch.log_softmax(logits, dim=-1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1).cpu()
        stop_set = set(stop)
        rollouts = []
        for i, r in enumerate(rows):
            toks = new_tokens[i].tolist()
            end, finished = len(toks), False
            for t, tok in enumerate(toks):
                if tok in stop_set:
                    end, finished = t + 1, True
                    break
            resp = toks[:end]
            rollouts.append(
                Rollout(
                    prompt_ids=list(r),
                    response_ids=resp,
                    response_text=self.tokenizer.decode(resp, skip_special_tokens=True),
                    logprobs=chosen[i, :end].tolist(),
                    finished=finished,
                )
            )
        return rollouts

    # -- scoring --

    @torch.inference_mode()
    def score(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
              temperature: float = 1.0) -> list[list[float]]:
        """Log-probs of the responses' tokens under ``softmax(logits / temperature)`` (raw: 1)."""
        if len(prompt_ids) != len(response_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
        out: list[list[float]] = []
        pairs = [(list(p), list(r)) for p, r in zip(prompt_ids, response_ids)]
        for start in range(0, len(pairs), self.max_batch_size):
            out.extend(self._score_batch(pairs[start : start + self.max_batch_size], temperature))
        return out

    def _score_batch(self, pairs: list[tuple[list[int], list[int]]], temperature: float) -> list[list[float]]:
        seqs = [p + r for p, r in pairs]
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):  # right padding: positions stay 0..len-1
            input_ids[i, : len(s)] = torch.tensor(s)
            attention[i, : len(s)] = 1
        logits = self.model(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device)).logits
        logits = logits[:, :-1].float()
        logp = torch.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)
        token_logp = logp.gather(-1, input_ids[:, 1:].to(self.device).unsqueeze(-1)).squeeze(-1).cpu()
        return [token_logp[i, len(p) - 1 : len(p) - 1 + len(r)].tolist() for i, (p, r) in enumerate(pairs)]

    # -- weight sync --

    @property
    def active_adapter(self) -> str | None:
        return self.adapter_name

    def update_weights(self, source: Any) -> SyncInfo:
        kind = classify_weight_source(source)
        started = time.perf_counter()
        if kind == FULL_PATH:
            self.model = self._load_full(str(source))
            self.adapter_name = None
            method, details = "hf_reload_from_path", {"path": str(source)}
        elif kind == LORA_PATH:
            details = self._load_adapter(Path(source))
            method = "hf_peft_adapter"
        else:
            details = self._load_state_dict(source)
            method = "hf_load_state_dict"
        return SyncInfo(method=method, seconds=time.perf_counter() - started, details=details)

    def _drop_adapter(self) -> None:
        if self.adapter_name is not None:
            # Remove the LoRA layers without merging: the base weights stay as they were.
            self.model = self.model.unload().eval()
            self.adapter_name = None

    def _load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> dict:
        self._drop_adapter()
        own = self.model.state_dict()
        unexpected = [k for k in state_dict if k not in own]
        if unexpected:
            raise ValueError(
                f"state_dict has {len(unexpected)} keys the model does not have, e.g. {unexpected[:3]}; "
                "pass the full model's state_dict (for LoRA, save the adapter and pass its folder)"
            )
        with torch.no_grad():
            for name, tensor in state_dict.items():
                own[name].copy_(tensor.to(own[name].dtype))
        missing = [k for k in own if k not in state_dict]
        return {"loaded": len(state_dict), "not_in_state_dict": len(missing)}

    # -- streamed full weights (stages.rollout.weight_stream) --

    def weight_group_size(self) -> int:
        return 1  # the weights live in this process

    def join_weight_group(self, host: str, port: int, first_rank: int, world: int, backend: str,
                          timeout_s: float) -> int:
        from stages.rollout.weight_stream import join_weight_group

        if self.weight_group is not None:
            self.weight_group.close()
            self.weight_group = None
        self.weight_group = join_weight_group(host, port, first_rank, world, backend, timeout_s)
        return 1

    def receive_weights(self, metas: Sequence[tuple[str, str, tuple[int, ...]]], bucket_bytes: int) -> SyncInfo:
        """Copy each broadcast into the live model as it arrives (tied weights share one tensor here)."""
        from stages.rollout.weight_stream import receive_tensors

        if self.weight_group is None:
            raise RuntimeError("receive_weights before join_weight_group")
        started = time.perf_counter()
        self._drop_adapter()
        own = self.model.state_dict()
        unknown = []
        with torch.no_grad():
            # To the end: each broadcast is collective.
            for name, tensor in receive_tensors(self.weight_group, metas, bucket_bytes):
                if name in own:
                    own[name].copy_(tensor)
                else:
                    unknown.append(name)
        if unknown:
            raise ValueError(f"streamed weights have {len(unknown)} names the model does not have, e.g. {unknown[:3]}")
        return SyncInfo(method=f"hf_weight_stream_{self.weight_group.backend}", seconds=time.perf_counter() - started,
                        details={"tensors": len(metas)})

    def _load_adapter(self, path: Path) -> dict:
        from peft import PeftModel

        self._adapter_counter += 1
        name = f"rollout-{self._adapter_counter}"
        if self.adapter_name is None:
            self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name, is_trainable=False)
        else:
            old = self.adapter_name
            self.model.load_adapter(str(path), adapter_name=name, is_trainable=False)
            self.model.set_adapter(name)
            self.model.delete_adapter(old)
        self.model.eval()
        self.adapter_name = name
        return {"path": str(path), "adapter_name": name}

    def close(self) -> None:
        self.model = None
