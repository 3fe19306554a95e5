"""Where the collective backend's time goes: one hostfuse.moe dispatch and
one combine (collective backend) next to the plain PyTorch version of
bench_peers.py, each under torch.profiler after warm-up calls. Prints, per
call: wall time, ATen operator calls, CUDA kernels launched, host
synchronizations (cudaStreamSynchronize / cudaDeviceSynchronize /
cudaEventSynchronize / cudaMemcpy) and cudaMemcpyAsync calls apart, the ten ATen operators that take the most host time and, on
GPUs, the kernels and copies that take the most device time.

  torchrun --nproc-per-node N benchmarks/peers/profile_collective.py
      [--tokens T] [--hidden H] [--cpu]
"""

import argparse
import sys
import time
from collections import Counter

import torch
import torch.distributed as dist
# Before init_process_group: its functions default to group=group.WORLD, and
# imported later (torch.profiler does, through torch._inductor) they keep the
# default group, and Gloo's worker threads, alive into interpreter exit.
import torch.distributed.nn  # noqa: F401
from torch.profiler import ProfilerActivity, profile

import hostfuse.moe as moe
from bench_peers import Ctx, TorchA2A, init_distributed, make_inputs


def parse():
    parser = argparse.ArgumentParser(description="Profile the collective MoE backend.")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts-per-rank", type=int, default=8)
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()
    for name in ("tokens", "hidden", "topk", "experts_per_rank"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def profiled(ctx, name, fn):
    for _ in range(3):
        fn()
    ctx.sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        fn()
        ctx.sync()
        wall = (time.perf_counter() - start) * 1e6
    events = prof.events()
    aten = [e for e in events if e.name.startswith("aten::")]
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    # cudaMemcpy blocks the host; cudaMemcpyAsync does not (from pageable
    # memory it may still wait for the copy).
    syncs = [e for e in events if e.name.startswith(SYNCS) or e.name == "cudaMemcpy"]
    copies = [e for e in events if e.name == "cudaMemcpyAsync"]
    if ctx.rank == 0:
        print(f"{name}: {wall:.0f} us wall, {len(aten)} ATen calls, {len(kernels)} "
              f"CUDA kernels/copies, {len(syncs)} host synchronizations, "
              f"{len(copies)} cudaMemcpyAsync")
        top = Counter()
        for e in aten:
            top[e.name] += e.cpu_time_total if hasattr(e, "cpu_time_total") else 0
        for op, us in top.most_common(10):
            print(f"    {op:32} {us:9.0f} us host (incl. children)")
        if kernels:
            device = Counter()
            for e in kernels:
                device[e.name[:60]] += e.time_range.elapsed_us()
            print(f"    GPU busy {sum(device.values()):.0f} us; the longest:")
            for kernel, us in device.most_common(6):
                print(f"    {kernel:60} {us:9.0f} us GPU")


def main():
    args = parse()
    device, _ = init_distributed(args.cpu)
    ctx = Ctx(device, dist.get_rank(), dist.get_world_size(),
              args.experts_per_rank * dist.get_world_size())
    if args.topk > ctx.experts:
        sys.exit(f"profile_collective.py: --topk {args.topk} exceeds the {ctx.experts} experts")
    x, idx, w = make_inputs(ctx, args.tokens, args.hidden, args.topk, ctx.rank)
    if ctx.rank == 0:
        print(f"{ctx.world} ranks on {device.type}, T = {args.tokens}, H = {args.hidden} "
              f"bf16, K = {args.topk}, E = {ctx.experts}")
    handle = moe.dispatch(x, idx, w, num_experts=ctx.experts)
    profiled(ctx, "hostfuse collective dispatch",
             lambda: moe.dispatch(x, idx, w, num_experts=ctx.experts))
    profiled(ctx, "hostfuse collective combine", lambda: moe.combine(handle.recv_x, handle, w))
    a2a = TorchA2A(ctx)
    recv, _, state = a2a.dispatch(x, idx, w)
    profiled(ctx, "torch a2a dispatch", lambda: a2a.dispatch(x, idx, w))
    profiled(ctx, "torch a2a combine", lambda: a2a.combine(recv, w, state))
    # The handle keeps the runtime and so the group: drop it, so that
    # destroy_process_group frees the group and joins Gloo's threads now
    # (without the GIL) rather than at interpreter exit, where a thread still
    # freeing a profiled work's tensors aborts the process.
    del handle
    moe.release()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
