"""Full weights streamed from the trainer to rollout engines in Ray actors (stages/rollout/weight_stream.py).

The trainer here is this test process (world size 1) calling ``stages.ppo.sync.sync_weights`` with an
``ActorCritic`` over a perturbed copy of the tiny base; the engines start on the base. After a sync each
engine's ``score()`` must equal the source model's log-probs (float32: 1e-4) and differ from what it
scored before by more than ``CHANGE_MIN`` (so that the check cannot pass on unchanged weights).
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from stages.rollout import vllm_status  # noqa: E402
from tests.helpers import reference_logprobs  # noqa: E402

VLLM_OK, VLLM_WHY = vllm_status()
MATCH_TOL = 1e-4  # engine vs source model, float32
CHANGE_MIN = 0.05  # a sync must move some log-prob by more than this (nats)
_VLLM_KWARGS = {"max_model_len": 256, "seed": 0}


def needs_vllm(test):
    return pytest.mark.vllm(pytest.mark.skipif(not VLLM_OK, reason=f"vllm not importable here ({VLLM_WHY})")(test))


# --- helpers ---------------------------------------------------------------------------------


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval()


def _perturbed(path, seed: int, scale: float = 0.05):
    """The base with noise on every parameter: the 'trained' policy (tied embeddings stay tied)."""
    import torch

    model = _load(path)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return model


def _trainer(model):
    from stages.ppo.policy import ActorCritic

    return ActorCritic(model)




def max_diff(a, b) -> float:
    assert [len(x) for x in a] == [len(y) for y in b]
    return max(abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v))


@pytest.fixture(scope="module")
def pair(tiny_base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    P = [tok(p, add_special_tokens=True)["input_ids"] for p in ["Q: 47+38=", "Q: 12+5=", "hello "]]
    R = [tok(r, add_special_tokens=False)["input_ids"] for r in [" A: 85", " A: 17", "there"]]
    return P, R


def _sync(model, engines, tmp_path, step: int, mode: str = "stream") -> dict:
    from stages.ppo.sync import sync_weights

    return sync_weights(_trainer(model), engines, tmp_path, step, mode)


def _check_follows(group, model, before, P, R) -> None:
    after = group.score(P, R)
    assert max_diff(after, reference_logprobs(model, P, R)) < MATCH_TOL
    assert max_diff(after, before) > CHANGE_MIN


# --- hf engines in actors ----------------------------------------------------------------------


def test_stream_into_hf_actors_and_reform_after_restart(ray_cluster, tiny_base, pair, tmp_path):
    """Two hf engines (group ranks 1, 2); the group is kept between syncs and formed anew once an
    engine actor restarted (new pid). Samples carry the version of the weights that generated them, so a
    restart between two calls (which fails none) shows as samples of step 0 (stages.ppo.generation)."""
    from stages.ppo.generation import check_weights
    from stages.rollout import SamplingParams
    from stages.rollout.actors import RolloutGroup, create_rollout_engines
    from stages.rollout.base import EngineRestarted

    P, R = pair
    workers = create_rollout_engines(2, "hf", str(tiny_base), num_cpus=1, max_restarts=1)
    group = RolloutGroup(workers)
    try:
        before = group.score(P, R)
        first = _perturbed(tiny_base, seed=1)
        result = _sync(first, group, tmp_path, step=1)
        assert result["sync_method"] == "hf_weight_stream_gloo"
        _check_follows(group, first, before, P, R)
        link = group._weight_link

        second = _perturbed(tiny_base, seed=2)
        assert _sync(second, group, tmp_path, step=2)["sync_method"] == "hf_weight_stream_gloo"
        assert group._weight_link is link  # same engine processes: the group is reused
        assert max_diff(group.score(P, R), reference_logprobs(second, P, R)) < MATCH_TOL

        params = SamplingParams(max_new_tokens=3, n=2, seed=0)
        assert {r.weights_version for r in check_weights(group.generate(P[:2], params), 2)} == {2}

        old_pid = group.info()[0]["pid"]
        ray_cluster.kill(workers[0], no_restart=False)  # Ray restarts it on the base weights
        _wait_restarted(ray_cluster, workers[0], old_pid)
        samples = group.generate(P[:2], params)  # no call failed: engine 0 serves its starting model
        assert [r.weights_version for r in samples] == [0, 0, 2, 2]
        with pytest.raises(EngineRestarted, match="samples came from the weights of step 0, not step 2"):
            check_weights(samples, 2)
        restarted_before = group.score(P, R)
        third = _perturbed(tiny_base, seed=3)
        assert _sync(third, group, tmp_path, step=3)["sync_method"] == "hf_weight_stream_gloo"
        assert group._weight_link is not link
        _check_follows(group, third, restarted_before, P, R)
    finally:
        group.shutdown()


def _wait_restarted(ray, worker, old_pid: int, timeout_s: float = 120) -> None:
    """Until the actor answers from a new process (a kill is asynchronous, and calls during the restart
    fail with ActorUnavailableError)."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if ray.get(worker.info.remote(), timeout=timeout_s)["pid"] != old_pid:
                return
        except ray.exceptions.ActorUnavailableError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the actor did not come back from a restart within {timeout_s} s")


