"""The ``eval`` stage: compare the models of a pipeline on held-out data; no model is written.

Run it alone with ``rayalign run PIPELINE.yaml --only eval``. For each model in ``models:`` (plus
the reference), one Ray Data batch-inference pass (``stages.evaluate.generation``; up to
``generation.max_concurrent_models`` passes at once, each with its own actor pool) generates the
responses to every held-out prompt, samples for the KL estimate and scores held-out SFT answers and
preference pairs; then :mod:`stages.evaluate.metrics` turns the rows into:

* ``tasks.<task>``: verifier accuracy with a Wilson 95% interval, overall and per category;
* ``reward``: the reward model's score of the responses (mean, std);
* ``win_rate``: against the reference's responses to the same prompts, judged by the reward model,
  ties (identical responses or equal scores) counted half;
* ``kl``: KL(model || reference) from the model's own samples at temperature 1;
* ``length``: response length in tokens, fraction that ended on eos;
* ``perplexity`` on ``sft_data``; ``preference``: pairs ranked correctly by the implicit reward
  ``log pi/ref`` (chosen vs rejected).

With ``few_shot: k`` each task prompt is preceded by k solved exemplars of the task's training data as
earlier chat turns (:mod:`stages.evaluate.few_shot`); every prompt, exemplars included, must fit the
model's context with ``max_new_tokens`` (checked before any model runs). ``few_shot`` is in every
model's metrics and summary row, in the manifest (``eval.few_shot``: k, seed, the exemplar sources)
and, per response, the exemplars' questions.

Outputs in the artifact folder: ``metrics.json`` (one entry per model keyed by its artifact
fingerprint and the eval settings' hash, with ``num_examples`` sample responses) and
``responses/<key>.jsonl`` (every response with its verdict and reward). When the stage reruns (e.g.
``models:`` grew), entries whose key is in an earlier eval artifact of the same stage are reused
and only the new models are evaluated; the manifest's ``eval.reused`` names them.
lm-eval-harness benchmarks are not run (not installed here, and they need the hub's datasets).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from stages.config import DataConfig
from stages.evaluate import metrics as M
from stages.evaluate.config import EvalConfig
from stages.evaluate.few_shot import exemplar_source
from stages.files import read_jsonl, write_json, write_jsonl
from stages.launcher import upstream_full_model
from stages.stage import StageContext, StageResult, Stopwatch, UpstreamArtifact, data_sources
from stages.tasks.grading import grade, verifier_accuracy

EVAL_VERSION = "eval/1"  # bump when the computation of any metric changes: every cached entry is recomputed
METRICS_FILE = "metrics.json"
RESPONSES_DIR = "responses"


# --------------------------------------------------------------------------- held-out data


@dataclass
class EvalData:
    prompts: list[dict] = field(default_factory=list)  # gen rows plus their metadata (set, task, answer, category)
    sft: list[dict] = field(default_factory=list)  # ppl rows
    pairs: list[dict] = field(default_factory=list)  # pref rows
    summary: dict = field(default_factory=dict)  # data source -> loader summary

    def rows(self, kl_prompts: int) -> list[dict]:
        """The input rows of the Ray Data pass (plain columns only)."""
        gen = [{"row": p["row"], "purpose": "gen", "messages": p.get("gen_messages", p["messages"]), "target": "",
                "kl": p["row"] < kl_prompts} for p in self.prompts]
        return gen + [{**r, "kl": False} for r in self.sft + self.pairs]


def _messages(conversation) -> str:
    return json.dumps([m.to_dict() for m in conversation])


def load_eval_data(config: EvalConfig, resolve: Callable[[str], str], key: str) -> EvalData:
    """Prompt rows (tasks first, then ``prompts:``), SFT answers and pairs, ``max_prompts`` per set; with
    ``few_shot``, each task prompt row also gets its exemplars (``stages.evaluate.few_shot``). ``resolve``: a
    path as written -> absolute; ``key``: the stage's config key (``stages.<name>``) that errors name."""
    from stages.evaluate import few_shot
    from stages.sources import load_records
    from stages.tasks import TASKS

    data = EvalData()
    cap = config.max_prompts

    def load(source, kind: str, name: str):
        limit = min(x for x in (source.limit, cap) if x is not None) if (source.limit or cap) else None
        loaded = load_records(resolve(source.path), kind, format=source.format, limit=limit)
        data.summary[name] = loaded.summary()
        return loaded.records

    def add_prompts(records, set_name: str, task: str | None) -> None:
        for record in records:
            data.prompts.append({"row": len(data.prompts), "set": set_name, "task": task,
                                 "messages": _messages(record.prompt), "answer": record.answer, "record": record})

    for task in config.tasks:
        if task.data is not None:
            add_prompts(load(task.data, "prompt", f"tasks.{task.name}"), f"task:{task.name}", task.name)
        elif TASKS[task.name].has_generator:
            add_prompts(load(_builtin_test(task.name), "prompt", f"tasks.{task.name}"), f"task:{task.name}", task.name)
    verifier_only = [t.name for t in config.tasks if t.data is None and not TASKS[t.name].has_generator]
    for i, source in enumerate(config.prompts):
        records = load(source, "prompt", f"prompts[{i}]")
        name = _set_name(source.path, {p["set"] for p in data.prompts})
        for record in records:
            # A prompt set with answers (GSM8K) is scored by the verifier-only task(s) named in tasks:.
            task = verifier_only[0] if verifier_only and record.answer is not None else None
            add_prompts([record], name if task is None else f"task:{task}", task)
    if config.sft_data is not None:
        for record in load(config.sft_data, "sft", "sft_data"):
            *prompt, last = record.messages
            if last.role == "assistant" and prompt:
                data.sft.append({"row": len(data.sft), "purpose": "ppl", "messages": _messages(prompt),
                                 "target": _messages((last,))})
    if config.preference_data is not None:
        for record in load(config.preference_data, "preference", "preference_data"):
            target = json.dumps({"chosen": [m.to_dict() for m in record.chosen],
                                 "rejected": [m.to_dict() for m in record.rejected]})
            data.pairs.append({"row": len(data.pairs), "purpose": "pref", "messages": _messages(record.prompt),
                               "target": target})
    if config.few_shot:
        pools = few_shot.load_pools(config, resolve, few_shot.held_out_questions(data.prompts), key)
        few_shot.add_exemplars(data.prompts, pools, config.few_shot, config.few_shot_seed)
    return data


