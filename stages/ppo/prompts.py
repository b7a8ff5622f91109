"""Which prompts and engines a PPO worker uses each iteration."""

from __future__ import annotations

import random


class PromptPlan:
    """Which prompts an iteration uses: a seeded permutation per pass over the data, sliced by rank."""

    def __init__(self, rows: list[dict], per_step: int, rank: int, world: int, seed: int) -> None:
        self.rows, self.per_step, self.rank, self.world, self.seed = rows, per_step, rank, world, seed
        self.per_rank = per_step // world
        self._orders: dict[int, list[int]] = {}

    def order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.rows)))
            random.Random(f"ppo-prompts/{self.seed}/{epoch}").shuffle(order)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def indices(self, iteration: int) -> list[int]:
        start = iteration * self.per_step + self.rank * self.per_rank
        n = len(self.rows)
        return [self.order(k // n)[k % n] for k in range(start, start + self.per_rank)]


def my_engines(engines: list, rank: int, world: int) -> list:
    """This rank's engines: ``engines[rank::world]``, or one shared engine when there are fewer engines than ranks."""
    return engines[rank::world] or [engines[rank % len(engines)]]
