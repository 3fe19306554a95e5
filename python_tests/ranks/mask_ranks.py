"""One rank of the rank-masking test (run by test_multirank.py as 3 plain
processes, without torchrun, which would stop the survivors): one MoE call
on 3 ranks, then rank 1 kills itself; ranks 0 and 2 raise hostfuse.Error
naming it, recover with hostfuse.moe.recover(mask_failed_ranks=True) and
go on with the same 9 experts (3 per rank of the first world, which 2 ranks
could not share), rank 1's picks masked: through dispatch and combine, and
through the HostIrEvaluator made before the failure (mask_failed_ranks=True). Each survivor prints "rank R:
masked, ok" or its failures and exits 1."""

import os
import signal

import torch

import hostfuse as hf
import hostfuse.moe as moe

EXPERTS = 9
LOCAL = 3  # experts per rank of the first world
PICKS = 2
DEAD = 1


def call(seed, rank, dead):
    """A dispatch and combine with no weights and experts that return their
    rows: each token comes back times its picks of live ranks' experts.
    Returns the failures."""
    generator = torch.Generator().manual_seed(seed * 10 + rank)
    tokens = 4 + (seed + rank) % 5
    x = torch.randn(tokens, 8, generator=generator)
    idx = torch.stack(
        [torch.randperm(EXPERTS, generator=generator)[:PICKS] for _ in range(tokens)]
    )
    idx[torch.rand(tokens, PICKS, generator=generator) < 0.25] = -1
    handle = moe.dispatch(x, idx, None, num_experts=EXPERTS)
    y = moe.combine(handle.recv_x, handle)
    live = (idx >= 0) & (idx // LOCAL != dead)
    failures = []
    if not torch.equal(y, x * live.sum(1, keepdim=True).to(x.dtype)):
        failures.append(f"call {seed}: combine differs from the reference")
    if handle.n_tokens_to_rank.shape != (3,) or handle.n_tokens_from_rank.shape != (3,):
        failures.append(f"call {seed}: the counts do not have 3 entries")
    if dead >= 0 and (handle.n_tokens_to_rank[dead] != 0
                      or handle.n_tokens_from_rank[dead] != 0
                      or (handle.recv_src_rank == dead).any()):
        failures.append(f"call {seed}: rows to or from the masked rank")
    if handle.n_tokens_to_rank.sum() != live.sum():
        failures.append(f"call {seed}: n_tokens_to_rank {handle.n_tokens_to_rank}")
    return failures


def evaluator_call(evaluator, seed, rank, dead):
    """The same through a program: weights, experts that double their rows;
    checked against combine in pick order in fp32. Returns the failures."""
    generator = torch.Generator().manual_seed(seed * 10 + rank + 5)
    tokens = 3 + (seed + rank) % 4
    x = torch.randn(tokens, 8, generator=generator)
    idx = torch.stack(
        [torch.randperm(EXPERTS, generator=generator)[:PICKS] for _ in range(tokens)]
    )
    w = torch.rand(tokens, PICKS, generator=generator) + 0.1
    (y,) = evaluator.run([x, idx, w])
    live = (idx // LOCAL != dead)
    expected = torch.zeros_like(x)
    for k in range(PICKS):
        term = w[:, k:k + 1] * (x * 2.0)
        expected = torch.where(live[:, k:k + 1], expected + term, expected)
    return [] if torch.equal(y, expected) else [f"evaluator call {seed} differs"]


def make_evaluator():
    program = hf.Program()
    with program:
        tokens = program.define_scalar("tokens")
        xv = program.define_tensor([tokens, 8], torch.float32, "x")
        iv = program.define_tensor([tokens, PICKS], torch.int64, "idx")
        wv = program.define_tensor([tokens, PICKS], torch.float32, "w")
        d = hf.moe_dispatch(xv, iv, wv, num_experts=EXPERTS)
        program.add_output(hf.moe_combine(d.recv_x * 2.0, d, wv, num_tokens=xv.extent(0)))
    return hf.HostIrEvaluator(program, mask_failed_ranks=True)


def main():
    rank = int(os.environ["RANK"])
    evaluator = make_evaluator()
    failures = call(1, rank, -1) + evaluator_call(evaluator, 1, rank, -1)
    if rank == DEAD:
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        call(2, rank, -1)
        failures.append("the call after rank 1 died did not raise")
    except hf.Error as e:
        if "rank 1 did not answer" not in str(e):
            failures.append(f"the error does not name rank 1: {e}")
    if moe.masked_ranks() != []:
        failures.append("masked_ranks() is not [] before recover()")
    if moe.recover(mask_failed_ranks=True) != (rank // 2, 2, [0, 2]):
        failures.append("recover() did not give (rank, 2, [0, 2])")
    if moe.masked_ranks() != [DEAD]:
        failures.append(f"masked_ranks() is {moe.masked_ranks()}, not [1]")
    for seed in range(10, 15):
        failures += call(seed, rank, DEAD)
    evaluator.reset_communicator()
    if evaluator.masked_ranks() != [DEAD]:
        failures.append(f"evaluator.masked_ranks() is {evaluator.masked_ranks()}")
    for seed in range(10, 13):
        failures += evaluator_call(evaluator, seed, rank, DEAD)
    # An id out of range on rank 2 raises on both survivors, naming it and
    # the numbering; the next call works.
    idx = torch.tensor([[0, EXPERTS if rank == 2 else 1]])
    try:
        moe.dispatch(torch.ones(1, 8), idx, None, num_experts=EXPERTS)
        failures.append("an expert id out of range did not raise")
    except hf.Error as e:
        for part in ("bad input on rank 1 of 2", "expert id 9 at token 0, pick 1",
                     "ranks 1 of the first world's 3 are masked"):
            if part not in str(e):
                failures.append(f"the error does not say {part!r}: {e}")
        if rank == 0:
            print(f"rank 0 raised: {e}", flush=True)
    failures += call(20, rank, DEAD)
    print(f"rank {rank}: " + ("; ".join(failures) or "masked, ok"), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
