"""What the MoE layer's grouped GEMMs could take with the GEMMs torch offers:
`torch._grouped_mm` as GroupedMatmul calls it (2-D rows, 3-D weights,
int32 group ends), the same call steered to torch's other tile shape
(where it can be: groups of at most 128 rows), and
`torch.bmm` on groups of equal size (an upper bound: routing never makes
the groups equal). Bf16, graph-replayed, median per call; each variant's
output is checked against the first before its time is printed.

torch (2.11) picks a 64 x 128 ping-pong tile when the groups average at
most 128 rows, else a 128 x 256 cooperative one. Giving x spare rows past
the last group's end raises that average above 128 without changing the
problem, so the larger tile runs on the same rows. Nothing lowers the
average, so for groups of more than 128 rows the column shows "-".

  python benchmarks/grouped_gemm_options.py [--rows-per-group 128 512]
      [--groups 8] [--hidden 7168] [--intermediate 2048]

Needs a GPU of compute capability 9.x or 10.x (what torch._grouped_mm
runs on); exits with status 2 elsewhere.
"""

import argparse
import sys

import torch


def parse():
    parser = argparse.ArgumentParser(
        description="Time torch's grouped GEMM options on the MoE layer's shapes.")
    parser.add_argument("--rows-per-group", type=int, nargs="+", default=[128, 512],
                        help="rows of each group (default: 128 512)")
    parser.add_argument("--groups", type=int, default=8,
                        help="experts on the rank (default: 8)")
    parser.add_argument("--hidden", type=int, default=7168, help="H (default: 7168)")
    parser.add_argument("--intermediate", type=int, default=2048,
                        help="I (default: 2048)")
    parser.add_argument("--calls", type=int, default=10,
                        help="calls per captured graph (default: 10)")
    args = parser.parse_args()
    for name in ("groups", "hidden", "intermediate", "calls"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if any(rows < 1 for rows in args.rows_per_group):
        parser.error(f"--rows-per-group must be >= 1, got {args.rows_per_group}")
    if args.hidden % 8 or args.intermediate % 8:
        parser.error("--hidden and --intermediate must be multiples of 8 "
                     "(16-byte rows for the TMA loads)")
    return args


def per_call_us(fn, calls, replays=15):
    """Median over `replays` graph replays of `calls` back-to-back calls."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(calls):
                fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        begin = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) * 1000 / calls)
    return sorted(times)[len(times) // 2]


def main():
    args = parse()
    if not torch.cuda.is_available():
        print("grouped_gemm_options.py: needs a GPU (torch sees none)", file=sys.stderr)
        return 2
    major, minor = torch.cuda.get_device_capability()
    if major not in (9, 10):
        print(f"grouped_gemm_options.py: torch._grouped_mm needs compute capability "
              f"9.x or 10.x, this GPU has {major}.{minor}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    device = torch.device("cuda", torch.cuda.current_device())
    G, H, I = args.groups, args.hidden, args.intermediate
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}; "
          f"{G} groups, bf16, per call (median of graph replays)")
    print(f"{'rows/group':>10}  {'GEMM (K x N)':<22}{'_grouped_mm':>12}"
          f"{'larger tile':>12}{'bmm (equal)':>13}  check")
    for rows in args.rows_per_group:
        # Rows past the last end that make the average 129 (larger tile).
        spare = 129 - rows if rows <= 128 else 0
        for name, k, n in (("gate", H, I), ("gate and up", H, 2 * I), ("down", I, H)):
            padded = torch.randn(G * (rows + spare), k, device=device,
                                 dtype=torch.bfloat16)
            x = padded[:G * rows]
            w = torch.randn(G, k, n, device=device, dtype=torch.bfloat16) * 0.02
            ends = torch.arange(1, G + 1, device=device, dtype=torch.int32) * rows
            variants = {
                "grouped": lambda: torch._grouped_mm(x, w, ends),
                "bmm": lambda: torch.bmm(x.view(G, rows, k), w),
            }
            if spare:
                variants["larger tile"] = lambda: torch._grouped_mm(padded, w, ends)
            reference = variants["grouped"]()
            # Another tile may sum K in another order: bf16 rounding apart.
            same = all(torch.allclose(fn().reshape(-1, n)[:G * rows].float(),
                                      reference.float(), rtol=2e-2, atol=2e-2)
                       for key, fn in variants.items() if key != "grouped")
            times = {key: per_call_us(fn, args.calls) for key, fn in variants.items()}
            larger = (f"{times['larger tile']:>10.1f}us" if spare else f"{'-':>12}")
            shape = f"{name} ({k} x {n})"
            print(f"{rows:>10}  {shape:<22}{times['grouped']:>10.1f}us{larger}"
                  f"{times['bmm']:>11.1f}us  {'ok' if same else 'MISMATCH'}", flush=True)
            del padded, x, w
    return 0


if __name__ == "__main__":
    sys.exit(main())
