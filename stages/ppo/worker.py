"""The per-worker PPO loop (Ray Train ``train_loop_per_worker``); the driver is ``stages.ppo.stage``.

Each iteration, on every worker:

1. take this rank's prompts of the iteration (a seeded permutation; the iteration index is the
   data position), send them to this rank's rollout engines (Ray actors): ``n`` samples each;
2. score the responses (verifier / ``module:function`` in-process, reward model in an actor or here);
3. old log-probs, reference log-probs, values (critic) with the trainer's model, then advantages
   (``stages.rl.compute_advantages``) with the KL penalty in the reward or in the loss;
4. ``ppo_epochs`` passes over shuffled mini-batches: PPO-clip + clipped value loss + entropy bonus
   (+ k3 KL for grpo/rloo) under DeepSpeed ZeRO or DDP;
5. weight sync (rank 0): LoRA -> the adapter saved to ``<work_dir>/sync/step-N`` and loaded by every
   engine; full -> a state_dict gathered one parameter at a time (ZeRO-3) or a saved folder;
6. metrics -> ``ray.train.report`` (with a checkpoint every ``train.save_steps``), a JSONL file,
   TensorBoard.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path

import torch

from stages.launcher import TRAIN_LOG, WORKER_INFO
from stages.ppo import checkpoint as ckpt
from stages.ppo.policy import ActorCritic, causal_lm, is_peft
from stages.ppo.rollout import Batch, make_experience, pack, response_logprobs
from stages.rl import (
    AdaptiveKLController,
    FixedKLController,
    aggregate_loss,
    entropy_from_logits,
    explained_variance,
    k3,
    ppo_policy_loss,
    value_loss,
)

METRICS_FILE = "ppo_metrics.jsonl"


# --------------------------------------------------------------------------- distributed helpers


def dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def reduce_metrics(local: dict[str, float], ops: dict[str, str]) -> dict[str, float]:
    """All-reduce a flat dict across ranks: ``mean`` by default, ``sum`` / ``max`` where ``ops`` says."""
    import torch.distributed as dist

    keys = sorted(local)
    rank, world = dist_info()
    if world == 1:
        return dict(local)
    out = {}
    for op_name, op in (("mean", dist.ReduceOp.SUM), ("sum", dist.ReduceOp.SUM), ("max", dist.ReduceOp.MAX)):
        group = [k for k in keys if ops.get(k, "mean") == op_name]
        if not group:
            continue
        values = torch.tensor([float(local[k]) for k in group], dtype=torch.float64)
        dist.all_reduce(values, op=op)
        if op_name == "mean":
            values /= world
        out.update(zip(group, values.tolist()))
    return out


# --------------------------------------------------------------------------- optimisation


def make_scheduler(optimizer, train: dict, total_steps: int):
    from transformers import get_scheduler

    kwargs = {"min_lr_rate": 0.1} if train["lr_schedule"] == "cosine_with_min_lr" else None
    return get_scheduler(train["lr_schedule"], optimizer, num_warmup_steps=int(train["warmup_ratio"] * total_steps),
                         num_training_steps=max(1, total_steps), scheduler_specific_kwargs=kwargs)


def deepspeed_dict(args: dict, lr: float, client_optimizer: bool) -> dict:
    from pipeline.spec import DeepSpeedConfig
    from stages.ds_config import deepspeed_config

    train = args["train"]
    config = deepspeed_config(DeepSpeedConfig(**args["deepspeed"]))
    config.update(
        train_micro_batch_size_per_gpu=train["batch_size"],
        gradient_accumulation_steps=train["grad_accum"],
        gradient_clipping=train["max_grad_norm"],
        bf16={"enabled": args["precision"] == "bf16"},
        fp16={"enabled": args["precision"] == "fp16"},
        zero_allow_untested_optimizer=True,
    )
    if not client_optimizer:
        config["optimizer"] = {"type": "AdamW", "params": {"lr": lr, "weight_decay": train["weight_decay"]}}
    return config


class Trainee:
    """A module and its optimizer + LR schedule: a DeepSpeed engine (ZeRO) or plain torch (DDP).

    ``forward`` is the wrapped module (call it for training forwards), ``module`` the bare one.
    ``backward`` + ``step`` count micro-batches; the optimizer steps every ``grad_accum`` of them.
    """

    def __init__(self, module: torch.nn.Module, lr: float, args: dict, total_steps: int, wrap: bool = True) -> None:
        train = args["train"]
        self.zero_stage = args["deepspeed"]["zero_stage"]
        self.grad_accum = train["grad_accum"]
        self.max_grad_norm = train["max_grad_norm"]
        self.micro = 0
        params = [p for p in module.parameters() if p.requires_grad]
        if self.zero_stage is not None:
            import deepspeed

            offload = args["deepspeed"]["offload_optimizer"]
            optimizer = None if offload else torch.optim.AdamW(params, lr=lr, weight_decay=train["weight_decay"])
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=module, optimizer=optimizer, model_parameters=params if offload else None,
                config=deepspeed_dict(args, lr, client_optimizer=not offload),
                lr_scheduler=lambda opt: make_scheduler(opt, train, total_steps),
            )
            self.forward = self.engine
            self.module = self.engine.module
        else:
            import ray.train.torch  # noqa: F401

            self.engine = None
            self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=train["weight_decay"])
            self.scheduler = make_scheduler(self.optimizer, train, total_steps)
            self.params = params
            # DDP when world > 1 (outside Ray Train, e.g. in unit tests: wrap=False, the bare module).
            self.forward = ray.train.torch.prepare_model(module, move_to_device=args["use_gpu"]) if wrap else module
            self.module = module

    def backward(self, loss: torch.Tensor) -> None:
        if self.engine is not None:
            self.engine.backward(loss)  # scaled by 1 / grad_accum inside
        else:
            (loss / self.grad_accum).backward()

    def step(self) -> None:
        self.micro += 1
        if self.engine is not None:
            self.engine.step()  # steps optimizer + scheduler at accumulation boundaries
            return
        if self.micro % self.grad_accum == 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save(self, folder: Path, rank: int) -> None:
        if self.engine is not None:
            self.engine.save_checkpoint(str(folder), tag="state", client_state={"micro": self.micro},
                                        exclude_frozen_parameters=True)
            return
        if rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            trainable = {n: p.detach().cpu() for n, p in self.module.named_parameters() if p.requires_grad}
            torch.save({"trainable": trainable, "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "micro": self.micro}, folder / "state.pt")

    def load(self, folder: Path) -> None:
        if self.engine is not None:
            _, client = self.engine.load_checkpoint(str(folder), tag="state", load_module_strict=False)
            self.micro = (client or {}).get("micro", 0)
            return
        state = torch.load(folder / "state.pt", weights_only=False)
        params = dict(self.module.named_parameters())
        with torch.no_grad():
            for name, tensor in state["trainable"].items():
                params[name].copy_(tensor)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.micro = state["micro"]


# --------------------------------------------------------------------------- weight sync


def gathered_state_dict(module: torch.nn.Module, trainable_only: bool = False) -> dict | None:
    """Rank 0: ``{name: cpu tensor}`` of ``module``'s parameters (and persistent buffers); None elsewhere.

    Under ZeRO-3 each parameter is gathered on its own (``deepspeed.zero.GatheredParameters``), so at
    most one full parameter is materialised at a time. Every rank must call this.
    """
    rank, _ = dist_info()
    out: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        if hasattr(param, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if rank == 0:
                    out[name] = param.data.detach().cpu().clone()
        elif rank == 0:
            out[name] = param.detach().cpu().clone()
    if not trainable_only and rank == 0:
        persistent = set(module.state_dict().keys())
        out.update({n: b.detach().cpu().clone() for n, b in module.named_buffers() if n in persistent})
    return out if rank == 0 else None


def save_policy(actor: ActorCritic, folder: Path, tokenizer=None) -> Path | None:
    """Write the policy as a plain HF folder (the adapter under LoRA, full weights otherwise); collective."""
    rank, _ = dist_info()
    policy = actor.policy
    if is_peft(policy):
        state = gathered_state_dict(policy, trainable_only=True)
        if rank == 0:
            policy.save_pretrained(str(folder), state_dict=state, safe_serialization=True)
    else:
        lm = causal_lm(policy)
        state = gathered_state_dict(lm)
        if rank == 0:
            lm.save_pretrained(str(folder), state_dict=state, safe_serialization=True)
    if rank == 0 and tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder if rank == 0 else None


def sync_weights(actor: ActorCritic, engines, work_dir: Path, step: int, mode: str = "auto") -> dict:
    """Push the current policy to every rollout engine; returns ``{"sync_seconds", "sync_method", ...}``.

    Collective (every rank calls it; rank 0 talks to the engines). ``engines`` is a
    ``RolloutGroup`` over all engines (rank 0) or None. LoRA: the adapter goes through a folder
    (``<work_dir>/sync/step-N``; each engine loads it under a fresh LoRA id). Full weights: a
    state_dict (``mode`` auto / state_dict) or a saved folder (``mode: folder``).
    """
    rank, _ = dist_info()
    started = time.perf_counter()
    sync_root = Path(work_dir) / "sync"
    infos = []
    if is_peft(actor.policy) or mode == "folder":
        folder = sync_root / f"step-{step}"
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
        save_policy(actor, folder)
        if rank == 0:
            infos = engines.update_weights(str(folder))
            for old in sync_root.glob("step-*"):  # the engines have loaded it: older folders can go
                if old != folder and int(old.name.split("-")[1]) < step - 1:
                    shutil.rmtree(old, ignore_errors=True)
    else:
        state = gathered_state_dict(causal_lm(actor.policy))
        if rank == 0:
            infos = engines.update_weights(state)
    ckpt.barrier()
    infos = infos if isinstance(infos, list) else [infos]  # a RolloutGroup, or one engine
    result = {"sync_seconds": time.perf_counter() - started}
    if infos:
        result["sync_method"] = infos[0].method
        result["engine_sync_seconds"] = max(i.seconds for i in infos)
    return result


# --------------------------------------------------------------------------- data


class PromptPlan:
    """Which prompts an iteration uses: a seeded permutation per pass over the data, sliced by rank."""

    def __init__(self, rows: list[dict], per_step: int, rank: int, world: int, seed: int) -> None:
        self.rows, self.per_step, self.rank, self.world, self.seed = rows, per_step, rank, world, seed
        self.per_rank = per_step // world
        self._orders: dict[int, list[int]] = {}

    def order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.rows)))
            random.Random(f"ppo-prompts/{self.seed}/{epoch}").shuffle(order)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def indices(self, iteration: int) -> list[int]:
        start = iteration * self.per_step + self.rank * self.per_rank
        n = len(self.rows)
        return [self.order(k // n)[k % n] for k in range(start, start + self.per_rank)]


def prompt_token_ids(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def my_engines(engines: list, rank: int, world: int) -> list:
    """This rank's engines: ``engines[rank::world]``, or one shared engine when there are fewer engines than ranks."""
    return engines[rank::world] or [engines[rank % len(engines)]]


