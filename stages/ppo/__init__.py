"""Online RL of a policy from rollouts: PPO (critic) and the critic-free family (GRPO, RLOO, REINFORCE++).

TRL has no PPO trainer any more (removed 2026-09), so the loop is ours, built on ``stages.rl``.

* ``config``      -- ``PPOConfig`` (rollout, algorithm, critic) and the stage's registry entry;
* ``stage``       -- the driver recipe ``run(ctx)``: prompts, rollout-engine actors, reward actor,
                     one Ray Train job via ``stages.launcher``, held-out evaluation, manifest;
* ``worker``      -- the per-worker loop, one function per step: rollout -> score -> experience ->
                     update -> sync -> record -> report;
* ``experience``  -- experience making (padding layout, old/ref log-probs, values, advantages);
* ``critic``      -- the critic modes (none, shared value head, separate model) behind one interface;
* ``policy``      -- the policy with an optional value head, the separate critic's model, the reference;
* ``trainee``     -- a module with its optimizer and schedule under DeepSpeed ZeRO or DDP;
* ``sync``        -- the policy pushed to the rollout engines; ``prompts`` -- which prompts and engines;
* ``distributed`` -- rank/world, metric all-reduce, parameters gathered to rank 0;
* ``rewards``     -- reward sources: verifier tasks, ``module:function``, reward-model actor/in-worker;
* ``checkpoint``  -- save / resume (policy, critic, optimizers, iteration, KL coefficient, RNG).
"""
