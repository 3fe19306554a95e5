"""A Mixture-of-Experts layer as a PyTorch nn.Module on hostfuse.moe: router,
top-k, dispatch, grouped GEMMs (a gated MLP per expert), weighted combine.
Every rank checks its output against the same layer written in plain
PyTorch (all experts' weights come from fixed seeds, so each rank can build
the reference alone).

On GPUs (one rank per GPU): bf16, the cuda backend, run eagerly and captured
in torch.cuda.graph and replayed with new tokens; prints both step times. On
CPUs (--cpu, or no GPU): fp32, the collective backend over Gloo, eager.

  torchrun --nproc-per-node N examples/python/moe_layer.py [--cpu] [--tokens T]
      [--reduce auto|per_pick|per_rank] [--grouped-gemm torch|hostfuse]
  python examples/python/moe_layer.py [--cpu] ...    # a world of one rank

The combine's mode defaults to the faster one: per_rank on GPUs with more
than one rank (each expert rank sums a token's picks before sending, so one
row per token and rank crosses the links instead of one per pick),
per_pick otherwise.

The experts' GEMMs are torch._grouped_mm by default; --grouped-gemm hostfuse
runs them with hostfuse.moe.grouped_matmul instead, silu(gate) * up in the
first one's epilogue (on an H100 or H200, hostfuse's own grouped GEMM, which
reads these K-major weights).
"""

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import hostfuse.moe as moe