# --------------------------------------------------------------------------- the loop


def train_ppo_worker(args: dict) -> None:
    """Per-worker PPO / GRPO / RLOO / REINFORCE++ loop."""
    import ray.train

    from pipeline.spec import PeftConfig
    from stages.data.records import PromptExample
    from stages.models import load_tokenizer
    from stages.ppo.policy import load_policy, load_reference, load_separate_critic, parameter_counts
    from stages.ppo.rewards import RewardSources
    from stages.rollout import SamplingParams
    from stages.rollout.actors import RolloutGroup
    from stages.worker import model_summary, setup_worker

    setup_worker(args)
    rank, world = dist_info()
    work_dir = Path(args["work_dir"])
    train, algo, rollout = args["train"], args["algorithm"], args["rollout"]
    torch.manual_seed(train["seed"] + rank)
    if args["deepspeed"]["zero_stage"] is not None:
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if args["use_gpu"] else "gloo")

    tokenizer = load_tokenizer(args["model_source"], args["chat_template"], args["trust_remote_code"])
    peft = PeftConfig(**args["peft"])
    load = dict(trust_remote_code=args["trust_remote_code"])
    policy = load_policy(args["model_source"], peft, args["precision"],
                         gradient_checkpointing=train["gradient_checkpointing"], **load)
    critic_mode = args["critic_mode"]  # None (critic-free), "shared", "separate"
    actor = ActorCritic(policy, value_head=critic_mode == "shared")
    ref_model = None if is_peft(policy) else load_reference(args["model_source"], peft, args["precision"], **load)
    critic = None
    if critic_mode == "separate":
        critic = load_separate_critic(args["critic_source"], peft, args["precision"], tokenizer.pad_token_id, **load)

    rows = [json.loads(line) for line in open(args["prompts_file"])]
    plan = PromptPlan(rows, rollout["prompts_per_step"], rank, world, train["seed"])
    samples = plan.per_rank * rollout["n"]
    minibatches = math.ceil(samples / train["batch_size"])
    iterations = args["iterations"]
    total_steps = iterations * algo["ppo_epochs"] * max(1, minibatches // train["grad_accum"])
    policy_trainee = Trainee(actor, train["lr"], args, total_steps)
    actor = policy_trainee.module
    trainees = {"policy": policy_trainee}
    critic_trainee = None
    if critic is not None:
        critic_trainee = Trainee(critic, args["critic_lr"] or train["lr"], args, total_steps)
        critic = critic_trainee.module
        trainees["critic"] = critic_trainee
    info = {"reference": "adapter-disabled policy" if ref_model is None else "frozen copy",
            "critic": critic_mode or "none", **parameter_counts(actor, critic, ref_model)}

    kl_ctl = (AdaptiveKLController(algo["kl_coef"], algo["kl_target"], algo["kl_horizon"]) if algo["kl_target"]
              else FixedKLController(algo["kl_coef"]))
    start, resumed_from = 0, None
    with ckpt.find_resume(work_dir) as folder:
        if folder is not None:
            state = ckpt.restore(folder, trainees, rank)
            start, resumed_from = state["iteration"], str(folder)
            if isinstance(kl_ctl, AdaptiveKLController):
                kl_ctl.value = state["kl_coef"]
            if rank == 0:
                print(f"[rayalign] {args['stage']}: resuming from {folder} (iteration {start})", flush=True)

    all_engines = RolloutGroup(args["engines"])
    engines = RolloutGroup(my_engines(args["engines"], rank, world))
    rewards = RewardSources(args["reward_fn"], args.get("reward_actor") or args.get("reward_model_dir"))
    history = load_history(work_dir, start) if rank == 0 else []
    writer = tensorboard_writer(args, start) if rank == 0 else None
    tokens_cache: dict[int, list[int]] = {}
    sync = {}
    if start > 0:  # the engines start from the initial policy: bring them to the restored one
        sync = sync_weights(actor, all_engines if rank == 0 else None, work_dir, start, rollout["sync"])
    run_started = time.monotonic()

    for iteration in range(start, iterations):
        step = iteration + 1
        iteration_started = time.perf_counter()
        # 1. rollouts
        indices = plan.indices(iteration)
        for i in indices:
            if i not in tokens_cache:
                tokens_cache[i] = prompt_token_ids(tokenizer, rows[i]["prompt"])
        params = SamplingParams(max_new_tokens=rollout["max_new_tokens"], temperature=rollout["temperature"],
                                top_p=rollout["top_p"], top_k=rollout["top_k"], n=rollout["n"],
                                seed=train["seed"] * 1_000_003 + iteration * 10_007 + rank * 101)
        t0 = time.perf_counter()
        results = engines.generate([tokens_cache[i] for i in indices], params)
        rollout_seconds = time.perf_counter() - t0
        if args["colocate"]:
            ckpt.barrier()
            if rank == 0:
                all_engines.sleep()

        # 2. rewards
        examples = [PromptExample.from_trl(rows[i]) for i in indices for _ in range(rollout["n"])]
        totals, parts = rewards(examples, [r.response_text for r in results])
        scores = torch.tensor(totals, dtype=torch.float32)
        finished = torch.tensor([r.finished for r in results])

        # 3. experience
        batch = pack([r.prompt_ids for r in results], [r.response_ids for r in results], tokenizer.pad_token_id)
        engine_logprobs = torch.zeros_like(batch.mask)
        for row, r in enumerate(results):
            engine_logprobs[row, :len(r.logprobs)] = torch.tensor(r.logprobs, dtype=torch.float32)
        actor.eval()
        if critic is not None:
            critic.eval()
        exp = make_experience(actor, critic, ref_model, batch, engine_logprobs, scores, finished, algo,
                              kl_ctl.value, rollout["n"], chunk=max(train["batch_size"], 16),
                              temperature=rollout["temperature"])

        # 4. PPO epochs
        experience_seconds = time.perf_counter() - t0 - rollout_seconds
        t0 = time.perf_counter()
        actor.train()
        if critic is not None:
            critic.train()
        stats = ppo_update(exp, policy_trainee, critic_trainee, algo, train, rollout["temperature"], kl_ctl.value,
                           seed=train["seed"] * 7919 + iteration)
        train_seconds = time.perf_counter() - t0

        # 5. weight sync
        if args["colocate"] and rank == 0:
            all_engines.wake()
        sync = sync_weights(actor, all_engines if rank == 0 else None, work_dir, step, rollout["sync"])

        # 6. metrics
        mask = batch.mask
        local = {
            "reward_mean": float(scores.mean()), "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
            "score_mean": float(exp.scores.mean()), "response_length": float(mask.sum(-1).mean()),
            "finished_fraction": float(finished.float().mean()), "kl_coef": float(kl_ctl.value),
            "rollout_tokens": float(mask.sum()), "rollout_seconds": rollout_seconds,
            "training_tokens": float(batch.attention_mask.sum()) * algo["ppo_epochs"], "training_seconds": train_seconds,
            "sync_seconds": sync["sync_seconds"], "lr": policy_trainee.lr, "experience_seconds": experience_seconds,
            "iteration_seconds": time.perf_counter() - iteration_started, "samples": float(len(results)),
            **{f"reward_{name}_mean": sum(v) / len(v) for name, v in parts.items() if len(parts) > 1},
            **exp.stats, **stats,
        }
        if exp.values is not None:
            local["explained_variance"] = float(explained_variance(exp.values, exp.returns, mask))
        ops = {"rollout_tokens": "sum", "training_tokens": "sum", "samples": "sum", "rollout_seconds": "max",
               "training_seconds": "max", "sync_seconds": "max", "experience_seconds": "max", "iteration_seconds": "max"}
        metrics = {k: v for k, v in reduce_metrics(local, ops).items() if not math.isnan(v)}
        metrics["rollout_tokens_per_s"] = metrics["rollout_tokens"] / max(metrics["rollout_seconds"], 1e-9)
        # (not "train_*": curves_from_history drops those names, they are the HF Trainer's summary keys)
        metrics["training_tokens_per_s"] = metrics["training_tokens"] / max(metrics["training_seconds"], 1e-9)
        metrics["samples_per_s"] = metrics["samples"] / max(metrics["iteration_seconds"], 1e-9)
        kl_ctl.update(metrics["kl"], n_steps=samples * world)
        metrics["step"] = step
        report = {**metrics, "sync_method": sync.get("sync_method", "")}
        if rank == 0:
            history.append(report)
            append_metrics(work_dir, report)
            if writer is not None:
                for key, value in metrics.items():
                    if key != "step":
                        writer.add_scalar(f"ppo/{key}", value, step)
                writer.flush()
            if step % train["logging_steps"] == 0 or step == iterations or step == start + 1:
                print(f"[rayalign] {args['stage']}: iteration {step}/{iterations} reward {metrics['reward_mean']:.3f} "
                      f"kl {metrics['kl']:.4f} entropy {metrics['entropy']:.3f} "
                      f"{'value_loss %.4f ' % metrics['value_loss'] if 'value_loss' in metrics else ''}"
                      f"rollout {metrics['rollout_tokens_per_s']:.0f} tok/s sync {metrics['sync_seconds']:.2f}s "
                      f"({report['sync_method']}) elapsed {time.monotonic() - run_started:.1f}s", flush=True)

        # 7. checkpoint + report
        if train["save_steps"] and step % train["save_steps"] == 0 and step < iterations:
            folder = ckpt.save(work_dir, step, trainees, {"kl_coef": float(kl_ctl.value)}, rank)
            checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if rank == 0 else None
            ray.train.report(report, checkpoint=checkpoint)
        else:
            ray.train.report(report)

    # final policy
    actor.eval()
    save_policy(actor, Path(args["model_dir"]), tokenizer)
    if actor.value_head is not None:
        from stages.ppo.policy import save_value_head

        state = gathered_state_dict(actor.value_head)
        if rank == 0:
            save_value_head(actor, work_dir / "critic", state)
    elif critic is not None:
        state = gathered_state_dict(critic.model, trainable_only=is_peft(critic.model))
        if rank == 0:
            from safetensors.torch import save_file

            (work_dir / "critic").mkdir(exist_ok=True)
            save_file({k: v.contiguous() for k, v in state.items()}, str(work_dir / "critic" / "critic.safetensors"))
    probe = probe_outputs(actor, tokenizer)
    if writer is not None:
        writer.close()
    if rank == 0:
        final = history[-1] if history else {}
        log = {
            "log_history": history,
            "train_metrics": {"train_runtime": time.monotonic() - run_started, "iterations": iterations},
            "global_step": iterations,
            "resumed_from": resumed_from,
            "resumed_step": start if resumed_from else None,
            "model_summary": model_summary(actor.policy),
            "probe": probe,
        }
        (work_dir / WORKER_INFO).write_text(json.dumps({**info, "sync_method": final.get("sync_method")}))
        (work_dir / TRAIN_LOG).write_text(json.dumps(log, default=float))
        shutil.rmtree(work_dir / "sync", ignore_errors=True)


def ppo_update(exp, policy_trainee: Trainee, critic_trainee: Trainee | None, algo: dict, train: dict,
               temperature: float, kl_coef: float, seed: int) -> dict:
    """``ppo_epochs`` passes over shuffled mini-batches of one iteration's experience; mean stats."""
    n = exp.batch.mask.shape[0]
    generator = torch.Generator().manual_seed(seed)
    shared = policy_trainee.module.value_head is not None
    kl_in_loss = algo["kl_placement"] == "loss"
    sums: dict[str, float] = {}
    count = 0
    for _ in range(algo["ppo_epochs"]):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, train["batch_size"]):
            idx = order[start:start + train["batch_size"]]
            part: Batch = exp.batch.rows(idx)
            mask = part.mask
            args = (part.input_ids, part.attention_mask, part.position_ids, part.T)
            logits, values = policy_trainee.forward(*args, with_values=shared)
            logp = response_logprobs(logits, part, temperature)
            loss, stats = ppo_policy_loss(logp, exp.old_logprobs[idx], exp.advantages[idx], mask,
                                          clip_eps=algo["clip_eps"], clip_eps_high=algo["clip_eps_high"],
                                          loss_agg=algo["loss_agg"])
            entropy = entropy_from_logits(logits.detach() / temperature if not algo["entropy_coef"] else
                                          logits / temperature, mask)
            if algo["entropy_coef"]:
                loss = loss - algo["entropy_coef"] * entropy
            if kl_in_loss and kl_coef:
                kl_loss = aggregate_loss(k3(logp, exp.ref_logprobs[idx]) * mask, mask, algo["loss_agg"])
                loss = loss + kl_coef * kl_loss
                stats["kl_loss"] = kl_loss.detach()
            if shared:
                v_loss, v_stats = value_loss(values, exp.values[idx], exp.returns[idx], mask,
                                             clip_eps=algo["value_clip_eps"], loss_agg=algo["loss_agg"])
                loss = loss + algo["vf_coef"] * v_loss
                stats.update(v_stats)
            policy_trainee.backward(loss)
            policy_trainee.step()
            if critic_trainee is not None:
                v = critic_trainee.forward(*args)
                v_loss, v_stats = value_loss(v, exp.values[idx], exp.returns[idx], mask,
                                             clip_eps=algo["value_clip_eps"], loss_agg=algo["loss_agg"])
                critic_trainee.backward(v_loss)
                critic_trainee.step()
                stats.update(v_stats)
            stats["entropy_train"] = entropy.detach()
            stats["loss"] = loss.detach()
            for key, value in stats.items():
                if key == "ratio_max":
                    sums[key] = max(sums.get(key, 0.0), float(value))
                else:
                    sums[key] = sums.get(key, 0.0) + float(value)
            count += 1
    return {k: (v if k == "ratio_max" else v / max(count, 1)) for k, v in sums.items()}


