"""The adaptation methods and training techniques of issue 17, in this process (no Ray) on the tiny base:
rsLoRA and PiSSA/OLoRA init, BitFit, 8-bit QLoRA, cosine with restarts, layer-wise LR decay."""

from __future__ import annotations

import json

import pytest
import torch

from stages.config import PeftConfig, TrainConfig
from stages.models import load_model, model_init_kwargs, peft_config, quantization_config
from stages.optim import layer_lr_groups, make_scheduler, schedule_arguments, use_layer_lr_decay

TEXT = "12+34=46. The quick brown fox."
# The tiny base's shape (stages.tiny_base defaults): hidden 128, MLP 512, 2 layers, 4 heads of 32, no bias.
HIDDEN, MLP, LAYERS = 128, 512, 2


@pytest.fixture(scope="module")
def bias_base(tmp_path_factory):
    """builtin:tiny-llama-bias, random init (pretraining plays no part in these checks)."""
    from stages.tiny_base import VARIANTS, build_tiny_base

    out = tmp_path_factory.mktemp("tiny-bias") / "model"
    build_tiny_base(out, pretrain_steps=0, seed=0, **VARIANTS["tiny-llama-bias"])
    return out


def ids(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))(TEXT, return_tensors="pt").input_ids


def logits(model, input_ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def plain_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), use_safetensors=True)


def with_adapter(model_dir, cfg: PeftConfig):
    from peft import get_peft_model

    return get_peft_model(load_model(model_dir, cfg, "fp32"), peft_config(cfg))


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_steps(model, input_ids, steps: int, lr: float) -> list[float]:
    """``steps`` AdamW steps of next-token loss on one fixed batch; the losses before each step and after the last."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        losses.append(model(input_ids=input_ids, labels=input_ids).loss.item())
    return losses


# --------------------------------------------------------------------------- LoRA options


def test_lora_options_reach_peft():
    config = peft_config(PeftConfig(method="lora", use_rslora=True, init="olora"))
    assert (config.use_rslora, config.init_lora_weights) == (True, "olora")
    default = peft_config(PeftConfig(method="dora"))
    assert (default.use_rslora, default.init_lora_weights, default.use_dora) == (False, True, True)


def test_rslora_scales_by_alpha_over_sqrt_r_and_trains_the_lora_matrices(tiny_base):
    from peft.tuners.lora import LoraLayer

    model = with_adapter(tiny_base, PeftConfig(method="lora", r=4, alpha=8, use_rslora=True))
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 7 * LAYERS  # q, k, v, o, gate, up, down in each layer
    assert {m.scaling["default"] for m in layers} == {8 / 4 ** 0.5}  # alpha/sqrt(r) = 4.0, not alpha/r = 2.0
    # r * (in + out) per adapted linear: 4 square attention projections, gate/up 128->512, down 512->128.
    per_layer = 4 * 4 * (HIDDEN + HIDDEN) + 2 * 4 * (HIDDEN + MLP) + 4 * (MLP + HIDDEN)
    assert trainable(model) == LAYERS * per_layer == 23552


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_leave_the_initial_logits_unchanged(tiny_base, init):
    """They move W's principal part into the adapter and keep the residual in the base: W is unchanged."""
    input_ids = ids(tiny_base)
    before = logits(plain_model(tiny_base), input_ids)
    model = with_adapter(tiny_base, PeftConfig(method="lora", r=8, init=init))
    # The adapter is not a no-op (B != 0), unlike the default init.
    assert all(p.abs().max() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    # Measured: 1.9e-6 (pissa), 1.8e-6 (olora): float32 rounding of W_res + B A.
    assert (logits(model, input_ids) - before).abs().max().item() < 1e-4


def test_a_trained_pissa_rslora_adapter_reloads_with_plain_peft(tiny_base, tmp_path):
    from peft import PeftModel

    from stages.adaptation import save_converted_adapter, save_initial_adapter

    input_ids = ids(tiny_base)
    cfg = PeftConfig(method="lora", r=4, alpha=8, use_rslora=True, init="pissa")
    model = with_adapter(tiny_base, cfg)
    initial = save_initial_adapter(model, tmp_path / "work")
    losses = train_steps(model, input_ids, steps=3, lr=1e-2)
    assert losses[-1] < losses[0]  # the adapter moved
    trained = logits(model, input_ids)
    model.save_pretrained(str(tmp_path / "as-is"))  # relative to the residual base: wrong on the original
    save_converted_adapter(model, tmp_path / "adapter", initial)

    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (saved["r"], saved["use_rslora"], saved["init_lora_weights"]) == (8, True, True)  # rank 2r, plain LoRA
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    assert not list((tmp_path / "adapter").glob("*.bin"))
    reloaded = PeftModel.from_pretrained(plain_model(tiny_base), str(tmp_path / "adapter"))
    assert torch.allclose(logits(reloaded, input_ids), trained, atol=1e-5)
    # Why the conversion: saved as it is, the adapter holds only on the residual base. peft recomputes that
    # residual on load (init_lora_weights "pissa"); a loader that does not (vLLM, a plain LoRA load) is wrong.
    as_is_config = tmp_path / "as-is" / "adapter_config.json"
    assert json.loads(as_is_config.read_text())["init_lora_weights"] == "pissa"
    as_is_config.write_text(json.dumps({**json.loads(as_is_config.read_text()), "init_lora_weights": True}))
    as_is = PeftModel.from_pretrained(plain_model(tiny_base), str(tmp_path / "as-is"))
    assert (logits(as_is, input_ids) - trained).abs().max().item() > 1e-2


# --------------------------------------------------------------------------- BitFit


def test_bitfit_trains_exactly_the_biases(bias_base):
    model = load_model(bias_base, PeftConfig(method="bitfit"), "fp32")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.endswith(".bias") for n in names)
    # Per layer: q, k, v, o (128 each), gate, up (512 each), down (128).
    assert trainable(model) == LAYERS * (4 * HIDDEN + 2 * MLP + HIDDEN) == 3328
    assert trainable(model) == sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias"))


