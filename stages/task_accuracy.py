"""Held-out verifier accuracy of one model on a built-in task (greedy, the ``hf`` engine).

Used by ``make demo`` to print accuracies; the eval stage computes the same with confidence
intervals, sampling settings and Ray Data.
"""

from __future__ import annotations

from pathlib import Path

from stages.chat_templates import conversation_ids
from stages.tasks.grading import grade, verifier_accuracy


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
    ids = [conversation_ids(engine.tokenizer, [m.to_dict() for m in p.prompt], add_generation_prompt=True)
           for p in prompts]
    rollouts = engine.generate(ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))
    engine.close()
    graded = verifier_accuracy(*grade(task, prompts, [r.response_text for r in rollouts]))
    return {
        "accuracy": graded["accuracy"],
        "correct": graded["correct"],
        "total": graded["n"],
        "by_category": {c: v["accuracy"] for c, v in graded["categories"].items()},
    }
