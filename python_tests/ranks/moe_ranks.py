"""One rank of the multi-rank MoE tests (run by torchrun from
test_multirank.py). Every rank checks its own results and prints
"rank R: ok, N checks" or its failures, then exits 1 if any failed.

  moe_ranks.py [--device cpu|cuda] [--replays N]

Cases: hostfuse.moe over the default group and over each half of the world
(torch.distributed subgroups), both backends where the device allows, an IR
program run by HostIrEvaluator over a subgroup, and with --replays (CUDA
only) the cuda backend captured in torch.cuda.graph and replayed N times
with new routing, bit-identical to the collective backend every time, in
both combine modes.
"""

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

import hostfuse as hf
import hostfuse.moe as moe

HIDDEN = 16
LOCAL = 2


def parse():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--replays", type=int, default=0)
    return parser.parse_args()


class Checks:
    def __init__(self, rank):
        self.rank = rank
        self.count = 0
        self.failures = []

    def __call__(self, ok, what):
        self.count += 1
        if not ok:
            self.failures.append(what)


def inputs(tokens, experts, picks, seed, device, masked=True, hidden=HIDDEN):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=generator)
    idx = torch.stack(
        [torch.randperm(experts, generator=generator)[:picks] for _ in range(tokens)]
    ) if tokens else torch.zeros(0, picks, dtype=torch.int64)
    if masked and tokens:
        idx[torch.rand(tokens, picks, generator=generator) < 0.25] = -1
    w = torch.rand(tokens, picks, generator=generator)
    return x.to(device), idx.to(device), w.to(device)


def expert_of_rows(counts, capacity, first_expert):
    """Global expert of each of `capacity` expert-major rows, without a host
    synchronization (so it can be captured): rows past the valid ones get
    the last expert."""
    ends = torch.cumsum(counts, 0)
    rows = torch.arange(capacity, device=counts.device)
    local = torch.searchsorted(ends, rows, right=True).clamp(max=len(counts) - 1)
    return local + first_expert


def experts_apply(recv_x, counts, first_expert):
    """The test's experts: expert e multiplies its rows by 1 + e / 4."""
    e = expert_of_rows(counts, recv_x.shape[0], first_expert)
    return recv_x * (1 + e.to(recv_x.dtype) / 4).unsqueeze(1)


def reference(x, idx, w):
    valid = idx >= 0
    factor = torch.where(valid, 1 + idx.double() / 4, torch.zeros((), device=x.device))
    return (x.double() * (factor * w.double()).sum(1, keepdim=True)).to(x.dtype)


def moe_case(check, name, group, members, backend, device, seed):
    rank = dist.get_rank()
    me = members.index(rank)
    experts = LOCAL * len(members)
    picks = min(2, experts)
    tokens = 2 + (rank * 3) % 5
    x, idx, w = inputs(tokens, experts, picks, seed + 7 * rank, device)
    handle = moe.dispatch(x, idx, w, num_experts=experts, backend=backend, group=group)
    rows = int(handle.recv_expert_counts.sum())
    out = moe.combine(
        experts_apply(handle.recv_x, handle.recv_expert_counts, me * LOCAL), handle, w
    )
    # The source rows, gathered over the whole world (every rank calls this).
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, x.cpu())
    src_rank = handle.recv_src_rank[:rows].cpu()
    src_token = handle.recv_src_token[:rows].cpu()
    if rows:
        expected = torch.stack(
            [everyone[members[r]][t] for r, t in zip(src_rank.tolist(), src_token.tolist())]
        )
        check(torch.equal(handle.recv_x[:rows].cpu(), expected), f"{name}: received rows")
    check(
        torch.allclose(out.cpu(), reference(x, idx, w).cpu(), rtol=1e-5, atol=1e-5),
        f"{name}: combined output",
    )
    per_rank = moe.combine(
        experts_apply(handle.recv_x, handle.recv_expert_counts, me * LOCAL), handle, w,
        reduce="per_rank",
    )
    check(
        torch.allclose(per_rank.cpu(), reference(x, idx, w).cpu(), rtol=1e-5, atol=1e-5),
        f"{name}: combined output, reduce=per_rank",
    )
    return x, idx, w, out