def test_engine_that_cannot_join_falls_back_to_state_dict(ray_cluster, tiny_base, pair, tmp_path):
    from stages.rollout.actors import RolloutGroup, RolloutWorker
    from stages.rollout.base import RolloutEngine
    from stages.rollout.hf_engine import HFEngine

    # Defined here, not at module level: Ray pickles local classes by value (this module is not importable
    # in the actor's process).
    class NoStreamEngine(HFEngine):
        """An hf engine that, like any engine without support, cannot join a weight-stream group."""

        weight_group_size = RolloutEngine.weight_group_size
        join_weight_group = RolloutEngine.join_weight_group
        receive_weights = RolloutEngine.receive_weights

    class NoStreamWorker(RolloutWorker):
        def __init__(self, model_path: str) -> None:
            self.engine_name = "hf"
            self.engine = NoStreamEngine(model_path)
            self.weights_version = 0

    P, R = pair
    group = RolloutGroup([ray_cluster.remote(NoStreamWorker).options(num_cpus=1).remote(str(tiny_base))])
    try:
        before = group.score(P, R)
        model = _perturbed(tiny_base, seed=4)
        result = _sync(model, group, tmp_path, step=1, mode="auto")
        assert result["sync_method"] == "hf_load_state_dict"  # today's path, through the object store
        _check_follows(group, model, before, P, R)
        with pytest.raises(RuntimeError, match="NotImplementedError"):
            _sync(model, group, tmp_path, step=2, mode="stream")
    finally:
        group.shutdown()


def test_in_process_engines_fall_back_to_state_dict(tiny_base, pair, tmp_path):
    from stages.ppo.sync import push_full_weights
    from stages.rollout import create_engine
    from stages.rollout.local import LocalEngines

    P, R = pair
    engines = LocalEngines([create_engine("hf", tiny_base)])
    model = _perturbed(tiny_base, seed=5)
    [info] = push_full_weights(_trainer(model), engines, step=1, mode="auto")
    assert info.method == "hf_load_state_dict"
    assert "LocalEngines" in info.details["stream_unavailable"]
    assert max_diff(engines.workers[0].score(P, R), reference_logprobs(model, P, R)) < MATCH_TOL


def test_tied_head_alias_follows_the_embedding():
    import torch

    from stages.rollout.weight_stream import dtype_from_name, tensor_meta, with_alias_after

    embed, other = torch.ones(2), torch.zeros(2)
    stream = [("model.embed_tokens.weight", embed), ("model.norm.weight", other)]
    names = [n for n, _ in with_alias_after(iter(stream), "model.embed_tokens.weight", "lm_head.weight")]
    assert names == ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]
    assert [n for n, _ in with_alias_after(iter(stream), None, "lm_head.weight")] == [n for n, _ in stream]
    assert dtype_from_name(tensor_meta("x", torch.bfloat16, (2,))[1]) is torch.bfloat16
    with pytest.raises(ValueError):
        dtype_from_name("os.system")


# --- vLLM --------------------------------------------------------------------------------------