def test_bitfit_lowers_the_loss_and_saves_a_plain_transformers_model(bias_base, tmp_path):
    input_ids = ids(bias_base)
    model = load_model(bias_base, PeftConfig(method="bitfit"), "fp32")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = train_steps(model, input_ids, steps=20, lr=1e-2)
    # Random init, so the loss starts near ln(vocab). Measured: 4.79 -> 4.26 after 20 steps (the same at lr 3e-2
    # and 5e-2: biases alone on a random model fit little more than the text's token frequencies).
    # Asserted: at least 0.4 lower.
    assert losses[-1] < losses[0] - 0.4, losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)

    model.save_pretrained(str(tmp_path / "bitfit"), safe_serialization=True)
    assert not list((tmp_path / "bitfit").glob("*.bin"))
    reloaded = plain_model(tmp_path / "bitfit")
    assert torch.allclose(logits(reloaded, input_ids), logits(model, input_ids), atol=1e-5)


def test_bitfit_of_a_reward_model_also_trains_its_score_head(bias_base):
    model = load_model(bias_base, PeftConfig(method="bitfit"), "fp32", head="reward")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "score.weight" in names and all(n.endswith(".bias") for n in names - {"score.weight"})


def test_bitfit_on_a_model_without_biases_fails_before_training(tiny_base):
    with pytest.raises(ValueError, match="bitfit trains only biases, and LlamaForCausalLM has none"):
        load_model(tiny_base, PeftConfig(method="bitfit"), "fp32")


# --------------------------------------------------------------------------- 8-bit QLoRA


def test_qlora_quant_bits_choose_the_bitsandbytes_config():
    eight = model_init_kwargs(PeftConfig(method="qlora", quant_bits=8), "fp32", False)["quantization_config"]
    assert (eight.load_in_8bit, eight.load_in_4bit) == (True, False)
    four = quantization_config(4, "bf16")
    assert (four.load_in_4bit, four.load_in_8bit, four.bnb_4bit_quant_type, four.bnb_4bit_use_double_quant) == (
        True, False, "nf4", True)
    assert four.bnb_4bit_compute_dtype == torch.bfloat16
    assert PeftConfig(method="qlora").quant_bits == 4
    assert "quantization_config" not in model_init_kwargs(PeftConfig(method="lora"), "fp32", False)


# --------------------------------------------------------------------------- schedules


def lr_curve(scheduler, optimizer, steps: int) -> list[float]:
    curve = []
    for _ in range(steps):
        curve.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return curve


def test_cosine_with_restarts_returns_to_the_peak_num_cycles_times():
    train = TrainConfig(lr=1.0, lr_schedule="cosine_with_restarts", num_cycles=3, max_steps=30)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=train.lr)
    curve = lr_curve(make_scheduler(optimizer, train, 30), optimizer, 30)
    assert [step for step, lr in enumerate(curve) if lr == 1.0] == [0, 10, 20]  # one peak per cycle
    assert all(curve[s] > curve[s + 1] for s in range(30 - 1) if s not in (9, 19))  # falling within a cycle
    assert min(curve) < 0.03


