"""Scoring conversations with a reward model (a ``reward`` stage's sequence-classifier folder).

The one implementation used wherever a reward model scores: the reward stage's held-out metrics,
PPO's reward (in a Ray actor or in the training worker) and the eval stage's reward and win rate.
One tokenization route (the chat template, tokenized by ``apply_chat_template``) means the reward
PPO optimises and the reward the eval reports are the same number for the same conversation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from stages.chat_templates import conversation_ids


class RewardScorer:
    """A sequence-classification reward model loaded with plain transformers; Ray-actor ready.

    ``max_length`` truncates longer conversations (keeping their start) when scoring; callers that
    must skip over-long inputs instead check ``len(encode(...))`` first.
    """

    def __init__(self, model_dir: str | Path, batch_size: int = 32, max_length: int | None = None,
                 device: str = "auto", dtype: str = "auto", num_threads: int | None = None) -> None:
        from stages.log import configure

        configure()  # in a Ray actor: before transformers' imports (quiet mode quiets their notices)
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if num_threads:
            torch.set_num_threads(num_threads)
        from stages.devices import inference_dtype, local_device

        self.device = local_device(device)  # the GPU Ray gave this actor / worker, else the CPU
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = AutoModelForSequenceClassification.from_pretrained(
            str(model_dir), num_labels=1, dtype=inference_dtype(dtype, self.device, model_dir), use_safetensors=True)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = model.to(self.device).eval()
        self.batch_size, self.max_length = batch_size, max_length

    def encode(self, conversation: list[dict]) -> list[int]:
        return conversation_ids(self.tokenizer, conversation)

    def score_ids(self, encoded: Sequence[list[int]]) -> list[float]:
        """One score per token-id sequence, in padded batches."""
        import torch

        if self.max_length is not None:
            encoded = [ids[:self.max_length] for ids in encoded]
        scores: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(encoded), self.batch_size):
                padded = self.tokenizer.pad({"input_ids": list(encoded[start:start + self.batch_size])},
                                            return_tensors="pt")
                logits = self.model(**{k: v.to(self.device) for k, v in padded.items()}).logits
                scores += logits[:, 0].float().cpu().tolist()
        return scores

    def score(self, conversations: Sequence[list[dict]]) -> list[float]:
        """One score per conversation (``prompt messages + the assistant's response``)."""
        return self.score_ids([self.encode(c) for c in conversations])

    def ping(self) -> bool:
        return True