# --------------------------------------------------------------------------- records


def load_history(work_dir: Path, start: int) -> list[dict]:
    """The metrics of iterations up to ``start`` (a resumed run continues the curves); the file is rewritten."""
    path = work_dir / METRICS_FILE
    history = []
    if path.exists() and start > 0:
        history = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        history = [h for h in history if h.get("step", 0) <= start]
    path.write_text("".join(json.dumps(h) + "\n" for h in history))
    return history


def append_metrics(work_dir: Path, record: dict) -> None:
    with open(work_dir / METRICS_FILE, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def tensorboard_writer(args: dict, start: int):
    import os

    if args["report_to"] != "tensorboard":
        return None
    from torch.utils.tensorboard import SummaryWriter

    log_dir = args["env"].get("TENSORBOARD_LOGGING_DIR") or os.environ.get("TENSORBOARD_LOGGING_DIR")
    return SummaryWriter(log_dir=log_dir, purge_step=start + 1 if start else None) if log_dir else None


@torch.no_grad()
def probe_outputs(actor: ActorCritic, tokenizer) -> dict:
    """The final policy's last-position logits on a fixed text (checks the saved folder; see stages.worker)."""
    from stages.worker import PROBE_TEXT

    ids = tokenizer(PROBE_TEXT, return_tensors="pt").input_ids
    logits = causal_lm(actor.policy)(input_ids=ids).logits
    return {"text": PROBE_TEXT, "logits": logits[0, -1].float().cpu().tolist()}
