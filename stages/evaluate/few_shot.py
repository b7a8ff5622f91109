"""Few-shot (in-context, k-shot) prompts for the eval stage: the in-context row of the course's method
table (``../shared/course/fine-tuning-and-adaptation.md``), measured by the same verifier as the tuned rows.

    pools = load_pools(config, resolve, held_out, key="stages.eval")   # task -> [Exemplar], checked
    messages = few_shot_messages(prompt, pick(pools["addition"], k, seed, "addition", index))

With ``few_shot: k`` every held-out prompt of a task is preceded by k solved exemplars of that task as
earlier user/assistant turns, so the model's chat template renders them like a conversation:

    user: 23+41=   assistant: 64   user: 58+17=   assistant: 75   ...   user: 47+38=   (generate)

Exemplars come from the task's *training* data, never its held-out prompts: ``tasks[i].few_shot_data``,
default ``builtin:<task>/train`` for the built-in generator tasks, whose train and test problems are
disjoint. A solved exemplar is a prompt record with an answer (``answer`` field, GSM8K's
question/answer) or else an SFT conversation ending in an assistant turn. Any exemplar whose question
equals a held-out prompt of the eval is dropped from the pool, so a file that overlaps the test set
cannot leak answers. Each held-out prompt draws its own k distinct exemplars from a stream seeded by
``(few_shot_seed, task, the prompt's index within the task)``: the same prompts get the same
exemplars on every run and with any batching, and changing k or the seed changes them all.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from stages.config import DataConfig


@dataclass(frozen=True)
class Exemplar:
    """One solved training example: its question turns (no system turn) and the answer."""

    turns: tuple[tuple[str, str], ...]  # (role, content), ending with the user's question
    answer: str

    @property
    def question(self) -> str:
        return self.turns[-1][1]

    def messages(self) -> list[dict]:
        return [{"role": r, "content": c} for r, c in self.turns] + [{"role": "assistant", "content": self.answer}]


def question_key(messages: Iterable) -> str:
    """A prompt's non-system turns as one string: what makes an exemplar the same problem as a held-out prompt."""
    turns = [(m["role"], m["content"]) if isinstance(m, dict) else (m.role, m.content) for m in messages]
    return json.dumps([t for t in turns if t[0] != "system"])


def exemplar_source(task, few_shot: int) -> DataConfig | None:
    """Where a task's exemplars come from (``task``: an ``EvalTaskConfig``); None when it needs none or has none."""
    from stages.tasks import TASKS

    if few_shot == 0:
        return None
    if task.few_shot_data is not None:
        return task.few_shot_data
    return DataConfig(path=f"builtin:{task.name}/train") if TASKS[task.name].has_generator else None


def _turns(messages) -> tuple[tuple[str, str], ...]:
    return tuple((m.role, m.content) for m in messages if m.role != "system")


def load_exemplars(path: str, format: str | None, limit: int | None) -> tuple[list[Exemplar], int]:
    """(the solved exemplars of a data source in file order, the records read): prompt records with an
    answer, else SFT conversations (the last assistant turn is the answer)."""
    from stages.data.errors import DataError
    from stages.sources import load_records

    prompts = load_records(path, "prompt", format=format).records[:limit]
    solved = [Exemplar(_turns(r.prompt), r.answer) for r in prompts if r.answer and r.answer.strip()]
    if solved:
        return solved, len(prompts)
    try:
        conversations = load_records(path, "sft", format=format).records[:limit]
    except (DataError, ValueError):  # a prompt-only format has no sft reading
        return [], len(prompts)
    return [Exemplar(_turns(c.messages[:-1]), c.messages[-1].content) for c in conversations], len(prompts)


