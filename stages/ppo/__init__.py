"""Online RL of a policy from rollouts: PPO (critic) and the critic-free family (GRPO, RLOO, REINFORCE++).

TRL has no PPO trainer any more (removed 2026-09), so the loop is ours, built on ``stages.rl``.

* ``stage``      -- the driver recipe ``run(ctx)``: prompts, rollout-engine actors, reward actor,
                    one Ray Train job via ``stages.launcher``, held-out evaluation, manifest;
* ``worker``     -- the per-worker loop: rollouts -> rewards -> experience -> PPO epochs -> weight sync;
* ``rollout``    -- experience making (padding layout, old/ref log-probs, values, advantages);
* ``policy``     -- the policy with an optional value head, the separate critic, the reference;
* ``rewards``    -- reward sources: verifier tasks, ``module:function``, reward-model actor/in-worker;
* ``checkpoint`` -- save / resume (policy, critic, optimizers, iteration, KL coefficient, RNG).
"""
