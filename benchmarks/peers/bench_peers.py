"""MoE dispatch and combine, hostfuse next to what a user would run instead,
measured in one run on the same inputs (bench_moe_cuda's workload: H = 7168
bf16, K = 8 distinct experts per token, 8 experts per rank, uniform routing,
fp32 weights). Each row's outputs are checked against hostfuse's collective
backend before its time is printed. Rows:

  torch a2a        plain PyTorch: per-expert counts exchanged, copied to the
                   host, rows sorted by expert and sent with
                   all_to_all_single, regrouped expert-major; combine sends
                   them back and sums them weighted in fp32 (index_add_), eager
  torch symm_mem   torch.ops.symm_mem.all_to_all_vdev_2d (GPU-side splits,
                   expert-major) and all_to_all_vdev_2d_offset back, then the
                   weighted sum, in a CUDA graph (GPUs with NVSHMEM only)
  hostfuse coll.   hostfuse.moe, collective backend, eager
  hostfuse cuda    hostfuse.moe, cuda backend, in a CUDA graph (GPUs only)
  device copy      one device-to-device copy of the bytes this rank sends
                   (read once, written once), for scale with one rank; not a
                   floor: a dispatch reads each token's row once and writes
                   it K times (bench_nvlink_push has the NVLink floor)
  NCCL EP          measured by a program of its own (it needs an NCCL newer
                   than torch's): --dump DIR writes this run's inputs,
                   hostfuse's outputs and the times above, and
                   nccl_ep_bench (tools/nccl_ep.sh builds it) runs NCCL EP
                   on them, checks it against hostfuse's outputs and prints
                   its rows next to these

Time: median over --iters of single calls (synchronized before and after),
slowest rank. Run with torchrun, one rank per GPU (or CPU ranks with --cpu):

  torchrun --nproc-per-node N benchmarks/peers/bench_peers.py [--tokens 128 4096]
      [--csv out.csv] [--cpu] [--hidden H] [--dump DIR]
"""

import argparse
import csv
import datetime
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

import hostfuse.moe as moe

COLUMNS = ["date", "device", "ranks", "tokens", "hidden", "topk", "experts",
           "row", "phase", "median_us", "bytes", "gbps", "check"]


def parse():
    parser = argparse.ArgumentParser(
        description="MoE dispatch/combine: hostfuse next to its peers, one run.")
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 4096])
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts-per-rank", type=int, default=8)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--csv", default=None, help="append the rows to this CSV")
    parser.add_argument("--cpu", action="store_true", help="CPU ranks over Gloo")
    parser.add_argument("--dump", default=None, metavar="DIR",
                        help="write the inputs, hostfuse's outputs and the times into DIR "
                             "for nccl_ep_bench (DIR/meta.tsv, DIR/T<T>/rank<r>/*.bin)")
    args = parser.parse_args()
    for name in ("hidden", "topk", "experts_per_rank", "iters"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(t < 1 for t in args.tokens):
        parser.error("--tokens must be >= 1")
    return args


class Ctx:
    def __init__(self, device, rank, world, experts):
        self.device, self.rank, self.world = device, rank, world
        self.experts, self.local = experts, experts // world
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)


def make_inputs(ctx, tokens, hidden, topk, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=generator).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(ctx.experts, generator=generator)[:topk]
                       for _ in range(tokens)])
    w = torch.rand(tokens, topk, generator=generator)
    return x.to(ctx.device), idx.to(ctx.device), w.to(ctx.device)


def median_us(ctx, fn, iters):
    fn()
    times = []
    for _ in range(iters):
        ctx.sync()
        start = time.perf_counter()
        fn()
        ctx.sync()
        times.append((time.perf_counter() - start) * 1e6)
    mine = torch.tensor([statistics.median(times)], dtype=torch.float64)
    mine = mine.to(ctx.device) if ctx.cuda else mine
    dist.all_reduce(mine, op=dist.ReduceOp.MAX)
    return float(mine.item())


# ---------------------------------------------------------------------------
# Plain PyTorch, as a user writes it.

