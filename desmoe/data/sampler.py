"""The domain sampler: domain-homogeneous micro-batches drawn from each domain's packed rows.

Holds DomainSampler. Pure of ranks: it is told its rank and world size, it does not ask
torch.distributed.
"""

from __future__ import annotations

import random

import torch

from desmoe.data.packing import DomainData


class DomainSampler:
    """Domain-homogeneous micro-batches, the same domain on every rank at each micro-step.

    At micro-step k every rank draws the domain from ``Random((seed, k))`` with the
    configured weights, so all ranks (and so every expert-parallel group) agree without
    communicating; with ``sync_domains=False`` each rank draws its own (``Random((seed, k, rank))``).
    Within a domain, rows follow a seeded permutation per epoch, shared by all ranks; rank r takes
    the r-th slice of each global batch, so ranks see different rows. Deterministic given (seed,
    rank, world size); ``state_dict`` resumes it.
    """

    def __init__(self, domains: dict[str, DomainData], *, micro_batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, sync_domains: bool = True):
        if not domains:
            raise ValueError("DomainSampler needs at least one domain")
        self.domains = domains
        self.names = list(domains)
        self.weights = [domains[n].weight for n in self.names]
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.sync_domains = sync_domains
        self.micro_step = 0
        self.cursor = {n: 0 for n in self.names}  # global row position, across epochs
        self._orders: dict[tuple[str, int], list[int]] = {}

    def _order(self, name: str, epoch: int) -> list[int]:
        key = (name, epoch)
        if key not in self._orders:
            order = list(range(self.domains[name].train_ids.shape[0]))
            random.Random(f"{self.seed}:{name}:{epoch}").shuffle(order)
            if len(self._orders) > 4 * len(self.names):
                self._orders.clear()
            self._orders[key] = order
        return self._orders[key]

    def domain_of(self, rank: int, micro_step: int) -> str:
        """The domain rank ``rank`` trains on at ``micro_step`` (any rank can compute any rank's)."""
        key = f"{self.seed}:domain:{micro_step}" + ("" if self.sync_domains else f":rank{rank}")
        return random.Random(key).choices(self.names, self.weights)[0]

    def next_domain(self) -> str:
        return self.domain_of(self.rank, self.micro_step)

    def next_batch(self) -> tuple[str, torch.Tensor, torch.Tensor]:
        """(domain, input_ids [B, L], labels [B, L]) for this rank's next micro-step."""
        name = self.next_domain()
        data = self.domains[name]
        n = data.train_ids.shape[0]
        start = self.cursor[name] + self.rank * self.micro_batch_size
        rows = []
        for pos in range(start, start + self.micro_batch_size):
            epoch, i = divmod(pos, n)
            rows.append(self._order(name, epoch)[i])
        self.cursor[name] += self.micro_batch_size * self.world_size
        self.micro_step += 1
        idx = torch.tensor(rows, dtype=torch.long)
        return name, data.train_ids[idx], data.train_labels[idx]

    def state_dict(self) -> dict:
        return {"micro_step": self.micro_step, "cursor": dict(self.cursor), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.micro_step = int(state["micro_step"])
        self.cursor = {n: int(state["cursor"].get(n, 0)) for n in self.names}