def _builtin_test(task: str) -> DataConfig:
    return DataConfig(path=f"builtin:{task}/test")


def _set_name(path: str, taken: set[str]) -> str:
    name = Path(path.removeprefix("builtin:")).name.split(".")[0] or "prompts"
    candidate, i = name, 2
    while candidate in taken:
        candidate, i = f"{name}-{i}", i + 1
    return candidate


# --------------------------------------------------------------------------- models and settings


def choose_reference(config: EvalConfig, stage_kinds: dict[str, str]) -> str:
    """``reference:``, else the first sft stage among the models, else the first model."""
    if config.reference:
        return config.reference
    for name in config.models:
        if stage_kinds.get(name) == "sft":
            return name
    return config.models[0]


def check_models(names: list[str], stage_kinds: dict[str, str]) -> None:
    for name in names:
        kind = stage_kinds.get(name, "base")
        if kind in ("reward", "eval"):
            raise ValueError(f"eval: {name!r} is a {kind} stage, not a model that generates; "
                             f"give reward models as `reward: {name}`" if kind == "reward" else
                             f"eval: {name!r} is an eval stage, not a model")


def eval_settings(ctx: StageContext, config: EvalConfig, by_stage: dict[str, UpstreamArtifact], reference: str) -> dict:
    """Everything besides the model's own weights that its results depend on (the cache key's other half)."""
    from stages.rollout import resolve_engine_name
    from stages.tasks import get_task

    gen = config.generation
    return {
        "version": EVAL_VERSION,
        "engine": resolve_engine_name(gen.engine),
        "sampling": {k: getattr(gen, k) for k in ("max_new_tokens", "temperature", "top_p", "seed", "num_samples",
                                                  "kl_prompts")},
        "tasks": {t.name: get_task(t.name).fingerprint() for t in config.tasks},
        "data": {name: {"fp": ctx.run.data_fingerprint(ctx.resolve(d.path)), "limit": d.limit, "format": d.format}
                 for name, (d, _) in data_sources(config).items()},
        "max_prompts": config.max_prompts,
        "num_examples": config.num_examples,
        "chat_template": config.chat_template,
        **({"few_shot": {"k": config.few_shot, "seed": config.few_shot_seed}} if config.few_shot else {}),
        "reference": by_stage[reference].fingerprint,
        "reward": by_stage[config.reward].fingerprint if config.reward else None,
    }