def failure_case(check, device):
    """The last rank fails in code of its own before a dispatch and reports
    it: the peers' dispatch raises at once naming it, then calls pair up."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if world < 2:
        return
    x, idx, w = inputs(4, LOCAL * world, 2, 90 + rank, device)
    start = time.monotonic()
    if rank == world - 1:
        try:
            raise ValueError("a bug of this rank's own")
        except ValueError:
            moe.report_failure(device)
    else:
        try:
            moe.dispatch(x, idx, w, num_experts=LOCAL * world)
            check(False, "a failed peer: dispatch raised")
        except hf.Error as error:
            check(f"rank {world - 1} of {world} failed outside a MoE call" in str(error),
                  f"a failed peer: the error names it ({error})")
    check(time.monotonic() - start < 30, "a failed peer: no wait for the timeout")
    moe_case(check, "after a failed peer", None, list(range(world)), "collective", device, 4)


def program_case(check, group, members, device):
    rank = dist.get_rank()
    me = members.index(rank)
    experts = LOCAL * len(members)
    program = hf.Program()
    with program:
        tokens = program.define_scalar("tokens")
        xv = program.define_tensor([tokens, HIDDEN], torch.float32, "x")
        iv = program.define_tensor([tokens, 2], torch.int64, "idx")
        wv = program.define_tensor([tokens, 2], torch.float32, "w")
        d = hf.moe_dispatch(xv, iv, wv, num_experts=experts)
        program.add_output(hf.moe_combine(d.recv_x * 3.0, d, wv, num_tokens=xv.extent(0)))
    x, idx, w = inputs(3 + rank, experts, 2, 50 + rank, device, masked=False)
    (out,) = hf.HostIrEvaluator(program, group=group).run([x, idx, w])
    expected = 3.0 * x * w.sum(1, keepdim=True)
    check(torch.allclose(out, expected, rtol=1e-5, atol=1e-5),
          f"program over group {members} (me {me})")


def graph_case(check, device, replays):
    """cuda backend in torch.cuda.graph, replayed with new routing; the
    collective backend eager on the same inputs must give the same bits."""
    rank = dist.get_rank()
    experts = LOCAL * dist.get_world_size()
    tokens = 64
    # Its own hidden size: a new site of the cuda backend, sized for T = 64
    # (the first call of a site sizes its workspace).
    hidden = 2 * HIDDEN
    x, idx, w = inputs(tokens, experts, 2, 1000 + rank, device, hidden=hidden)
    moe.dispatch(x, idx, w, num_experts=experts, backend="cuda")  # sets up
    first = rank * LOCAL
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        handle = moe.dispatch(x, idx, w, num_experts=experts, backend="cuda")
        expert_out = experts_apply(handle.recv_x, handle.recv_expert_counts, first)
        out = moe.combine(expert_out, handle, w)
        out_per_rank = moe.combine(expert_out, handle, w, reduce="per_rank")
    same = 0
    for step in range(replays):
        nx, nidx, nw = inputs(tokens, experts, 2, 2000 + 97 * step + rank, device,
                              hidden=hidden)
        x.copy_(nx)
        idx.copy_(nidx)
        w.copy_(nw)
        graph.replay()
        eager = moe.dispatch(x, idx, w, num_experts=experts, backend="collective")
        eager_out = experts_apply(eager.recv_x, eager.recv_expert_counts, first)
        want = moe.combine(eager_out, eager, w)
        want_per_rank = moe.combine(eager_out, eager, w, reduce="per_rank")
        rows = int(eager.recv_expert_counts.sum())
        same += int(
            torch.equal(out, want)
            and torch.equal(out_per_rank, want_per_rank)
            and torch.equal(handle.recv_expert_counts, eager.recv_expert_counts)
            and torch.equal(handle.recv_x[:rows], eager.recv_x)
        )
    moe.check_status("cuda")
    check(same == replays, f"graph replays bit-identical to collective: {same}/{replays}")
    return same


def main():
    args = parse()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("cpu:gloo,cuda:nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    check = Checks(rank)
    backends = ["collective"] + (["cuda"] if args.device == "cuda" else [])

    everyone = list(range(world))
    for backend in backends:
        moe_case(check, f"{backend} over the default group", None, everyone, backend, device, 1)
    half = world // 2
    halves = [everyone[:half], everyone[half:]] if half else [everyone]
    groups = [dist.new_group(members) for members in halves]
    mine = next(i for i, members in enumerate(halves) if rank in members)
    for backend in backends:
        moe_case(check, f"{backend} over group {halves[mine]}", groups[mine],
                 halves[mine], backend, device, 2)
    program_case(check, groups[mine], halves[mine], device)
    failure_case(check, device)
    if args.replays:
        graph_case(check, device, args.replays)

    dist.barrier()
    moe.release()
    dist.destroy_process_group()
    if check.failures:
        print(f"rank {rank}: FAILED {len(check.failures)} of {check.count} checks: "
              + "; ".join(check.failures), flush=True)
        sys.exit(1)
    print(f"rank {rank}: ok, {check.count} checks", flush=True)


if __name__ == "__main__":
    main()
