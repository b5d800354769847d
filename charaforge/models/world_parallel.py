"""Data-parallel training of the world VAE over the world stage's two worker processes.

The world stage runs the diffusion model and the scorers in two one-thread processes. Both first
train the VAE together (convolutions at full resolution: compute-bound, so two ranks nearly halve
it) and encode the corpus, half each; then the scorer process trains the CLIP, the tagger and the
oracle while the other trains the UNet + text encoder alone. Every VAE step draws the whole
batch's randomness (indices, noise) from the one seeded generator on both ranks, each rank
computes the loss of its half, and the gradients are averaged with one all-reduce
(torch.distributed over gloo, loopback only). The averaged gradient is the full batch's mean
gradient up to float rounding (the test compares against one process), and the bytes depend only
on the fixed rank count, never on the machine: the stage always uses `WORLD_RANKS` ranks when
the scorers run beside it.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from charaforge.config.world import WORLD_RANKS

# A rank waits this long for the other one (the scorers and the VAE take minutes on a loaded
# machine); a crashed peer then ends the wait with an error instead of a hang.
PEER_TIMEOUT = datetime.timedelta(minutes=40)


@dataclass(frozen=True)
class Shard:
    """This process's share of every global batch: rows [start, stop) of it."""

    rank: int
    ranks: int

    def rows(self, batch_size: int) -> slice:
        share = batch_size // self.ranks
        return slice(self.rank * share, (self.rank + 1) * share)


@contextmanager
def process_group(rendezvous_file: str, rank: int, ranks: int = WORLD_RANKS) -> Iterator[Shard]:
    """Join the stage's gloo group through a rendezvous file; leave it on exit."""
    import torch.distributed as dist

    # Loopback only: gloo would otherwise pick the machine's first interface.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo",
        init_method=f"file://{rendezvous_file}",
        rank=rank,
        world_size=ranks,
        timeout=PEER_TIMEOUT,
    )
    try:
        yield Shard(rank, ranks)
    finally:
        dist.destroy_process_group()


def average_gradients(parameters: Sequence[torch.nn.Parameter], loss: torch.Tensor) -> float:
    """Average every gradient and the loss over the ranks in one all-reduce; the mean loss."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads] + [loss.detach().reshape(1)])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for parameter, grad in zip(parameters, grads, strict=True):
        size = grad.numel()
        parameter.grad = flat[offset : offset + size].view_as(grad)
        offset += size
    return float(flat[offset])


def gather_shares(mine: torch.Tensor, sizes: Sequence[int], shard: Shard) -> list[torch.Tensor]:
    """Every rank's share (rank r holds `sizes[r]` rows shaped like `mine`'s), on every rank."""
    import torch.distributed as dist

    # gloo sends a tensor's storage in memory order: a view (a latent mean is a chunk of the
    # posterior's parameters) must be made contiguous first, or the receivers get it scrambled.
    mine = mine.contiguous()
    shares = []
    for rank, size in enumerate(sizes):
        if rank == shard.rank:
            share = mine
        else:
            share = torch.empty((size, *mine.shape[1:]), dtype=mine.dtype)
        dist.broadcast(share, src=rank)
        shares.append(share)
    return shares