def previous_entries(ctx: StageContext) -> dict[str, tuple[dict, Path]]:
    """Cache key -> (entry, its folder) from every earlier complete eval artifact of this stage (newest
    first wins) and from this run's own partial folder (an interrupted eval resumes)."""
    folders = [ctx.work_dir, *ctx.run.earlier_outputs(ctx.name)]
    found: dict[str, tuple[dict, Path]] = {}
    for folder in folders:
        try:
            entries = json.loads((folder / METRICS_FILE).read_text())["models"]
        except (FileNotFoundError, KeyError, json.JSONDecodeError):
            continue
        for key, entry in entries.items():
            if key not in found and (folder / RESPONSES_DIR / f"{key}.jsonl").exists():
                found[key] = (entry, folder)
    return found


# --------------------------------------------------------------------------- the stage


@dataclass
class EvalRun:
    """What every model's evaluation shares: the data, the settings (and their hash) and the judges."""

    ctx: StageContext
    config: EvalConfig
    data: EvalData
    settings: dict
    settings_fp: str
    reference: str
    reference_path: Path
    reward_path: str | None
    previous: dict[str, tuple[dict, Path]]
    keys: dict[str, str] = field(default_factory=dict)  # model -> its cache key (responses/<key>.jsonl)

    def responses_file(self, name: str) -> Path:
        return self.ctx.work_dir / RESPONSES_DIR / f"{self.keys[name]}.jsonl"


def run(ctx: StageContext) -> StageResult:
    config: EvalConfig = ctx.config
    by_stage = {artifact.stage: artifact for artifact in ctx.inputs.values()}
    kinds = ctx.run.stage_kinds
    reference = choose_reference(config, kinds)
    names = [reference] + [m for m in config.models if m != reference]  # the reference first: others need it
    check_models(names, kinds)
    if config.reward and kinds.get(config.reward, "reward") != "reward":
        ctx.log(f"warning: reward: {config.reward!r} is a {kinds[config.reward]} stage; "
                "its folder is loaded as a sequence classifier")
    settings = eval_settings(ctx, config, by_stage, reference)
    data = load_eval_data(config, ctx.resolve, f"stages.{ctx.name}")
    plan = EvalRun(ctx, config, data, settings, ctx.run.fingerprint(settings), reference,
                   reference_path=upstream_full_model(ctx, by_stage[reference]),
                   reward_path=str(upstream_full_model(ctx, by_stage[config.reward])) if config.reward else None,
                   previous=previous_entries(ctx))
    check_prompt_lengths(plan)
    (ctx.work_dir / RESPONSES_DIR).mkdir(parents=True, exist_ok=True)
    for name in names:
        plan.keys[name] = ctx.run.fingerprint({"model": by_stage[name].fingerprint, "settings": plan.settings_fp})
    entries: dict[str, dict] = {}
    models_info: dict[str, dict] = {}
    inferring = start_inference(plan, [n for n in names if plan.keys[n] not in plan.previous], by_stage)
    try:
        for name in names:  # in order, the reference first: the others' win rates read its responses
            artifact = by_stage[name]
            entry, models_info[name] = evaluate_model(plan, name, artifact, inferring.get(name))
            entries[name] = {**entry, "stage": name, "fingerprint": artifact.fingerprint, "settings": plan.settings_fp}
            write_json(ctx.work_dir / METRICS_FILE,
                       {"settings": settings, "models": {plan.keys[n]: e for n, e in entries.items()}})
    finally:
        for future in inferring.values():  # after a failure: the passes not begun yet are not begun
            future.cancel()
    manifest = eval_manifest(plan, names, entries, models_info)
    order = manifest["eval"]["order"]
    ctx.log(f"reused {manifest['eval']['reused'] or 'none'}; computed {manifest['eval']['computed'] or 'none'}")
    return StageResult(metrics={n: entries[n]["metrics"] for n in order}, data=plan.data.summary, manifest=manifest)