class TorchA2A:
    def __init__(self, ctx):
        self.ctx = ctx

    def dispatch(self, x, idx, w):
        ctx = self.ctx
        tokens, topk = idx.shape
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)       # by expert, so by rank
        token = order // topk
        counts = torch.bincount(flat, minlength=ctx.experts)
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts)
        both = torch.stack([counts, recv_counts]).view(2, ctx.world, ctx.local).sum(2)
        send_splits, recv_splits = both.tolist()          # the host copy
        recv = x.new_empty(sum(recv_splits), x.shape[1])
        dist.all_to_all_single(recv, x[token], recv_splits, send_splits)
        # Rows arrive rank-major (each rank's rows by expert); regroup them
        # expert-major.
        blocks = recv_counts.view(ctx.world, ctx.local)
        block_of_row = torch.repeat_interleave(
            torch.arange(ctx.world * ctx.local, device=x.device), blocks.reshape(-1))
        regroup = torch.argsort((block_of_row % ctx.local) * ctx.world
                                + block_of_row // ctx.local, stable=True)
        state = (order, token, regroup, send_splits, recv_splits, tokens)
        return recv[regroup], blocks.sum(0), state

    def combine(self, y, w, state):
        order, token, regroup, send_splits, recv_splits, tokens = state
        back = torch.empty_like(y)
        back[regroup] = y
        rows = y.new_empty(sum(send_splits), y.shape[1])
        dist.all_to_all_single(rows, back, send_splits, recv_splits)
        out = torch.zeros(tokens, y.shape[1], dtype=torch.float32, device=y.device)
        out.index_add_(0, token, rows.float() * w.reshape(-1)[order].unsqueeze(1))
        return out.to(y.dtype)


# ---------------------------------------------------------------------------
# torch symmetric memory (NVSHMEM): all_to_all_vdev_2d and its offset form.

class TorchSymmMem:
    def __init__(self, ctx, tokens, hidden, topk):
        import torch.distributed._symmetric_memory as symm_mem

        ctx.sync()
        self.ctx = ctx
        self.group_name = dist.group.WORLD.group_name
        symm_mem.set_backend("NVSHMEM")
        symm_mem.enable_symm_mem_for_group(self.group_name)
        rows_in = tokens * topk
        rows_out = rows_in * ctx.world  # the worst case
        n = ctx.world * ctx.local
        self.inp = symm_mem.empty(rows_in, hidden, dtype=torch.bfloat16, device=ctx.device)
        self.out = symm_mem.empty(rows_out, hidden, dtype=torch.bfloat16, device=ctx.device)
        self.back = symm_mem.empty(rows_in, hidden, dtype=torch.bfloat16, device=ctx.device)
        self.in_splits = symm_mem.empty(n, dtype=torch.int64, device=ctx.device)
        self.out_splits_offsets = symm_mem.empty(2, n, dtype=torch.int64, device=ctx.device)
        self.back_splits_offsets = symm_mem.empty(2, n, dtype=torch.int64, device=ctx.device)
        for t in (self.inp, self.out, self.back, self.in_splits,
                  self.out_splits_offsets, self.back_splits_offsets):
            symm_mem.rendezvous(t, self.group_name)

    def dispatch(self, x, idx, w):
        ctx = self.ctx
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token = order // idx.shape[1]
        self.in_splits.copy_(torch.bincount(flat, minlength=ctx.experts))
        self.inp[: flat.numel()].copy_(x[token])
        torch.ops.symm_mem.all_to_all_vdev_2d(
            self.inp, self.out, self.in_splits, self.out_splits_offsets, self.group_name)
        return self.out, (order, token)

    def combine(self, y, w, state):
        order, token = state
        torch.ops.symm_mem.all_to_all_vdev_2d_offset(
            y, self.back, self.out_splits_offsets, self.back_splits_offsets,
            self.group_name)
        rows = self.back[: order.numel()]
        out = torch.zeros(token.numel() // w.shape[1], y.shape[1], dtype=torch.float32,
                          device=y.device)
        out.index_add_(0, token, rows.float() * w.reshape(-1)[order].unsqueeze(1))
        return out.to(y.dtype)


def graph_of(ctx, fn):
    """fn captured in a CUDA graph after one warm-up call; returns
    (replay, outputs of the capture)."""
    fn()
    ctx.sync()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph.replay, outputs


# ---------------------------------------------------------------------------

def expert_checksum(rows, counts):
    """Per-expert fp32 sum of the received rows: independent of the order of
    rows inside an expert's block."""
    counts = counts.long()
    expert = torch.repeat_interleave(torch.arange(len(counts), device=rows.device), counts)
    sums = torch.zeros(len(counts), rows.shape[1], dtype=torch.float32, device=rows.device)
    sums.index_add_(0, expert, rows[: int(counts.sum())].float())
    return sums


def agree(ctx, ok):
    flag = torch.tensor([1.0 if ok else 0.0], dtype=torch.float64)
    flag = flag.to(ctx.device) if ctx.cuda else flag
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() == 1.0)