def test_the_trainers_and_ppo_share_one_schedule(tmp_path):
    """The HF Trainer (SFT, reward, DPO) builds its scheduler from schedule_arguments: the same curve as
    make_scheduler (PPO's loop), warmup included."""
    from transformers import Trainer, TrainingArguments

    train = TrainConfig(lr=1.0, lr_schedule="cosine_with_restarts", num_cycles=2, warmup_ratio=0.1, max_steps=25)
    curves = []
    for build in ("trainer", "ppo"):
        model = torch.nn.Linear(2, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=train.lr)
        if build == "trainer":
            args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **schedule_arguments(train))
            scheduler = Trainer(model=model, args=args).create_scheduler(25, optimizer)
        else:
            scheduler = make_scheduler(optimizer, train, 25)
        curves.append(lr_curve(scheduler, optimizer, 25))
    assert curves[0] == curves[1]
    assert curves[1][:4] == [0.0, 1 / 3, 2 / 3, 1.0]  # ceil(0.1 * 25) = 3 warmup steps


# --------------------------------------------------------------------------- layer-wise LR decay


def test_layer_lr_decay_gives_each_depth_its_rate(tiny_base):
    model = plain_model(tiny_base)
    groups = layer_lr_groups(model, lr=1.0, decay=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    by_rate = {g["lr"]: sorted(names[id(p)] for p in g["params"]) for g in groups}
    assert [g["lr"] for g in groups] == [1.0, 0.5, 0.25, 0.125]  # head+norm, layer 1, layer 0, embedding
    assert by_rate[1.0] == ["model.norm.weight"]  # the head is tied to the embedding
    assert by_rate[0.125] == ["model.embed_tokens.weight"]  # decay ** (L + 1)
    assert all(n.startswith("model.layers.1.") for n in by_rate[0.5]) and len(by_rate[0.5]) == 9
    assert all(n.startswith("model.layers.0.") for n in by_rate[0.25]) and len(by_rate[0.25]) == 9
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_layer_lr_decay_under_lora_groups_only_the_adapter(tiny_base):
    model = with_adapter(tiny_base, PeftConfig(method="lora", r=4))
    groups = layer_lr_groups(model, lr=2e-3, decay=0.8)
    assert [g["lr"] for g in groups] == [2e-3 * 0.8, 2e-3 * 0.8 ** 2]
    assert sum(p.numel() for g in groups for p in g["params"]) == trainable(model) == 23552


def test_layer_lr_decay_reaches_the_hf_trainers_optimizer(tiny_base, tmp_path):
    """Through use_layer_lr_decay the Trainer's own create_optimizer (also what DeepSpeed takes as its client
    optimizer) builds the groups: rates by depth, and its no-weight-decay split for norms kept."""
    from transformers import Trainer, TrainingArguments

    model = plain_model(tiny_base)
    train = TrainConfig(lr=1e-3, layer_lr_decay=0.5, weight_decay=0.1)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], weight_decay=0.1,
                             **schedule_arguments(train))
    trainer = Trainer(model=model, args=args)
    use_layer_lr_decay(trainer, train)
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    got = sorted((g["lr"], g["weight_decay"], len(g["params"])) for g in optimizer.param_groups)
    # Each layer: 7 projections (decay) + 2 norms (none); the final norm alone at lr; the embedding.
    assert got == sorted([(1e-3, 0.0, 1), (5e-4, 0.1, 7), (5e-4, 0.0, 2), (2.5e-4, 0.1, 7), (2.5e-4, 0.0, 2),
                          (1.25e-4, 0.1, 1)])
    assert optimizer.param_groups[0]["lr"] == 1e-3  # the logged rate is the peak
    embedding = next(g for g in optimizer.param_groups if g["lr"] == 1.25e-4)
    assert [names[id(p)] for p in embedding["params"]] == ["model.embed_tokens.weight"]


def test_ppos_trainee_uses_the_layer_groups_and_the_schedule(tiny_base):
    from stages.ppo.config import PPOConfig
    from stages.ppo.trainee import Trainee

    config = PPOConfig(prompts="builtin:addition", reward_fn="addition", peft={"method": "full"},
                       train={"lr": 1.0, "layer_lr_decay": 0.5, "lr_schedule": "cosine_with_restarts",
                              "num_cycles": 2, "max_steps": 4})
    trainee = Trainee(plain_model(tiny_base), 1.0, config, "fp32", total_steps=4, wrap=False)
    assert [g["lr"] for g in trainee.optimizer.param_groups] == [1.0, 0.5, 0.25, 0.125]
    assert trainee.scheduler.lr_lambdas[0].func.__name__ == "_get_cosine_with_hard_restarts_schedule_with_warmup_lr_lambda"


# --------------------------------------------------------------------------- bad configs