def check_prompt_lengths(plan: EvalRun) -> None:
    """Every generation prompt (its exemplars included) plus max_new_tokens fits the reference's context,
    checked before any model runs; the models of one pipeline share the base's tokenizer and context."""
    from stages.evaluate.few_shot import model_context
    from stages.models import load_tokenizer

    ctx, config = plan.ctx, plan.config
    path, trust = str(plan.reference_path), ctx.run.trust_remote_code
    tokenizer = load_tokenizer(path, trust_remote_code=trust)
    check_generation_prompts(plan.data, config, tokenizer, model_context(path, trust), f"stages.{ctx.name}",
                             f"{plan.reference} ({path})")


def check_eval_data(config: EvalConfig, resolve: Callable[[str], str], key: str, tokenizer=None,
                    context: int | None = None, where: str = "the model") -> None:
    """What ``rayalign validate`` can check of an eval stage before anything runs: the held-out data and
    the few-shot exemplars load (no solved answers, fewer than k exemplars: ValueError naming the key),
    and, given the base's tokenizer and context, every generation prompt fits."""
    data = load_eval_data(config, resolve, key)
    if tokenizer is not None:
        check_generation_prompts(data, config, tokenizer, context, key, where)


def check_generation_prompts(data: EvalData, config: EvalConfig, tokenizer, context: int | None, key: str,
                             where: str) -> None:
    """Every prompt row, exemplars included, rendered with the eval's chat template (on a copy of
    ``tokenizer``) plus ``generation.max_new_tokens`` within ``context`` (``stages.evaluate.few_shot``)."""
    from stages.chat_templates import apply_chat_template_choice
    from stages.evaluate.few_shot import check_context

    if not data.prompts:
        return
    tokenizer = copy.copy(tokenizer)  # the caller's keeps its own template
    apply_chat_template_choice(tokenizer, config.chat_template)
    prompts = [json.loads(p.get("gen_messages", p["messages"])) for p in data.prompts]
    check_context(prompts, tokenizer, context, config.generation.max_new_tokens, key, where, config.few_shot)


def start_inference(plan: EvalRun, names: list[str], by_stage: dict[str, UpstreamArtifact]) -> dict[str, Future]:
    """Each model's Ray Data pass begun, up to ``generation.max_concurrent_models`` at once. Every pass has
    its own actor pool and the same rows and batches whatever the setting, so its results do not change."""
    from concurrent.futures import ThreadPoolExecutor

    if not names:
        return {}
    plan.ctx.run.connect_ray()
    pool = ThreadPoolExecutor(plan.config.generation.max_concurrent_models, thread_name_prefix=f"{plan.ctx.name}-models")
    futures = {name: pool.submit(infer, plan, name, by_stage[name]) for name in names}
    pool.shutdown(wait=False)
    return futures


def infer(plan: EvalRun, name: str, artifact: UpstreamArtifact) -> tuple[Path, list[dict], float]:
    """One model's Ray Data inference pass: (its full-weights folder, the output rows, seconds)."""
    from stages.evaluate.generation import run_inference

    ctx, config, data = plan.ctx, plan.config, plan.data
    path = upstream_full_model(ctx, artifact)
    ctx.log(f"{name}: evaluating {path} ({len(data.prompts)} prompts, {len(data.sft)} sft answers, "
            f"{len(data.pairs)} pairs) against {plan.reference}")
    watch = Stopwatch()
    rows = run_inference(data.rows(config.generation.kl_prompts), model_path=str(path),
                         reference_path=str(plan.reference_path), reward_path=plan.reward_path,
                         generation=config.generation, chat_template=config.chat_template)
    return path, rows, watch.seconds


def evaluate_model(plan: EvalRun, name: str, artifact: UpstreamArtifact, inferring: Future | None
                   ) -> tuple[dict, dict]:
    """One model's entry and manifest info: reused from an earlier eval with the same key, else computed
    from its inference pass (``inferring``, begun by :func:`start_inference`)."""
    ctx, config, data, key = plan.ctx, plan.config, plan.data, plan.keys[name]
    target = plan.responses_file(name)
    if key in plan.previous:
        entry, folder = plan.previous[key]
        if folder != ctx.work_dir:
            shutil.copyfile(folder / RESPONSES_DIR / f"{key}.jsonl", target)
        ctx.log(f"{name}: reusing results {key} from {folder}")
        return entry, {"fingerprint": artifact.fingerprint, "key": key, "reused_from": str(folder)}
    path, rows, inference_seconds = inferring.result()
    watch = Stopwatch()
    reference_rows = None if name == plan.reference else read_responses(plan.responses_file(plan.reference))
    entry, responses = summarize(rows, data, config, reference_rows)
    write_jsonl(target, responses)
    ctx.log(f"{name}: Ray Data inference {inference_seconds:.1f}s, metrics {watch.seconds:.1f}s")
    return entry, {"fingerprint": artifact.fingerprint, "key": key, "reused_from": None, "model_dir": str(path)}


