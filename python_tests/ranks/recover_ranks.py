"""One rank of the rank-failure test (run by test_multirank.py as 3 plain
processes, without torchrun, which would stop the survivors): one MoE call
on 3 ranks, then rank 2 kills itself; ranks 0 and 1 must raise
hostfuse.Error naming rank 2 within 10 s, recover with hostfuse.moe.recover()
and run MoE calls as 2 ranks. Each survivor prints "rank R: recovered, ok"
or its failures and exits 1."""

import os
import signal
import time

import torch

import hostfuse as hf
import hostfuse.moe as moe

EXPERTS = 6  # divisible by 3 and by 2 ranks
PICKS = 2


def call(seed, ranks, rank):
    """A dispatch and combine with unit weights and experts that return their
    rows: each token comes back times its unmasked picks."""
    generator = torch.Generator().manual_seed(seed * 10 + rank)
    tokens = 5 + rank
    x = torch.randn(tokens, 8, generator=generator)
    idx = torch.stack(
        [torch.randperm(EXPERTS, generator=generator)[:PICKS] for _ in range(tokens)]
    )
    idx[torch.rand(tokens, PICKS, generator=generator) < 0.25] = -1
    handle = moe.dispatch(x, idx, None, num_experts=EXPERTS)
    y = moe.combine(handle.recv_x, handle)
    expected = x * (idx >= 0).sum(1, keepdim=True).to(x.dtype)
    return torch.equal(y, expected)


def main():
    rank = int(os.environ["RANK"])
    failures = []
    if not call(1, 3, rank):
        failures.append("the call before the failure")
    if rank == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    start = time.monotonic()
    try:
        call(2, 3, rank)
        failures.append("the call after rank 2 died did not raise")
    except hf.Error as e:
        seconds = time.monotonic() - start
        if "rank 2 did not answer" not in str(e):
            failures.append(f"the error does not name rank 2: {e}")
        if seconds >= 10:
            failures.append(f"the error took {seconds:.1f} s")
    if moe.recover() != (rank, 2, [0, 1]):
        failures.append("recover() did not give (rank, 2, [0, 1])")
    for seed in range(10, 15):
        if not call(seed, 2, rank):
            failures.append(f"call {seed} on the survivors")
    print(f"rank {rank}: " + ("; ".join(failures) or "recovered, ok"), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
