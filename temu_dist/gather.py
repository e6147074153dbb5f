"""Rows of a tensor from every process, with gradients back to each process's own part: the loss's PLCC is taken over
the whole step. Apart from train.py so that a process testing it imports torch alone."""
from __future__ import annotations

import warnings

import torch
import torch.distributed.nn  # noqa: F401 - the autograd-aware all_gather; torch does not import it itself


def _all_gather(x: torch.Tensor) -> list[torch.Tensor]:
    with warnings.catch_warnings():
        # torch 2.14 deprecates it in favour of a private module (_functional_collectives), whose API has changed
        # between the versions we support; this public one stays until torch has a public autograd gather.
        warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_gather is deprecated", FutureWarning)
        return list(torch.distributed.nn.functional.all_gather(x))


def across_ranks(x: torch.Tensor, same_length: bool = True) -> torch.Tensor:
    """The rows of x from every process, concatenated; gradients flow back to each process's own part. Where processes
    may hold different numbers of rows (LDG at p < 1), `same_length=False`: they exchange them first (a host sync),
    since all_gather needs one shape everywhere."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized() \
            or torch.distributed.get_world_size() == 1:
        return x
    if same_length:
        return torch.cat(_all_gather(x))
    length = torch.tensor([len(x)], device=x.device)
    lengths = [torch.empty_like(length) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(lengths, length)
    lengths = [int(n) for n in lengths]
    parts = _all_gather(torch.cat([x, x.new_zeros(max(lengths) - len(x), *x.shape[1:])]))
    return torch.cat([part[:n] for part, n in zip(parts, lengths, strict=True)])
