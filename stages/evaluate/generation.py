"""Batch inference for the eval stage with Ray Data: an actor pool of rollout engines.

    rows = [{"row": 0, "purpose": "gen", "messages": json.dumps([...]), "target": "", "kl": True}, ...]
    out = run_inference(rows, model_path=..., reference_path=..., reward_path=..., generation=config.generation)

``ray.data.from_items(rows).map_batches(EvalWorker, compute=ActorPoolStrategy(size=N), batch_size=B)``: each actor holds
the policy's rollout engine (``stages.rollout.create_engine``, the same engines PPO uses), the
reference's engine when the batch needs it, and the reward model. One input row is one task:

* ``gen``: generate the response (the configured sampling, greedy by default) and score it with the
  reward model; with ``kl`` also draw ``num_samples`` samples at temperature 1 (``kl`` output rows)
  and score each under the policy and the reference, teacher-forced (``engine.score``);
* ``ppl``: the policy's log-probs of a held-out SFT answer;
* ``pref``: policy and reference log-probs of a pair's chosen and rejected answers.

Prompts are rendered with each model's chat template (``add_generation_prompt``) and passed as token
ids. Seeds: sampled generation of row ``i`` uses ``seed + i * n`` in its own call, so the samples do
not depend on how Ray Data batches the rows (the ``hf`` engine seeds per call).
Every output row has the same columns (:data:`OUTPUT_COLUMNS`); log-prob lists travel as JSON.
"""

from __future__ import annotations

import json
import math
from typing import Any

from stages.chat_templates import conversation_ids

OUTPUT_COLUMNS = ("row", "purpose", "sample", "text", "tokens", "finished", "reward",
                  "policy_lp", "ref_lp", "policy_lp2", "ref_lp2")


def _output_row(row: int, purpose: str, **values: Any) -> dict:
    out = {"row": int(row), "purpose": purpose, "sample": -1, "text": "", "tokens": 0, "finished": False,
           "reward": math.nan, "policy_lp": "", "ref_lp": "", "policy_lp2": "", "ref_lp2": ""}
    out.update(values)
    return out


def split_response(tokenizer, prompt: list[dict], response: list[dict]) -> tuple[list[int], list[int]]:
    """(prompt ids with the generation prompt, the response's ids up to and including its last eos).

    The response is what follows the rendered generation prompt in the rendered whole conversation;
    when the template does not render that prefix exactly, the response text is tokenized on its own
    and the eos appended."""
    prompt_ids = conversation_ids(tokenizer, prompt, add_generation_prompt=True)
    full = conversation_ids(tokenizer, prompt + response, add_generation_prompt=False)
    eos = tokenizer.eos_token_id
    if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        response_ids = full[len(prompt_ids):]
        if eos is not None and eos in response_ids:
            last = len(response_ids) - 1 - response_ids[::-1].index(eos)
            response_ids = response_ids[: last + 1]
    else:
        text = "".join(m["content"] for m in response)
        response_ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) + ([eos] if eos is not None else [])
    return prompt_ids, response_ids