def close(a, b):
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def symm_mem_rows(ctx, args, tokens, inputs, ref, ref_out, add):
    """Measures the torch symm_mem rows through `add`; returns why not, or
    None."""
    if ctx.world == 1:
        return "all_to_all_vdev_2d needs 2 or more ranks"
    x, idx, w = inputs
    try:
        sm = TorchSymmMem(ctx, tokens, args.hidden, args.topk)
        replay_d, (out_rows, sm_state) = graph_of(ctx, lambda: sm.dispatch(x, idx, w))
        replay_d()
        replay_c, sm_out = graph_of(ctx, lambda: sm.combine(out_rows, w, sm_state))
        replay_d()
        replay_c()
        ctx.sync()
    except Exception as e:  # noqa: BLE001 - the row reports why it is missing
        return str(e).splitlines()[0]
    splits = sm.out_splits_offsets[0].view(ctx.local, ctx.world).sum(1)
    ok = agree(ctx, torch.equal(splits, ref.recv_expert_counts) and close(sm_out, ref_out))
    add("torch symm_mem (graph)", "dispatch", median_us(ctx, replay_d, args.iters), ok)
    add("torch symm_mem (graph)", "combine", median_us(ctx, replay_c, args.iters), ok)
    return None


def dump_rank(directory, tokens, rank, arrays):
    """Raw little-endian arrays for nccl_ep_bench: DIR/T<T>/rank<r>/<name>.bin."""
    import numpy  # only here: the dump is optional

    base = os.path.join(directory, f"T{tokens}", f"rank{rank}")
    os.makedirs(base, exist_ok=True)
    for name, tensor in arrays.items():
        raw = tensor.detach().cpu().contiguous().view(torch.uint8)
        numpy.asarray(raw).tofile(os.path.join(base, name + ".bin"))


def dump_meta(directory, args, ctx, device_name, timings):
    """DIR/meta.tsv: the shape, the token counts and this run's times."""
    lines = [("config", "hidden", args.hidden), ("config", "topk", args.topk),
             ("config", "experts", ctx.experts), ("config", "ranks", ctx.world),
             ("config", "device", device_name)]
    lines += [("tokens", t) for t in args.tokens]
    lines += [("time", t, row, phase, f"{us:.2f}") for t, row, phase, us in timings]
    with open(os.path.join(directory, "meta.tsv"), "w") as f:
        for fields in lines:
            f.write("\t".join(map(str, fields)) + "\n")