def load_pools(config, resolve: Callable[[str], str], held_out: dict[str, set[str]], key: str
               ) -> dict[str, list[Exemplar]]:
    """Task name -> its exemplar pool, for every task of ``config`` (an ``EvalConfig``) that gets
    exemplars. ``held_out``: task -> the :func:`question_key` of its held-out prompts (left out of
    the pool). ValueError naming ``{key}.tasks[i].few_shot_data`` or ``{key}.few_shot`` when a source
    has no solved answers or fewer than k usable exemplars."""
    k = config.few_shot
    pools: dict[str, list[Exemplar]] = {}
    for i, task in enumerate(config.tasks):
        source = exemplar_source(task, k)
        if source is None:
            continue
        field = f"{key}.tasks[{i}].few_shot_data" if task.few_shot_data is not None else f"{key}.few_shot"
        solved, read = load_exemplars(resolve(source.path), source.format, source.limit)
        if not solved:
            raise ValueError(
                f"{field}: {source.path}: none of its {read} records has a solved answer, and few_shot: {k} needs "
                "solved exemplars: prompt records with an answer (question/answer, or prompt with answer) or "
                "SFT conversations ending in an assistant turn")
        taken = held_out.get(task.name, set())
        pool = [e for e in solved if question_key({"role": r, "content": c} for r, c in e.turns) not in taken]
        if len(pool) < k:
            dropped = len(solved) - len(pool)
            raise ValueError(
                f"{key}.few_shot: {k} exemplars per prompt, but {source.path} has only {len(pool)} solved exemplars "
                f"for task {task.name!r}" + (f" ({dropped} more are held-out prompts of this eval, left out)"
                                             if dropped else "")
                + f"; lower few_shot or give more training data in tasks[{i}].few_shot_data")
        pools[task.name] = pool
    return pools


def pick(pool: list[Exemplar], k: int, seed: int, task: str, index: int) -> list[Exemplar]:
    """k distinct exemplars for the ``index``-th held-out prompt of ``task``, from its own seeded stream."""
    rng = random.Random(f"few-shot/{seed}/{task}/{index}")
    return [pool[j] for j in rng.sample(range(len(pool)), k)]


def few_shot_messages(prompt: list[dict], exemplars: list[Exemplar]) -> list[dict]:
    """The held-out prompt preceded by the exemplars as earlier turns; its leading system turns stay first."""
    head = 0
    while head < len(prompt) and prompt[head]["role"] == "system":
        head += 1
    return prompt[:head] + [m for e in exemplars for m in e.messages()] + prompt[head:]


def add_exemplars(prompts: list[dict], pools: dict[str, list[Exemplar]], k: int, seed: int) -> None:
    """Give every prompt row of a task with a pool (``stages.evaluate.stage.EvalData.prompts``) its k
    exemplars: ``gen_messages`` (what the model is asked, as JSON) and ``exemplars`` (their questions)."""
    seen: dict[str, int] = {}
    for row in prompts:
        task = row["task"]
        if task not in pools:
            continue
        index = seen[task] = seen.get(task, -1) + 1
        chosen = pick(pools[task], k, seed, task, index)
        row["gen_messages"] = json.dumps(few_shot_messages(json.loads(row["messages"]), chosen))
        row["exemplars"] = [e.question for e in chosen]


def held_out_questions(prompts: list[dict]) -> dict[str, set[str]]:
    """Task -> the :func:`question_key` of its held-out prompt rows."""
    out: dict[str, set[str]] = {}
    for row in prompts:
        if row["task"]:
            out.setdefault(row["task"], set()).add(question_key(json.loads(row["messages"])))
    return out


def model_context(path: str, trust_remote_code: bool = False) -> int | None:
    """The model's context in tokens (``max_position_embeddings`` or ``n_positions``) from its config.json."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def check_context(prompts: list[list[dict]], tokenizer, context: int | None, max_new_tokens: int, key: str,
                  where: str, few_shot: int = 0) -> None:
    """Every rendered generation prompt (``few_shot`` exemplars included) plus ``max_new_tokens`` must fit
    the model's context (``where`` names the model): the hf engine would run past its position embeddings
    and vLLM refuses. ValueError naming ``{key}.few_shot`` (or ``generation.max_new_tokens``) otherwise."""
    from stages.chat_templates import conversation_ids

    if not context:
        return
    room = context - max_new_tokens
    lengths = [len(conversation_ids(tokenizer, p, add_generation_prompt=True)) for p in prompts]
    too_long = [i for i, n in enumerate(lengths) if n > room]
    if not too_long:
        return
    first = too_long[0]
    field = f"{key}.few_shot" if few_shot else f"{key}.generation.max_new_tokens"
    raise ValueError(
        f"{field}: held-out prompt {first + 1} with {few_shot} exemplars is {lengths[first]} tokens, and with "
        f"generation.max_new_tokens ({max_new_tokens}) that is over the context of {where} ({context} tokens); "
        f"{len(too_long)} of {len(prompts)} prompts are longer than {room} tokens: "
        + ("lower few_shot or " if few_shot else "") + "lower generation.max_new_tokens, or use a model with a "
        "longer context")