@needs_vllm
def test_stream_into_vllm_and_hf_actors(ray_cluster, tiny_base, pair, tmp_path):
    """One group over a vLLM engine's worker process and an hf engine; the tiny base has tied embeddings,
    so vLLM's lm_head must be fed the streamed embedding (``_tied_head_source``)."""
    from stages.rollout.actors import RolloutGroup, create_rollout_engines

    P, R = pair
    [vllm_worker] = create_rollout_engines(1, "vllm", str(tiny_base), num_cpus=1, engine_kwargs=_VLLM_KWARGS)
    [hf_worker] = create_rollout_engines(1, "hf", str(tiny_base), num_cpus=1)
    group = RolloutGroup([vllm_worker, hf_worker])
    try:
        before = group.score(P, R)
        for step, seed in ((1, 6), (2, 7)):  # the second sync reuses the group
            model = _perturbed(tiny_base, seed=seed)
            infos = _push(model, group, step)
            assert [i.method for i in infos] == ["vllm_weight_stream_gloo", "hf_weight_stream_gloo"]
            for worker in (vllm_worker, hf_worker):
                scored = ray_cluster.get(worker.score.remote(P, R))
                assert max_diff(scored, reference_logprobs(model, P, R)) < MATCH_TOL
                assert max_diff(scored, before) > CHANGE_MIN
    finally:
        group.shutdown()


def _push(model, group, step: int) -> list:
    from stages.ppo.sync import push_full_weights

    return push_full_weights(_trainer(model), group, step=step, mode="stream")


# --- buckets -----------------------------------------------------------------------------------


def test_bucket_plan_groups_consecutive_tensors_of_one_dtype():
    from stages.rollout.weight_stream import bucket_plan, tensor_meta

    import torch

    metas = [tensor_meta("a", torch.float32, (4,)), tensor_meta("b", torch.float32, (2, 2)),  # 16 + 16 bytes
             tensor_meta("c", torch.float32, (8,)),  # 32: half a bucket or more goes alone (no copy)
             tensor_meta("d", torch.bfloat16, (4,)),  # another dtype: a new bucket
             tensor_meta("e", torch.bfloat16, (100,)),  # alone larger than a bucket
             tensor_meta("f", torch.bfloat16, ())]
    assert bucket_plan(metas, 48) == [[0, 1], [2], [3], [4], [5]]
    assert bucket_plan(metas, 0) == [[i] for i in range(len(metas))]  # 0: one broadcast per tensor
    assert bucket_plan(metas, 1 << 20) == [[0, 1, 2], [3, 4, 5]]
    quarter = [tensor_meta(str(i), torch.float32, (4,)) for i in range(4)]  # 16 bytes each
    assert bucket_plan(quarter, 40) == [[0, 1], [2, 3]]  # a third would make 48 > 40


def test_bucketed_stream_round_trip_over_gloo():
    """Sender and receiver in two threads of this process (a gloo group of 2): what arrives equals what was
    sent, name by name, for several bucket sizes; the broadcast count is the plan's."""
    import threading

    import torch

    from stages.rollout.weight_stream import (bucket_plan, join_weight_group, open_master_store, receive_tensors,
                                              send_tensors, tensor_meta)

    generator = torch.Generator().manual_seed(0)
    sent = {"embed": torch.randn(50, 8, generator=generator), "norm": torch.randn(8, generator=generator),
            "scale": torch.tensor(3.0), "half": torch.randn(3, 5, generator=generator).to(torch.bfloat16),
            "head": torch.randn(8, 50, generator=generator).t()}  # not contiguous
    metas = [tensor_meta(n, t.dtype, t.shape) for n, t in sent.items()]
    for bucket_bytes in (0, 256, 4096, 1 << 20):
        store = open_master_store("127.0.0.1", 2, 30)
        received, errors = {}, []

        def receive():
            try:
                group = join_weight_group("127.0.0.1", store.port, 1, 2, "gloo", 30)
                received.update((n, t.clone()) for n, t in receive_tensors(group, metas, bucket_bytes))
                group.close()
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        thread = threading.Thread(target=receive)
        thread.start()
        group = join_weight_group("127.0.0.1", store.port, 0, 2, "gloo", 30, store=store)
        broadcasts, nbytes = send_tensors(group, metas, iter(sent.values()), bucket_bytes)
        thread.join(30)
        group.close()
        assert not errors, errors
        assert broadcasts == len(bucket_plan(metas, bucket_bytes))
        assert nbytes == sum(t.numel() * t.element_size() for t in sent.values())
        assert list(received) == list(sent)
        for name, tensor in sent.items():
            assert received[name].dtype == tensor.dtype and torch.equal(received[name], tensor), (bucket_bytes, name)
    assert bucket_plan(metas, 1 << 20) == [[0, 1, 2], [3], [4]]  # a dtype change starts a bucket