def run_tokens(ctx, args, tokens, writer, device_name, timings):
    # The cuda backend sizes its symmetric memory for the tokens of its
    # first call: a fresh runtime per token count, sized for this one.
    moe.release()
    x, idx, w = make_inputs(ctx, tokens, args.hidden, args.topk, 100 + ctx.rank)
    results = []

    # The reference every row is checked against: hostfuse's collective backend.
    ref = moe.dispatch(x, idx, w, num_experts=ctx.experts, backend="collective")
    ref_sum = expert_checksum(ref.recv_x, ref.recv_expert_counts)
    ref_out = moe.combine(ref.recv_x, ref, w)
    sent = int((idx >= 0).sum())
    row_bytes = args.hidden * 2

    def add(row, phase, us, ok, rows=sent):
        nbytes = rows * row_bytes
        results.append((row, phase, us, nbytes, ok))

    # hostfuse collective, eager.
    h = moe.dispatch(x, idx, w, num_experts=ctx.experts, backend="collective")
    ok = agree(ctx, close(expert_checksum(h.recv_x, h.recv_expert_counts), ref_sum)
               and torch.equal(moe.combine(h.recv_x, h, w), ref_out))
    add("hostfuse collective", "dispatch",
        median_us(ctx, lambda: moe.dispatch(x, idx, w, num_experts=ctx.experts,
                                            backend="collective"), args.iters), ok)
    add("hostfuse collective", "combine",
        median_us(ctx, lambda: moe.combine(h.recv_x, h, w), args.iters), ok)

    # Plain PyTorch, eager.
    a2a = TorchA2A(ctx)
    recv, counts, state = a2a.dispatch(x, idx, w)
    out = a2a.combine(recv, w, state)
    ok = agree(ctx, torch.equal(counts, ref.recv_expert_counts)
               and close(expert_checksum(recv, counts), ref_sum) and close(out, ref_out))
    add("torch a2a", "dispatch", median_us(ctx, lambda: a2a.dispatch(x, idx, w), args.iters), ok)
    add("torch a2a", "combine",
        median_us(ctx, lambda: a2a.combine(recv, w, state), args.iters), ok)

    if ctx.cuda:
        # hostfuse cuda backend, graph-replayed.
        moe.dispatch(x, idx, w, num_experts=ctx.experts, backend="cuda")
        replay_d, hc = graph_of(
            ctx, lambda: moe.dispatch(x, idx, w, num_experts=ctx.experts, backend="cuda"))
        # A captured dispatch writes hc only when it replays; the combine's
        # warm-up call needs that layout.
        replay_d()
        replay_c, out_c = graph_of(ctx, lambda: moe.combine(hc.recv_x, hc, w))
        replay_d()
        replay_c()
        ctx.sync()
        ok = agree(ctx, torch.equal(hc.recv_expert_counts, ref.recv_expert_counts)
                   and close(expert_checksum(hc.recv_x, hc.recv_expert_counts), ref_sum)
                   and torch.equal(out_c, ref_out))
        add("hostfuse cuda (graph)", "dispatch", median_us(ctx, replay_d, args.iters), ok)
        add("hostfuse cuda (graph)", "combine", median_us(ctx, replay_c, args.iters), ok)

        # torch symmetric memory, graph-replayed.
        reason = symm_mem_rows(ctx, args, tokens, (x, idx, w), ref, ref_out, add)
        if reason and ctx.rank == 0:
            print(f"  torch symm_mem: not measured: {reason}")

        # For scale: one device copy of the bytes this rank sends.
        src = x.new_empty(sent, args.hidden)
        dst = torch.empty_like(src)
        add("device copy (1 GPU)", "dispatch", median_us(ctx, lambda: dst.copy_(src), args.iters), True)

    if args.dump:
        dump_rank(args.dump, tokens, ctx.rank,
                  {"x": x, "idx": idx.long(), "w": w.float(),
                   "counts": ref.recv_expert_counts.long(), "out": ref_out})
        timings += [(tokens, row, phase, us) for row, phase, us, _, _ in results]
    if ctx.rank == 0:
        if args.dump and ctx.cuda:
            print(f"  NCCL EP: inputs and outputs written to {args.dump}; run "
                  f"tools/launch.sh {ctx.world} build_nccl_ep/bin/nccl_ep_bench "
                  f"--dump {args.dump}")
        elif args.dump:
            print(f"  NCCL EP: inputs and outputs written to {args.dump} (NCCL EP "
                  f"itself needs GPUs)")
        else:
            print(f"  NCCL EP: not measured here: {nccl_ep_status()}")
        base = {phase: us for row, phase, us, _, _ in results if row == "torch a2a"}
        print(f"  {'row':24} {'phase':9} {'median us':>10} {'GB/s':>8} {'vs torch a2a':>12}  check")
        for row, phase, us, nbytes, ok in results:
            gbps = nbytes / us / 1e3
            ratio = base[phase] / us if phase in base else float("nan")
            print(f"  {row:24} {phase:9} {us:10.1f} {gbps:8.1f} {ratio:11.2f}x  "
                  f"{'ok' if ok else 'MISMATCH'}")
            if writer:
                writer.writerow([datetime.date.today().isoformat(), device_name, ctx.world,
                                 tokens, args.hidden, args.topk, ctx.experts, row, phase,
                                 f"{us:.2f}", nbytes, f"{gbps:.3f}", "ok" if ok else "mismatch"])
    return all(ok for *_, ok in results)