@pytest.mark.parametrize(("section", "values", "message"), [
    ("peft", {"method": "ia3", "use_rslora": True}, "peft.use_rslora applies to lora, qlora and dora, not 'ia3'"),
    ("peft", {"method": "dora", "init": "pissa"}, "peft.init 'pissa' applies to lora and qlora, not 'dora'"),
    ("peft", {"method": "qlora", "init": "pissa"}, "peft.init 'pissa' needs unquantized weights"),
    ("peft", {"method": "lora", "quant_bits": 8}, "peft.quant_bits applies to qlora only, not 'lora'"),
    ("peft", {"method": "qlora", "quant_bits": 2}, "quant_bits"),
    ("peft", {"init": "loftq"}, "init"),
    ("train", {"layer_lr_decay": 0}, "layer_lr_decay: Input should be greater than 0"),
    ("train", {"layer_lr_decay": 1.5}, "layer_lr_decay: Input should be less than or equal to 1"),
    ("train", {"num_cycles": 3}, "train.num_cycles applies to lr_schedule cosine_with_restarts, not 'cosine'"),
])
def test_bad_options_fail_config_validation(section, values, message):
    from pipeline.spec import SpecError, parse_spec

    raw = {"name": "t", "base": {"model": "builtin:tiny-llama"},
           "stages": {"sft": {"kind": "sft", "data": "builtin:addition", section: values}}}
    with pytest.raises(SpecError, match=message):
        parse_spec(raw)


@pytest.mark.parametrize("kind, stage", [
    ("dpo", {"data": "builtin:addition"}),
    ("ppo", {"prompts": "builtin:addition", "reward_fn": "addition"}),
])
def test_pissa_is_refused_where_the_adapter_off_model_is_the_reference(kind, stage):
    from pipeline.spec import SpecError, parse_spec

    raw = {"name": "t", "stages": {"sft": {"data": "builtin:addition"},
                                   "rl": {"kind": kind, "from": "sft", "peft": {"init": "pissa"}, **stage}}}
    with pytest.raises(SpecError, match=r"stages\.rl\.peft\.init: pissa moves the base weights into the adapter"):
        parse_spec(raw)


# --------------------------------------------------------------------------- through the SFT worker's code


@pytest.mark.parametrize("method", ["lora-options", "bitfit"])
def test_the_sft_worker_path_saves_outputs_that_plain_libraries_reload(tiny_base, bias_base, tmp_path, method):
    """The TRL path every stage worker takes (training_arguments, load_model, the trainer applying peft,
    train_and_save) without Ray: PiSSA + rsLoRA + layer decay + cosine with restarts, or BitFit. The saved
    folder, loaded with plain peft/transformers, computes the logits the worker recorded for its trained model."""
    from datasets import Dataset
    from peft import AutoPeftModelForCausalLM
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    from stages.job import WorkerJob
    from stages.launcher import TRAIN_LOG
    from stages.models import load_tokenizer
    from stages.sft import SFTConfig
    from stages.tasks import get_task
    from stages.worker import PROBE_TEXT, train_and_save, training_arguments

    base = bias_base if method == "bitfit" else tiny_base
    peft = {"method": "bitfit"} if method == "bitfit" else {"method": "lora", "r": 4, "use_rslora": True,
                                                           "init": "pissa"}
    config = SFTConfig(data="builtin:addition", peft=peft, train={
        "max_steps": 4, "batch_size": 4, "lr": 1e-2, "max_length": 64, "logging_steps": 1,
        "lr_schedule": "cosine_with_restarts", "num_cycles": 2, "layer_lr_decay": 0.5})
    job = WorkerJob(stage="sft", work_dir=str(tmp_path), model_dir=str(tmp_path / "model"), model_source=str(base),
                    precision="fp32", threads=1, report_to="none")
    tokenizer = load_tokenizer(base)
    rows = [{"messages": [m.to_dict() for m in r.messages]} for r in get_task("addition").load("sft", "train", 16).records]
    trainer = SFTTrainer(model=load_model(base, config.peft, "fp32"), args=training_arguments(TRLSFTConfig, job, config),
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=peft_config(config.peft))
    train_and_save(trainer, job, config)

    log = json.loads((tmp_path / TRAIN_LOG).read_text())
    rates = [e["learning_rate"] for e in log["log_history"] if "learning_rate" in e]
    # Both train only inside the 2 layers (LoRA matrices, or biases): groups at lr * 0.5 and lr * 0.25.
    assert sorted({g["initial_lr"] for g in trainer.optimizer.param_groups}) == [1e-2 * 0.25, 1e-2 * 0.5]
    assert rates == [5e-3, 2.5e-3, 5e-3, 2.5e-3]  # the first group's rate restarts after 2 of 4 steps
    if method == "bitfit":
        reloaded = plain_model(tmp_path / "model")
        assert log["model_summary"]["trainable_params"] == 3328
    else:
        reloaded = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "model"), use_safetensors=True)
        assert json.loads((tmp_path / "model" / "adapter_config.json").read_text())["r"] == 8  # converted, 2r
    last = logits(reloaded, tokenizer(PROBE_TEXT, return_tensors="pt").input_ids)[0, -1]
    assert torch.allclose(last, torch.tensor(log["probe"]["logits"]), atol=1e-5)
