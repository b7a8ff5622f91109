"""Models on the builtin addition task, trained in-process (plain torch loops, no Ray), shared by the
tests that need a policy or a reward model to start from (PPO, reward, DPO): training them once per
session, outside Ray, costs a fraction of a Ray Train stage."""

from __future__ import annotations

import math
import random
from pathlib import Path

# 1000 steps x 64 of the task's flawed demonstrations (2 epochs over 32k): the policy learns the
# no-carry cases and the demonstrator's dropped carry (STACK.md calibration; 700 x 64 sits on the edge).
SFT_STEPS, SFT_BATCH = 1000, 64


def train_sft_in_process(base: Path, out: Path, steps: int, batch: int, lr: float = 2e-3) -> Path:
    """Full-parameter SFT on the task's demonstrations with a plain torch loop (completion-only loss)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.tasks import get_task

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).train()
    rows = []
    for example in get_task("addition").load("sft", "train", steps * batch).records:  # at most 32k
        messages = [m.to_dict() for m in example.messages]
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        rows.append((tokenizer(full, add_special_tokens=False).input_ids,
                     len(tokenizer(prompt, add_special_tokens=False).input_ids)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / steps)
    for step in range(steps):
        chunk = [rows[k % len(rows)] for k in range(step * batch, (step + 1) * batch)]  # epochs over the data
        width = max(len(f) for f, _ in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
        labels = torch.full((len(chunk), width), -100)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (full, n_prompt) in enumerate(chunk):
            ids[i, :len(full)] = torch.tensor(full)
            attention[i, :len(full)] = 1
            labels[i, n_prompt:len(full)] = torch.tensor(full[n_prompt:])
        model(input_ids=ids, attention_mask=attention, labels=labels).loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def train_reward_model_in_process(sft: Path, out: Path, steps: int = 60, batch: int = 32, lr: float = 1e-3,
                                  seed: int = 0) -> Path:
    """A Bradley-Terry reward model on the task's preference pairs, from the SFT weights (linear warmup
    over the first 5% of the steps, cosine decay after; epochs over the pairs)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from stages.tasks import get_task

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(sft)
    model = AutoModelForSequenceClassification.from_pretrained(sft, num_labels=1, dtype=torch.float32).train()
    model.config.pad_token_id = tokenizer.pad_token_id
    pairs = get_task("addition").load("preference", "train").records
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / steps))))
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)

    def encode(conversations):
        texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
        return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)

    for step in range(steps):
        chunk = [pairs[order[k % len(pairs)]] for k in range(step * batch, (step + 1) * batch)]
        chosen = encode([[m.to_dict() for m in p.prompt + p.chosen] for p in chunk])
        rejected = encode([[m.to_dict() for m in p.prompt + p.rejected] for p in chunk])
        margin = model(**chosen).logits.squeeze(-1) - model(**rejected).logits.squeeze(-1)
        (-F.logsigmoid(margin).mean()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
