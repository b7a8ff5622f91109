"""Continual learning: elastic weight consolidation (an SFT stage's ``continual.ewc``).

    previous = prepare_previous_task(ctx, config)                # driver: the old task's rows
    held_out = use_ewc(trainer, ewc, train_file, eval_file)      # worker: Fisher, anchor, penalty

The penalty is ``lambda / 2 * sum_i F_i (theta_i - theta*_i)^2`` over the trainable weights: ``theta*`` are
their values before the first step (the upstream model, or an adapter as it starts) and ``F`` the diagonal
empirical Fisher, the mean over old-task examples of each example's squared loss gradient (Kirkpatrick et al.,
2017). TRL has no hook for a regulariser, so the trainer's ``compute_loss`` is wrapped on the instance.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stages import training_data
from stages.config import EWCConfig, TrainingDataSection

if TYPE_CHECKING:
    import torch

    from stages.stage import StageContext
    from stages.training_data import PreparedData

PREVIOUS_TASK = "previous_task"  # heldout_loss/previous_task: the old task's held-out loss on the final model
PENALTY_METRIC = "ewc_penalty"  # logged with the loss: the penalty's value (before the accumulation scaling)


# --------------------------------------------------------------------------- driver


def previous_task_data(ctx: StageContext, ewc: EWCConfig):
    """``continual.ewc.data``, else the data the upstream stage trained on (its manifest's config)."""
    if ewc.data is not None:
        return ewc.data
    from pydantic import TypeAdapter

    upstream = ctx.inputs["from"]
    raw = (upstream.manifest.get("config") or {}).get("data")
    if raw is None:
        raise ValueError(f"stage {ctx.name!r}: continual.ewc.data: the upstream model ({upstream.path}) records no "
                         f"training data in a manifest; give the old task's data")
    return TypeAdapter(TrainingDataSection).validate_python(raw)


def prepare_previous_task(ctx: StageContext, config) -> PreparedData | None:
    """The old task's rows under ``<work_dir>/previous_task`` (None without ``continual.ewc``)."""
    ewc = config.continual.ewc
    if ewc is None:
        return None
    data = previous_task_data(ctx, ewc)
    ctx.log(f"continual.ewc: the Fisher on {ewc.fisher_samples} examples of the previous task")
    return training_data.prepare(ctx, data, "sft", seed=config.train.seed, folder_name=PREVIOUS_TASK)


# --------------------------------------------------------------------------- the algorithm (pure functions)


def diagonal_fisher(model, batches, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
    """Per parameter, the sum over ``batches`` (one example each) of its squared loss gradient, and the
    number of examples. The model is in eval mode meanwhile (no dropout) and its gradients are cleared."""
    import torch

    sums = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    was_training, count = model.training, 0
    model.eval()
    for batch in batches:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        for total, param in zip(sums, params):
            if param.grad is not None:
                total += param.grad.detach().float() ** 2
        count += 1
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return sums, count


def ewc_penalty(params: list[torch.Tensor], anchor: list[torch.Tensor], fisher: list[torch.Tensor]) -> torch.Tensor:
    """``sum_i F_i (theta_i - theta*_i)^2`` (without the ``lambda / 2``)."""
    return sum(((p.float() - a) ** 2 * f).sum() for p, a, f in zip(params, anchor, fisher))


class EWCPenalty:
    """The penalty over fixed parameter tensors; the anchor and the Fisher follow the parameters to their
    device once (DeepSpeed moves the model to the GPU after the Fisher was taken)."""

    def __init__(self, params: list, fisher: list, strength: float) -> None:
        self.params, self.fisher, self.strength = params, fisher, strength
        self.anchor = [p.detach().float().clone() for p in params]

    def __call__(self):
        if self.params and self.anchor[0].device != self.params[0].device:
            self.anchor = [a.to(p.device) for a, p in zip(self.anchor, self.params)]
            self.fisher = [f.to(p.device) for f, p in zip(self.fisher, self.params)]
        return self.strength / 2 * ewc_penalty(self.params, self.anchor, self.fisher)


# --------------------------------------------------------------------------- worker


def use_ewc(trainer, ewc: EWCConfig, train_file: str, eval_file: str | None) -> dict:
    """Estimate the Fisher on the old task (each data-parallel rank its share of the examples, summed over
    ranks), anchor the trainable weights where they start, and add the penalty to the training loss.
    Returns the old task's held-out set for ``train_and_save``'s ``final_evals``."""
    from stages.worker import STAGE_METRICS

    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    if params and params[0].device.type == "cpu" and trainer.args.device.type != "cpu":
        model.to(trainer.args.device)  # DeepSpeed would move it at the first step; the Fisher runs there now
    sums, count = diagonal_fisher(model, _fisher_batches(trainer, train_file, ewc.fisher_samples), params)
    examples = _sum_over_ranks(sums, count)
    fisher = [total / max(1, examples) for total in sums]
    size = sum(f.numel() for f in fisher)
    setattr(trainer, STAGE_METRICS, {"ewc_fisher_examples": examples,  # in the manifest's metrics
                                     "ewc_fisher_mean": float(sum(f.sum() for f in fisher)) / max(1, size)})
    _add_to_loss(trainer, EWCPenalty(params, fisher, ewc.lambda_))
    return {PREVIOUS_TASK: training_data.read_dataset(eval_file)} if eval_file else {}


def _fisher_batches(trainer, train_file: str, samples: int):
    """This rank's share of the first ``samples`` old-task rows, tokenized and collated as the trainer's own
    (``SFTTrainer._prepare_dataset``: what ``SFTTrainer.evaluate`` does with a raw set), one example a batch."""
    from stages import train_session

    rows = training_data.read_dataset(train_file)
    rank, world = train_session.world_rank(), train_session.world_size()
    rows = rows.select(range(rank, min(samples, len(rows)), world))
    examples = trainer._prepare_dataset(rows, trainer.processing_class, trainer.args, False,
                                        trainer._formatting_func, "ewc")
    device = next(trainer.model.parameters()).device
    for example in examples:
        batch = trainer.data_collator([{k: v for k, v in example.items() if k in _TOKEN_FIELDS}])
        yield {k: v.to(device) for k, v in batch.items() if k in _MODEL_FIELDS}


_TOKEN_FIELDS = ("input_ids", "completion_mask", "assistant_masks")
_MODEL_FIELDS = ("input_ids", "attention_mask", "position_ids", "labels")


def _sum_over_ranks(sums: list, count: int) -> int:
    """Sum each rank's Fisher sums in place; the number of examples over every rank."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return count
    for total in sums:
        dist.all_reduce(total)
    counted = torch.tensor([count], dtype=torch.float32, device=sums[0].device if sums else "cpu")
    dist.all_reduce(counted)
    return int(counted.item())


def _add_to_loss(trainer, penalty: EWCPenalty) -> None:
    """The trainer's training loss plus the penalty, counted once per optimizer step; evaluation unchanged."""
    compute_loss = trainer.compute_loss

    def with_penalty(model, inputs, return_outputs=False, num_items_in_batch=None):
        out = compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if not model.training:
            return out
        value = penalty()
        metrics = getattr(trainer, "_metrics", None)  # TRL's per-log averages: logged beside the loss
        if metrics is not None:
            metrics["train"][PENALTY_METRIC].append(float(value.detach()))
        if _trainer_scales_loss_itself(trainer, num_items_in_batch):
            # The model normalised its loss over the whole accumulated batch, so the trainer does not divide by
            # the accumulation steps: the penalty is divided here, so that a step adds it once.
            value = value / trainer.current_gradient_accumulation_steps
        return (out[0] + value, *out[1:]) if return_outputs else out + value

    trainer.compute_loss = with_penalty


def _trainer_scales_loss_itself(trainer, num_items_in_batch) -> bool:
    """transformers' ``Trainer.training_step`` rule for a loss already scaled for gradient accumulation."""
    if getattr(trainer, "loss_is_scaled_for_ga", None) is not None:
        return bool(trainer.loss_is_scaled_for_ga)
    return bool((trainer.model_accepts_loss_kwargs and num_items_in_batch is not None)
                or trainer.compute_loss_func is not None)