def eval_manifest(plan: EvalRun, names: list[str], entries: dict[str, dict], models_info: dict[str, dict]) -> dict:
    config, reference = plan.config, plan.reference
    reused = [n for n in names if models_info[n]["reused_from"]]
    order = list(config.models) + ([reference] if reference not in config.models else [])
    return {
        "model_type": None,
        "eval": {
            "models": models_info,
            "order": order,
            "reference": reference,
            "reward": config.reward,
            "reused": reused,
            "computed": [n for n in names if n not in reused],
            "engine": plan.settings["engine"],
            "sampling": {**plan.settings["sampling"], "kl_temperature": 1.0},
            "few_shot": {"k": config.few_shot, "seed": config.few_shot_seed,
                         "sources": {t.name: s.path for t in config.tasks
                                     if (s := exemplar_source(t, config.few_shot)) is not None}},
            "settings_fingerprint": plan.settings_fp,
            "samples": {n: entries[n].get("samples", []) for n in order},
            "lm_eval": "skipped: lm-eval-harness is not installed and needs the model hub",
        },
    }


# --------------------------------------------------------------------------- rows -> metrics


def summarize(rows: list[dict], data: EvalData, config: EvalConfig, reference_rows: list[dict] | None
              ) -> tuple[dict, list[dict]]:
    """One model's metrics (and its per-prompt responses) from the rows of its inference pass.

    ``reference_rows``: the reference's responses (None when this model is the reference: its win
    rate is 0.5 by definition, every response tying with itself)."""
    from stages.tasks import get_task

    gen = {r["row"]: r for r in rows if r["purpose"] == "gen"}
    tasks_by_name = {name: get_task(name) for name in {p["task"] for p in data.prompts if p["task"]}}
    responses = []
    for prompt in data.prompts:
        out = gen[prompt["row"]]
        entry = {"row": prompt["row"], "set": prompt["set"], "task": prompt["task"], "prompt": _prompt_text(prompt),
                 "answer": prompt["answer"], "response": out["text"], "tokens": out["tokens"],
                 "finished": out["finished"], "reward": None if _nan(out["reward"]) else out["reward"],
                 "correct": None, "category": None}
        if "exemplars" in prompt:  # few_shot: the questions of the exemplars shown before this prompt
            entry["exemplars"] = prompt["exemplars"]
        if prompt["task"]:
            (entry["correct"],), (entry["category"],) = grade(tasks_by_name[prompt["task"]], [prompt["record"]],
                                                            [out["text"]])
        responses.append(entry)

    metrics: dict = {"prompts": len(responses), "few_shot": config.few_shot}
    tasks = {}
    for task_name in dict.fromkeys(r["task"] for r in responses if r["task"]):
        scored = [r for r in responses if r["task"] == task_name]
        tasks[task_name] = verifier_accuracy([r["correct"] for r in scored], [r["category"] for r in scored])
    metrics["tasks"] = tasks
    rewards = [r["reward"] for r in responses if r["reward"] is not None]
    metrics["reward"] = M.mean_std(rewards) if rewards else None
    metrics["length"] = {"mean_tokens": M.mean_std([r["tokens"] for r in responses])["mean"] if responses else None,
                         "finished": (sum(r["finished"] for r in responses) / len(responses)) if responses else None}
    if rewards and reference_rows is None:
        metrics["win_rate"] = M.win_rate(rewards, rewards, same=[True] * len(rewards))
    elif rewards:
        by_row = {r["row"]: r for r in reference_rows}
        mine = [r for r in responses if r["reward"] is not None and by_row.get(r["row"], {}).get("reward") is not None]
        metrics["win_rate"] = M.win_rate([r["reward"] for r in mine], [by_row[r["row"]]["reward"] for r in mine],
                                         same=[r["response"] == by_row[r["row"]]["response"] for r in mine])
    else:
        metrics["win_rate"] = None
    kl_rows = [r for r in rows if r["purpose"] == "kl"]
    metrics["kl"] = M.kl_estimate([json.loads(r["policy_lp"]) for r in kl_rows],
                                  [json.loads(r["ref_lp"]) for r in kl_rows]) if kl_rows else None
    ppl_rows = [r for r in rows if r["purpose"] == "ppl"]
    metrics["perplexity"] = M.perplexity([json.loads(r["policy_lp"]) for r in ppl_rows]) if ppl_rows else None
    pref_rows = [r for r in rows if r["purpose"] == "pref"]
    if pref_rows:
        sums = {k: [sum(json.loads(r[k])) for r in pref_rows] for k in ("policy_lp", "ref_lp", "policy_lp2", "ref_lp2")}
        metrics["preference"] = M.implicit_reward_ranking(sums["policy_lp"], sums["ref_lp"], sums["policy_lp2"],
                                                          sums["ref_lp2"])
    else:
        metrics["preference"] = None
    metrics["summary"] = {**summary_row(metrics), "few_shot": config.few_shot}
    return {"metrics": metrics, "samples": pick_samples(responses, config.num_examples)}, responses