class EvalWorker:
    """The Ray Data callable class: one per actor, holding the engines for one model's evaluation."""

    def __init__(self, model_path: str, reference_path: str | None = None, reward_path: str | None = None, *,
                 engine: str = "auto", engine_kwargs: dict | None = None, sampling: dict | None = None,
                 kl_sampling: dict | None = None, chat_template: str | None = None, device: str = "cpu",
                 gpu_settings: dict | None = None) -> None:
        from stages.chat_templates import apply_chat_template_choice
        from stages.log import configure
        from stages.rollout import create_engine, resolve_engine_name

        configure()  # before the engines import their libraries (quiet mode quiets their import-time notices)

        self.engine_name = resolve_engine_name(engine, model_path)
        self.engine_kwargs = dict(engine_kwargs or {})
        if self.engine_name == "hf":
            self.engine_kwargs.setdefault("device", device)
        elif device == "cuda":
            self.engine_kwargs = vllm_gpu_kwargs(self.engine_kwargs, gpu_settings or {}, reward_path,
                                                 separate_reference=reference_path not in (None, model_path))
        self.policy = create_engine(self.engine_name, model_path, **self.engine_kwargs)
        self.tokenizer = self.policy.tokenizer
        apply_chat_template_choice(self.tokenizer, chat_template)
        self.model_path, self.reference_path, self.reward_path = model_path, reference_path, reward_path
        self.sampling = sampling or {"max_new_tokens": 64, "temperature": 0.0}
        self.kl_sampling = kl_sampling
        self.device = device
        self._reference = None
        self._reward = None

    # -- the models --

    @property
    def reference(self):
        """The reference's engine; the policy's own when both are the same folder."""
        if self.reference_path is None or self.reference_path == self.model_path:
            return self.policy
        if self._reference is None:
            from stages.rollout import create_engine

            self._reference = create_engine(self.engine_name, self.reference_path, **self.engine_kwargs)
        return self._reference

    def reward_scores(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        if self.reward_path is None or not prompts:
            return [math.nan] * len(prompts)
        if self._reward is None:
            from stages.reward_scoring import RewardScorer

            self._reward = RewardScorer(self.reward_path, device=self.device)
        return self._reward.score([p + [{"role": "assistant", "content": r}] for p, r in zip(prompts, responses)])

    # -- one batch --

    def __call__(self, batch: dict) -> dict:
        rows = [{key: batch[key][i] for key in batch} for i in range(len(batch["row"]))]
        out: list[dict] = []
        out += self._generate([r for r in rows if r["purpose"] == "gen"])
        out += self._perplexity([r for r in rows if r["purpose"] == "ppl"])
        out += self._preference([r for r in rows if r["purpose"] == "pref"])
        return {column: [r[column] for r in out] for column in OUTPUT_COLUMNS}

    def _generate(self, rows: list[dict]) -> list[dict]:
        from stages.rollout import SamplingParams

        if not rows:
            return []
        messages = [json.loads(r["messages"]) for r in rows]
        prompt_ids = [conversation_ids(self.tokenizer, m, add_generation_prompt=True) for m in messages]
        params = SamplingParams(**self.sampling)
        if params.greedy:
            rollouts = self.policy.generate(prompt_ids, params)
        else:  # one call per row: its seed depends on the row only
            rollouts = [self.policy.generate([ids], params.with_seed_offset(int(r["row"])))[0]
                        for ids, r in zip(prompt_ids, rows)]
        rewards = self.reward_scores(messages, [ro.response_text for ro in rollouts])
        out = [_output_row(r["row"], "gen", text=ro.response_text, tokens=len(ro.response_ids),
                           finished=bool(ro.finished), reward=float(s))
               for r, ro, s in zip(rows, rollouts, rewards)]
        kl_rows = [(r, ids) for r, ids in zip(rows, prompt_ids) if bool(r["kl"])]
        if kl_rows and self.kl_sampling and self.kl_sampling.get("n", 0) > 0:
            out += self._kl_samples(kl_rows)
        return out

    def _kl_samples(self, rows: list[tuple[dict, list[int]]]) -> list[dict]:
        from stages.rollout import SamplingParams

        params = SamplingParams(**self.kl_sampling)
        prompts, responses, owners = [], [], []
        for row, ids in rows:
            samples = self.policy.generate([ids], params.with_seed_offset(int(row["row"]) * params.n))
            for j, sample in enumerate(samples):
                prompts.append(ids)
                responses.append(sample.response_ids)
                owners.append((int(row["row"]), j))
        policy = self.policy.score(prompts, responses)
        reference = policy if self.reference is self.policy else self.reference.score(prompts, responses)
        return [_output_row(row, "kl", sample=j, tokens=len(resp), policy_lp=json.dumps(p), ref_lp=json.dumps(r))
                for (row, j), resp, p, r in zip(owners, responses, policy, reference)]

    def _perplexity(self, rows: list[dict]) -> list[dict]:
        if not rows:
            return []
        pairs = [split_response(self.tokenizer, json.loads(r["messages"]), json.loads(r["target"])) for r in rows]
        scores = self.policy.score([p for p, _ in pairs], [t for _, t in pairs])
        return [_output_row(r["row"], "ppl", tokens=len(s), policy_lp=json.dumps(s)) for r, s in zip(rows, scores)]

    def _preference(self, rows: list[dict]) -> list[dict]:
        if not rows:
            return []
        prompts, chosen, rejected = [], [], []
        for r in rows:
            prompt = json.loads(r["messages"])
            target = json.loads(r["target"])
            p, c = split_response(self.tokenizer, prompt, target["chosen"])
            _, j = split_response(self.tokenizer, prompt, target["rejected"])
            prompts.append(p)
            chosen.append(c)
            rejected.append(j)
        policy_c = self.policy.score(prompts, chosen)
        policy_r = self.policy.score(prompts, rejected)
        if self.reference is self.policy:
            ref_c, ref_r = policy_c, policy_r
        else:
            ref_c, ref_r = self.reference.score(prompts, chosen), self.reference.score(prompts, rejected)
        return [_output_row(r["row"], "pref", tokens=len(c), policy_lp=json.dumps(pc), ref_lp=json.dumps(rc),
                            policy_lp2=json.dumps(pr), ref_lp2=json.dumps(rr))
                for r, c, pc, rc, pr, rr in zip(rows, chosen, policy_c, ref_c, policy_r, ref_r)]


def vllm_gpu_kwargs(user_kwargs: dict, settings: dict, reward_path: str | None, *, separate_reference: bool) -> dict:
    """vLLM's GPU settings for an eval actor (``stages.rollout.vllm_settings``): the policy and, when it is
    another model, the reference engine share the actor's GPU (each gets half the budget, not vLLM's
    0.9 twice: the second would not start), less what the reward model (loaded on the same GPU) takes."""
    import torch

    from stages.models import base_weights_bytes
    from stages.rollout.vllm_settings import vllm_engine_kwargs

    reserved = 0.0
    if reward_path:
        total = torch.cuda.mem_get_info()[1]
        reserved = min(0.5, 1.2 * (base_weights_bytes(reward_path) or 0) / total)  # weights + activations
    return vllm_engine_kwargs(on_gpu=True, max_new_tokens=settings.get("max_new_tokens"),
                              longest_prompt_tokens=settings.get("longest_tokens"),
                              engines_per_gpu=2 if separate_reference else 1,
                              gpu_fraction=settings.get("gpu_fraction", 1.0), reserved_fraction=reserved,
                              user_kwargs=user_kwargs)


def longest_sequence(rows: list[dict], tokenizer) -> int:
    """Tokens of the longest prompt (gen) or prompt + target (ppl, pref) among ``rows``."""
    longest = 0
    for r in rows:
        prompt = json.loads(r["messages"])
        if r["purpose"] == "gen":
            longest = max(longest, len(conversation_ids(tokenizer, prompt, add_generation_prompt=True)))
            continue
        target = json.loads(r["target"])
        for response in ([target] if r["purpose"] == "ppl" else [target["chosen"], target["rejected"]]):
            p, t = split_response(tokenizer, prompt, response)
            longest = max(longest, len(p) + len(t))
    return longest


def gpu_settings(rows: list[dict], model_path: str, chat_template: str | None, generation) -> dict | None:
    """What an eval actor on a GPU needs to size its vLLM engines; None on CPU or for the hf engine."""
    if not generation.gpus_per_actor or generation.engine == "hf":
        return None
    from stages.models import load_tokenizer

    tokenizer = load_tokenizer(model_path, chat_template)
    return {"longest_tokens": longest_sequence(rows, tokenizer), "max_new_tokens": generation.max_new_tokens,
            "gpu_fraction": min(1.0, generation.gpus_per_actor)}


def run_inference(rows: list[dict], *, model_path: str, reference_path: str | None, reward_path: str | None,
                  generation, chat_template: str | None = None) -> list[dict]:
    """Every row through an actor pool of :class:`EvalWorker` (``generation``: ``EvalGenerationConfig``)."""
    import ray

    from stages.rollout.base import vllm_cpu_env_vars

    if not rows:
        return []
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.execution_options.preserve_order = True
    sampling = {"max_new_tokens": generation.max_new_tokens, "temperature": generation.temperature,
                "top_p": generation.top_p, "seed": generation.seed}
    kl_sampling = {"max_new_tokens": generation.max_new_tokens, "temperature": 1.0, "top_p": 1.0,
                   "n": generation.num_samples, "seed": generation.seed}
    remote_args: dict[str, Any] = {"num_cpus": generation.cpus_per_actor}
    if generation.gpus_per_actor:
        remote_args["num_gpus"] = generation.gpus_per_actor
    elif generation.engine in ("vllm", "auto"):
        remote_args["runtime_env"] = {"env_vars": vllm_cpu_env_vars()}
    dataset = ray.data.from_items(rows).map_batches(
        EvalWorker,
        fn_constructor_kwargs={
            "model_path": str(model_path),
            "reference_path": str(reference_path) if reference_path else None,
            "reward_path": str(reward_path) if reward_path else None,
            "engine": generation.engine,
            "engine_kwargs": generation.engine_kwargs,
            "sampling": sampling,
            "kl_sampling": kl_sampling if generation.num_samples > 0 else None,
            "chat_template": chat_template,
            "device": "cuda" if generation.gpus_per_actor else "cpu",
            "gpu_settings": gpu_settings(rows, str(model_path), chat_template, generation),
        },
        batch_size=generation.batch_size,
        compute=ray.data.ActorPoolStrategy(size=generation.concurrency),  # `concurrency=` is deprecated (Ray 2.51)
        batch_format="numpy",
        **remote_args,
    )
    return [{k: _plain(v) for k, v in row.items()} for row in dataset.take_all()]


def _plain(value: Any) -> Any:
    """numpy scalars -> Python scalars."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value