def parse():
    parser = argparse.ArgumentParser(
        description="A MoE layer on hostfuse.moe, checked against plain PyTorch.")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per rank")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inter", type=int, default=512, help="expert MLP width")
    parser.add_argument("--experts-per-rank", type=int, default=4)
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--cpu", action="store_true", help="CPU tensors and Gloo")
    parser.add_argument("--backend", choices=moe.backends(), default=None,
                        help="default: cuda on GPUs, collective on CPUs")
    parser.add_argument("--reduce", choices=["auto", "per_pick", "per_rank"],
                        default="auto",
                        help="the combine's mode; auto: per_rank on GPUs with more "
                             "than one rank, per_pick otherwise")
    parser.add_argument("--grouped-gemm", choices=["torch", "hostfuse"], default="torch",
                        help="the experts' GEMMs: torch._grouped_mm (per-expert matmuls "
                             "on CPUs), or hostfuse.moe.grouped_matmul with the "
                             "activation in its epilogue (default: torch)")
    args = parser.parse_args()
    for name in ("tokens", "hidden", "inter", "experts_per_rank", "topk", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def expert_weights(expert, hidden, inter, dtype, device):
    generator = torch.Generator().manual_seed(1000 + expert)
    gate_up = torch.randn(hidden, 2 * inter, generator=generator) / hidden**0.5
    down = torch.randn(inter, hidden, generator=generator) / inter**0.5
    return gate_up.to(device, dtype), down.to(device, dtype)


class MoeLayer(torch.nn.Module):
    def __init__(self, hidden, inter, experts, topk, backend, reduce, grouped_gemm, dtype,
                 device):
        super().__init__()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.experts, self.topk, self.backend = experts, topk, backend
        self.reduce, self.grouped_gemm = reduce, grouped_gemm
        self.local = experts // self.world
        generator = torch.Generator().manual_seed(7)
        self.router = torch.nn.Parameter(
            (torch.randn(experts, hidden, generator=generator) / hidden**0.5).to(device, dtype))
        mine = [expert_weights(self.rank * self.local + e, hidden, inter, dtype, device)
                for e in range(self.local)]
        # Stored [L, out, in] and used transposed: the column-major layout
        # torch._grouped_mm wants for its second operand.
        self.gate_up_t = torch.nn.Parameter(torch.stack([w.T for w, _ in mine]).contiguous())
        self.down_t = torch.nn.Parameter(torch.stack([w.T for _, w in mine]).contiguous())

    def route(self, x):
        probs = torch.softmax(F.linear(x, self.router).float(), dim=-1)
        weights, idx = torch.topk(probs, self.topk, dim=-1)
        return idx, weights / weights.sum(-1, keepdim=True)

    def experts_mlp(self, rows, counts):
        if self.grouped_gemm == "hostfuse":
            # [L, H, N] views of the [L, N, H] weights (K-major); no host
            # synchronization on GPUs.
            act = moe.grouped_matmul(rows, self.gate_up_t.transpose(-2, -1), counts,
                                     epilogue="silu_mul")
            return moe.grouped_matmul(act, self.down_t.transpose(-2, -1), counts)
        if rows.is_cuda:
            # Grouped GEMMs without a host synchronization (capturable).
            offsets = torch.cumsum(counts, 0).to(torch.int32)
            h = torch._grouped_mm(rows, self.gate_up_t.transpose(-2, -1), offs=offsets)
            gate, up = h.chunk(2, dim=-1)
            return torch._grouped_mm((F.silu(gate) * up).contiguous(),
                                     self.down_t.transpose(-2, -1), offs=offsets)
        outputs, start = [], 0
        for e, n in enumerate(counts.tolist()):
            h = rows[start:start + n] @ self.gate_up_t[e].T
            gate, up = h.chunk(2, dim=-1)
            outputs.append((F.silu(gate) * up) @ self.down_t[e].T)
            start += n
        return torch.cat(outputs) if outputs else rows.new_zeros(0, rows.shape[1])

    def forward(self, x):
        idx, weights = self.route(x)
        handle = moe.dispatch(x, idx, weights, num_experts=self.experts,
                              backend=self.backend)
        out = self.experts_mlp(handle.recv_x, handle.recv_expert_counts)
        return moe.combine(out, handle, weights, reduce=self.reduce)


def reference(layer, x, hidden, inter):
    """The same layer in plain PyTorch, every expert computed locally."""
    idx, weights = layer.route(x)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in idx.unique().tolist():
        gate_up, down = expert_weights(e, hidden, inter, x.dtype, x.device)
        token, pick = (idx == e).nonzero(as_tuple=True)
        h = x[token] @ gate_up
        gate, up = h.chunk(2, dim=-1)
        y = (F.silu(gate) * up) @ down
        out.index_add_(0, token, y.float() * weights[token, pick].unsqueeze(1))
    return out.to(x.dtype)


def step_time(fn, steps, cuda):
    fn()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e6


def main():
    args = parse()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cuda = not args.cpu and gpus > local_rank
    # Without a launcher (no RANK in the environment): a world of one.
    alone = {} if "RANK" in os.environ else {
        "init_method": "tcp://127.0.0.1:0", "rank": 0, "world_size": 1}
    if cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("cpu:gloo,cuda:nccl", device_id=device, **alone)
        dtype, tolerance = torch.bfloat16, 3e-2
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", **alone)
        dtype, tolerance = torch.float32, 1e-4
    backend = args.backend or ("cuda" if cuda else "collective")
    if backend == "cuda" and not cuda:
        sys.exit("moe_layer.py: --backend cuda needs one GPU per rank (it runs on "
                 "CPUs here); use --backend collective")
    rank, world = dist.get_rank(), dist.get_world_size()
    experts = args.experts_per_rank * world
    if args.topk > experts:
        sys.exit(f"moe_layer.py: --topk {args.topk} exceeds the {experts} experts")

    reduce = args.reduce
    if reduce == "auto":
        reduce = "per_rank" if cuda and world > 1 else "per_pick"
    layer = MoeLayer(args.hidden, args.inter, experts, args.topk, backend, reduce,
                     args.grouped_gemm, dtype, device)
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(args.tokens, args.hidden, generator=generator).to(device, dtype)
    with torch.no_grad():
        eager_out = layer(x)
        errors = [(eager_out.float() - reference(layer, x, args.hidden, args.inter).float())
                  .abs().max() / reference(layer, x, args.hidden, args.inter).float().abs().max()]
        eager_us = step_time(lambda: layer(x), args.steps, cuda)
        graph_us = None
        if cuda:
            static_x = x.clone()
            graph = torch.cuda.CUDAGraph()
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                static_out = layer(static_x)
            for step in range(3):  # new tokens, so new routing, every replay
                static_x.copy_(torch.randn(args.tokens, args.hidden,
                                           generator=generator).to(device, dtype))
                graph.replay()
                want = reference(layer, static_x, args.hidden, args.inter).float()
                errors.append((static_out.float() - want).abs().max() / want.abs().max())
            moe.check_status(backend)
            graph_us = step_time(graph.replay, args.steps, cuda)

    error = max(float(e) for e in errors)
    times = torch.tensor([eager_us, graph_us or 0.0, error], dtype=torch.float64)
    gathered = [torch.zeros_like(times) for _ in range(world)]
    dist.all_gather(gathered, times.to(device) if cuda else times)
    if rank == 0:
        worst = torch.stack([g.cpu() for g in gathered]).max(0).values.tolist()
        line = (f"{world} ranks, {device.type}, backend={backend}, reduce={reduce}, "
                f"grouped_gemm={args.grouped_gemm}, T={args.tokens}, "
                f"H={args.hidden}, I={args.inter}, E={experts}, K={args.topk}: "
                f"step time (slowest rank, mean of {args.steps}) eager {worst[0]:.1f} us")
        if cuda:
            line += (f", CUDA graph replay {worst[1]:.1f} us "
                     f"({worst[0] / worst[1]:.2f}x)")
        print(line, flush=True)
        ok = worst[2] <= tolerance
        print(f"check: {'OK' if ok else 'FAILED'} (largest relative error {worst[2]:.2e} "
              f"over {world} ranks, tolerance {tolerance:g})", flush=True)
    ok_all = torch.tensor([1.0 if error <= tolerance else 0.0])
    dist.all_reduce(ok_all.to(device) if cuda else ok_all, op=dist.ReduceOp.MIN)
    moe.release()
    dist.destroy_process_group()
    sys.exit(0 if error <= tolerance else 1)


if __name__ == "__main__":
    main()
