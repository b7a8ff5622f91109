"""The shipped tiny DAG (`configs/tiny.yaml`), shrunk, run once per test session (``tiny_dag`` fixture).

base -> sft -> reward, dpo, ppo, grpo -> eval. The method tests read its stages too: reward and DPO
(tests/stages/test_reward_dpo.py: tiny.yaml's recipes, the reward model on half its steps), and PPO and GRPO with the verifier reward
(tests/stages/ppo/test_ppo.py): one pipeline, so the suite pays for them once. The overrides only shrink
step counts (PPO, GRPO), workers and eval sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"

# The SFT policy comes in as `--input sft=` (the session's in-process policy: 57% held-out, 4% on carry
# problems) so that DPO, PPO and GRPO have a flaw to fix in a few steps; SFT's own Ray Train stage is
# covered by tests/stages/test_sft.py and tests/pipeline/test_runner.py.
HELD_OUT = 200  # eval prompts (builtin:addition/test), and the RL stages' own held-out check on the same ones
REWARD_STEPS = 400  # reward-model steps (tiny.yaml: 800)
RL_ITERS = 10  # PPO and GRPO iterations, tiny.yaml's 64 prompts x 4 samples each and its two PPO epochs
SHRINK = [
    "base.pretrain_steps=0",
    # The four stages after SFT two at a time (one CPU each here): the same artifacts as one at a time, sooner.
    "max_concurrent_stages=2",
    *(f"stages.{s}.scaling.num_workers=1" for s in ("reward", "dpo")),
    # One worker at twice the per-worker batch: tiny.yaml's 32 pairs per step, and seeded one-worker runs
    # repeat bit for bit (tests/stages/test_reward_dpo.py reads these two stages' metrics). The reward
    # model trains half tiny.yaml's 800 steps (171 s at 800 here, 96 s at 400).
    *(f"stages.{s}.train.batch_size=32" for s in ("reward", "dpo")), f"stages.reward.train.max_steps={REWARD_STEPS}",
    *(f"stages.{s}.train.max_steps={RL_ITERS}" for s in ("ppo", "grpo")),
    # This suite runs where vLLM is not installed (.venv); PPO and GRPO on vLLM engines are
    # tests/stages/ppo/test_ppo_vllm.py's (the vLLM suite) and the demo's.
    *(f"stages.{s}.rollout.engine=hf" for s in ("ppo", "grpo")),
    *(f"stages.{s}.eval_limit={HELD_OUT}" for s in ("ppo", "grpo")),
    # Half the steps give held-out accuracy 0.702, too close to tiny.yaml's gate (0.65) to bet the session's
    # DAG on: this run's eval gate, DPO above SFT, is checked instead; the reward gate is tests/e2e's second part.
    "stages.reward.gate=[]", "stages.eval.gate=[\"accuracy[dpo] >= accuracy[sft]\"]",
    f"stages.eval.max_prompts={HELD_OUT}", "stages.eval.generation.kl_prompts=4",
    "stages.eval.generation.num_samples=2",
    "stages.eval.sft_data.limit=8", "stages.eval.preference_data.limit=8",
]


@dataclass
class TinyDagRun:
    storage: Path
    artifacts: dict   # node -> pipeline.store.Artifact
    printed: str | None  # what the run printed (driver and Ray workers); None where pytest captures nothing

    def spec(self, *overrides: str):
        from pipeline.spec import load_spec

        return load_spec(TINY, [*SHRINK, f"storage={self.storage}", *overrides])


def run_tiny_dag(storage: Path, addition_sft: Path, read_output) -> TinyDagRun:
    """Runs the shrunk DAG; ``read_output()`` returns what was printed since it was last called (None if
    nothing is captured)."""
    from pipeline.runner import run_pipeline

    run = TinyDagRun(storage, {}, None)
    read_output()
    run.artifacts = run_pipeline(run.spec(), inputs={"sft": str(addition_sft)})
    printed = read_output()
    run.printed = None if printed is None else "".join(printed)
    return run
