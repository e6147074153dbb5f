"""What each of the processes a test spawns runs. Its own module, importing torch alone: a spawned process imports
the module its function is in, and the test modules import open_clip (the gather test took 30.0 s in a full run with
its processes importing test_distributed, 7.6 s with this module)."""
import torch

from temu_dist.gather import across_ranks


def gather_uneven(rank: int, port: int, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        x = torch.arange(1.0, 2.0 + 3 * rank, requires_grad=True)  # rank 0: 1 value, rank 1: 4
        rows = across_ranks(torch.stack([x, -x], dim=1), same_length=False)  # as the loss gathers (score, target)
        (rows[:, 0] * torch.arange(1.0, len(rows) + 1)).sum().backward()  # each value's gradient: its place, 1-based
        torch.save({"both": rows.detach(), "grad": x.grad}, f"{out}/{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()
