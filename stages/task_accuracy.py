"""Held-out verifier accuracy of one model on a built-in task (greedy, the ``hf`` engine).

Used by ``make demo`` to print accuracies; the eval stage computes the same with confidence
intervals, sampling settings and Ray Data.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path


def heldout_accuracy(model_dir: Path, task_name: str, limit: int | None = None, max_new_tokens: int = 8) -> dict:
    from stages.models import adapter_base, is_adapter
    from stages.rollout import SamplingParams, create_engine
    from stages.tasks import get_task

    task = get_task(task_name)
    prompts = task.load("prompt", "test", limit).records
    if is_adapter(model_dir):
        engine = create_engine("hf", adapter_base(model_dir), tokenizer_path=model_dir)
        engine.update_weights(str(model_dir))
    else:
        engine = create_engine("hf", model_dir)
    texts = [engine.tokenizer.apply_chat_template([m.to_dict() for m in p.prompt], tokenize=False,
                                                  add_generation_prompt=True) for p in prompts]
    rollouts = engine.generate(texts, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))
    engine.close()
    correct, total = Counter(), Counter()
    for prompt, rollout in zip(prompts, rollouts):
        category = task.category(prompt)
        total[category] += 1
        correct[category] += int(task.verify(prompt, rollout.response_text))
    n = sum(total.values())
    return {
        "accuracy": sum(correct.values()) / n,
        "correct": sum(correct.values()),
        "total": n,
        "by_category": {c: correct[c] / total[c] for c in sorted(total)},
    }
