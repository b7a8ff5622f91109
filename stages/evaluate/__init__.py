"""The eval stage (``kind: eval``): models compared on held-out data, with Ray Data batch inference.

    stages:
      eval:
        models: [base, sft, dpo]
        reward: reward                 # optional: reward score and win rate vs the reference
        tasks: [addition]              # builtin:addition/test + its verifier
        sft_data: builtin:addition/test
        preference_data: builtin:addition/test
        generation: {max_new_tokens: 8, num_samples: 4}
        few_shot: 4                    # optional: 4 solved exemplars from builtin:addition/train per prompt

``stages.evaluate.stage.run`` is the stage; ``metrics`` holds the pure metric functions and
``generation`` the Ray Data actor-pool inference; ``few_shot`` builds the k-shot prompts.
``pipeline.report`` renders the results.
"""