def nccl_ep_status():
    version = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "none"
    return (f"its library needs NCCL >= 2.30 and torch here has NCCL {version} (in one "
            f"process the two would clash on libnccl.so.2): give --dump DIR and run "
            f"nccl_ep_bench on it (docs/performance.md, \"NCCL EP\")")


def init_distributed(cpu):
    """torch.distributed as torchrun set it up: one GPU per rank with NCCL
    (and Gloo for CPU tensors), or CPU ranks over Gloo. Returns the device
    and its name."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not cpu and torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("cpu:gloo,cuda:nccl", device_id=device)
        return device, torch.cuda.get_device_name(device)
    dist.init_process_group("gloo")
    return torch.device("cpu"), "cpu (gloo)"


def main():
    args = parse()
    if args.dump:
        # Before anything is measured: a dump that cannot be written would
        # otherwise fail after the first token count.
        if os.path.exists(args.dump) and not os.path.isdir(args.dump):
            sys.exit(f"bench_peers.py: --dump {args.dump} is a file, not a folder")
        try:
            os.makedirs(args.dump, exist_ok=True)
            probe = os.path.join(args.dump, f".probe{os.getpid()}")
            with open(probe, "w"):
                pass
            os.remove(probe)
        except OSError as e:
            sys.exit(f"bench_peers.py: --dump {args.dump}: cannot write there ({e.strerror})")
    if args.csv:
        # Likewise for the CSV (opened for appending, as rank 0 does below),
        # leaving no empty file behind when it was not there.
        existed = os.path.exists(args.csv)
        try:
            with open(args.csv, "a", newline=""):
                pass
        except OSError as e:
            sys.exit(f"bench_peers.py: --csv {args.csv}: cannot append to it ({e.strerror})")
        if not existed:
            try:
                os.remove(args.csv)
            except FileNotFoundError:
                pass  # another rank's probe removed it first
    device, device_name = init_distributed(args.cpu)
    rank, world = dist.get_rank(), dist.get_world_size()
    ctx = Ctx(device, rank, world, args.experts_per_rank * world)
    if args.topk > ctx.experts:
        sys.exit(f"bench_peers.py: --topk {args.topk} exceeds the {ctx.experts} experts")
    writer = None
    csv_file = None
    if args.csv and rank == 0:
        csv_file = open(args.csv, "a", newline="")
        writer = csv.writer(csv_file)
        if csv_file.tell() == 0:  # a new (or empty) file: the header first
            writer.writerow(COLUMNS)
    ok = True
    timings = []
    for tokens in args.tokens:
        if rank == 0:
            print(f"{world} x {device_name}, T = {tokens}, H = {args.hidden} bf16, "
                  f"K = {args.topk}, E = {ctx.experts}:", flush=True)
        ok = run_tokens(ctx, args, tokens, writer, device_name, timings) and ok
    if args.dump and rank == 0:
        dump_meta(args.dump, args, ctx, device_name, timings)
    if csv_file:
        csv_file.close()
    moe.release()
    dist.destroy_process_group()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
