"""The typed `train` section becomes the trainers' arguments the same way for every stage."""

from __future__ import annotations

from stages.job import WorkerJob
from stages.sft import SFTConfig as StageSFTConfig
from stages.worker import training_arguments


def job(tmp_path, **fields) -> WorkerJob:
    defaults = dict(stage="sft", work_dir=str(tmp_path), model_dir=str(tmp_path / "model"), model_source="m",
                    precision="fp32", threads=1, report_to="none")
    return WorkerJob(**{**defaults, **fields})


def stage(**train) -> StageSFTConfig:
    return StageSFTConfig(data="d.jsonl", train=train)


def test_schedule_length_and_checkpoints(tmp_path):
    from trl import SFTConfig

    args = training_arguments(SFTConfig, job(tmp_path), stage(max_steps=40, lr=1e-3, lr_schedule="linear",
                                                              warmup_ratio=0.1, batch_size=4, grad_accum=2,
                                                              save_steps=10))
    assert (args.max_steps, args.learning_rate, args.lr_scheduler_type.value) == (40, 1e-3, "linear")
    assert args.warmup_steps == 0.1 and args.get_warmup_steps(40) == 4
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (4, 2)
    assert args.save_strategy.value == "steps" and args.save_steps == 10 and args.save_total_limit == 1
    assert args.use_cpu and not args.bf16 and not args.gradient_checkpointing
    assert args.report_to == [] and args.deepspeed is None


def test_epochs_eval_and_early_stopping(tmp_path):
    from trl import SFTConfig

    args = training_arguments(SFTConfig, job(tmp_path, has_eval=True),
                              stage(epochs=2, eval_steps=5, early_stopping_patience=3))
    assert args.num_train_epochs == 2 and args.max_steps == -1
    assert args.eval_strategy.value == "steps" and args.eval_steps == 5
    assert args.load_best_model_at_end and args.metric_for_best_model == "eval_loss"
    assert args.save_strategy.value == "steps" and args.save_steps == 5  # the best model needs a save per eval


def test_bf16_and_tracking_are_passed_through(tmp_path):
    from trl import SFTConfig

    args = training_arguments(SFTConfig, job(tmp_path, report_to="tensorboard"),
                              stage(max_steps=1, gradient_checkpointing=True))
    assert args.report_to == ["tensorboard"] and args.gradient_checkpointing


def test_job_and_config_cross_the_ray_boundary_as_json(tmp_path):
    """What the launcher sends is plain JSON, and the worker gets the same typed objects back."""
    import json

    from stages.job import worker_arguments, worker_inputs

    sent = worker_arguments(job(tmp_path, train_file="t.jsonl"), stage(max_steps=3, lr=1e-3), engines=["handle"])
    received = json.loads(json.dumps({k: sent[k] for k in ("job", "config")}))
    back_job, back_config = worker_inputs(received, StageSFTConfig)
    assert back_job == job(tmp_path, train_file="t.jsonl") and back_config == stage(max_steps=3, lr=1e-3)
    assert back_config.train.lr == 1e-3 and back_config.peft.method == "lora" and sent["engines"] == ["handle"]


def test_a_config_whose_validators_read_the_given_keys_survives_the_trip():
    """dpo rejects settings its loss ignores by looking at the keys given: the worker must see the same keys."""
    import json

    from stages.dpo import DPOConfig
    from stages.job import worker_arguments, worker_inputs

    config = DPOConfig(data="p.jsonl", loss="simpo", simpo_gamma=0.8, train={"max_steps": 2})
    sent = json.loads(json.dumps(worker_arguments(job_for_trip(), config)))
    _, back = worker_inputs(sent, DPOConfig)
    assert back == config and back.simpo_gamma == 0.8 and back.beta == 0.1


def job_for_trip() -> WorkerJob:
    return WorkerJob(stage="dpo", work_dir="w", model_dir="w/model", model_source="m", precision="fp32", threads=1,
                     report_to="none")


def test_precision_auto_is_resolved_where_the_model_runs(ray_cluster, tmp_path):
    """The driver sends ``auto``; a worker whose hardware has bf16 trains in bf16 (here the check is made to
    answer yes inside a Ray task, standing in for a GPU worker), one without it in fp32."""
    import os

    import ray

    from stages.job import worker_arguments

    sent = worker_arguments(job(tmp_path, precision="auto"), stage(max_steps=1, precision="auto"))
    assert sent["job"]["precision"] == "auto"

    @ray.remote(num_cpus=0)
    def resolve_remotely(args: dict, has_bf16: bool) -> tuple[str, int]:
        import stages.models
        from stages.job import worker_inputs
        from stages.sft import SFTConfig
        from stages.worker import resolve_on_worker

        stages.models.bf16_supported = lambda use_gpu: has_bf16
        received_job, config = worker_inputs(args, SFTConfig)
        return resolve_on_worker(received_job, config).precision, os.getpid()

    (with_bf16, pid), (without, _) = ray.get([resolve_remotely.remote(sent, True), resolve_remotely.remote(sent, False)])
    assert (with_bf16, without) == ("bf16", "fp32") and pid != os.getpid()
