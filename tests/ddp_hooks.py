"""A DDP communication hook that records what it all-reduces (tests of gradient synchronisation)."""

import torch


def count_reduced_gradients(ddp: torch.nn.parallel.DistributedDataParallel) -> list[int]:
    """Register a pass-through comm hook on ``ddp``; the returned list gets, per bucket all-reduced,
    the number of gradients in it (clear it between iterations)."""
    reduced: list[int] = []

    def hook(state, bucket):
        reduced.append(len(bucket.gradients()))
        future = torch.futures.Future()
        future.set_result(bucket.buffer())
        return future

    ddp.register_comm_hook(None, hook)
    return reduced