def summary_row(metrics: dict) -> dict:
    """The headline numbers of one model, flat (the report's and the demo's table)."""
    row = {}
    for task, result in metrics["tasks"].items():
        row[f"accuracy/{task}"] = result["accuracy"]
        for category, sub in result["categories"].items():
            row[f"accuracy/{task}/{category}"] = sub["accuracy"]
    if metrics.get("reward"):
        row["reward_mean"] = metrics["reward"]["mean"]
    if metrics.get("win_rate"):
        row["win_rate"] = metrics["win_rate"]["win_rate"]
        row["ties"] = metrics["win_rate"]["ties"]
    if metrics.get("kl"):
        row["kl"] = metrics["kl"]["kl"]
    row["length"] = metrics["length"]["mean_tokens"]
    if metrics.get("perplexity"):
        row["perplexity"] = metrics["perplexity"]["perplexity"]
    if metrics.get("preference"):
        row["pref_accuracy"] = metrics["preference"]["accuracy"]
    return row


def pick_samples(responses: list[dict], count: int) -> list[dict]:
    """``count`` responses, taking the prompt sets in turn (the same prompts for every model)."""
    by_set: dict[str, list[dict]] = {}
    for r in responses:
        by_set.setdefault(r["set"], []).append(r)
    picked, i = [], 0
    while len(picked) < count and any(i < len(v) for v in by_set.values()):
        picked += [v[i] for v in by_set.values() if i < len(v)][: count - len(picked)]
        i += 1
    keep = ("row", "set", "prompt", "answer", "response", "correct", "reward", "category")
    return [{k: r[k] for k in keep} for r in picked]


def _prompt_text(prompt: dict) -> str:
    messages = json.loads(prompt["messages"])
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages) if len(messages) > 1 else messages[0]["content"]


def _nan(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def read_responses(path: Path) -> list[dict]:
    return read_jsonl(path)


# --------------------------------------------------------------------------- printing


def format_table(artifact: UpstreamArtifact) -> str:
    """The eval artifact's headline numbers as a text table (one row per model)."""
    metrics = artifact.metrics
    rows = {name: m.get("summary", {}) for name, m in metrics.items()}
    columns = list(dict.fromkeys(k for r in rows.values() for k in r))
    info = artifact.manifest.get("eval", {})
    header = (f"eval {artifact.stage} ({artifact.fingerprint}): reference {info.get('reference')}, "
              f"reward {info.get('reward') or '-'}, engine {info.get('engine')}, reused {info.get('reused') or 'none'}")
    width = max([len(n) for n in rows] + [5])
    lines = [header, "  " + "model".ljust(width) + "".join(f"  {c:>14}" for c in columns)]
    for name, row in rows.items():
        cells = "".join(f"  {_fmt(row.get(c)):>14}" for c in columns)
        lines.append("  " + name.ljust(width) + cells)
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"
