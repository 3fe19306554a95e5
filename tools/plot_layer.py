#!/usr/bin/env python3
"""Plots the CSV that bench_moe_layer --csv writes: per number of ranks and
tokens per rank, the graph-replayed MoE layer stage by stage (router,
dispatch, grouped GEMM 1, the activation, grouped GEMM 2, combine, and the
whole replay), one bar per run (its modes: gate-up, activation, combine,
quantization, which grouped GEMM: "hostfuse_up_to_512_rows" where
GroupedMatmul's rule runs hostfuse's kernel up to 512 rows per expert and
torch's above, "torch" where it always runs torch's), each stage's floor
drawn as a black mark on its bars. A run with the activation in the GEMM's
epilogue has no activation bar: grouped GEMM 1 holds it. Writes PNGs named
<prefix>_<ranks>ranks_T<tokens>.png into --out (by default the first CSV's
folder); PNGs need matplotlib.

With --markdown it prints, instead, one Markdown table per number of ranks
and tokens: each stage's time per run and its floor (the first run's: modes
that move fewer bytes, such as the activation in the GEMM's epilogue, have
a slightly lower one).

  tools/plot_layer.py LAYER.csv [MORE.csv ...] [--out DIR] [--prefix NAME]
      [--markdown]
"""

import argparse
import os
from collections import defaultdict

# The CSV reader of the peers' plots, beside this script.
from plot_perf import load as load_csv
from plot_perf import output_folder, pyplot

COLUMNS = {"device", "ranks", "tokens", "hidden", "intermediate", "experts", "topk",
           "modes", "stage", "time_us", "floor_us"}
NUMBERS = {"ranks": int, "tokens": int, "time_us": float, "floor_us": float}
REPLAY = "graph replay"


def parse():
    parser = argparse.ArgumentParser(
        description="Plot bench_moe_layer --csv results (stage times and floors).")
    parser.add_argument("csv", nargs="+", help="CSV files written by bench_moe_layer --csv")
    parser.add_argument("--out", help="folder for the PNGs (made if missing; default: "
                        "the folder of the first CSV)")
    parser.add_argument("--prefix", default="layer", help="file name prefix")
    parser.add_argument("--markdown", action="store_true",
                        help="print Markdown tables instead of writing PNGs")
    return parser.parse_args()


def groups(rows):
    """{(ranks, tokens): (stages in file order, {modes: {stage: row}})}; a
    later run of the same modes replaces an earlier one."""
    grouped = {}
    for row in rows:
        key = (int(row["ranks"]), int(row["tokens"]))
        stages, runs = grouped.setdefault(key, ([], defaultdict(dict)))
        if row["stage"] not in stages:
            stages.append(row["stage"])
        runs[row["modes"]][row["stage"]] = row
    for stages, _ in grouped.values():
        # The whole replay last.
        if REPLAY in stages:
            stages.remove(REPLAY)
            stages.append(REPLAY)
    return grouped


def describe(row):
    return (f"{row['ranks']} x {row['device']}, T = {row['tokens']} per rank, "
            f"H = {row['hidden']}, I = {row['intermediate']}, E = {row['experts']}, "
            f"K = {row['topk']}")


def plot(rows, out, prefix):
    plt = pyplot("plot_layer.py")
    written = []
    for (ranks, tokens), (stages, runs) in sorted(groups(rows).items()):
        modes = sorted(runs)
        height = 0.8 / len(modes)
        longest = max(float(r["time_us"]) for run in runs.values() for r in run.values())
        fig, ax = plt.subplots(figsize=(10, 1.0 + 0.55 * len(stages) * max(1, len(modes) / 2)))
        palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for m, mode in enumerate(modes):
            ys, times, floors = [], [], []
            for s, stage in enumerate(stages):
                row = runs[mode].get(stage)
                if row is None:
                    continue
                ys.append(s + (m - (len(modes) - 1) / 2) * height)
                times.append(float(row["time_us"]))
                floors.append(float(row["floor_us"]))
            ax.barh(ys, times, height=height * 0.9, color=palette[m % len(palette)],
                    label=mode)
            for y, t, f in zip(ys, times, floors):
                ax.text(t, y, f" {t:.1f}" + (f" ({t / f:.1f}x floor)" if f > 0 else ""),
                        va="center", fontsize=7)
            ax.scatter([f for f in floors if f > 0], [y for y, f in zip(ys, floors) if f > 0],
                       marker="|", s=200, color="black", zorder=3,
                       label="floor" if m == 0 else None)
        ax.set_yticks(range(len(stages)))
        ax.set_yticklabels(stages)
        ax.invert_yaxis()
        ax.set_xlabel("time per step (us), graph replay")
        ax.set_xlim(0, longest * 1.3)  # room for the labels
        ax.grid(True, axis="x", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=1)
        first = next(iter(runs[modes[0]].values()))
        ax.set_title("MoE layer by stage: " + describe(first), fontsize=9)
        fig.tight_layout()
        path = os.path.join(out, f"{prefix}_{ranks}ranks_T{tokens}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def markdown(rows):
    lines = []
    for (ranks, tokens), (stages, runs) in sorted(groups(rows).items()):
        modes = sorted(runs)
        first = next(iter(runs[modes[0]].values()))
        lines.append(describe(first) + ":")
        lines.append("")
        lines.append("| stage | " + " | ".join(modes) + " | floor |")
        lines.append("|---|" + "---:|" * (len(modes) + 1))
        for stage in stages:
            cells = [runs[mode].get(stage) for mode in modes]
            times = [f"{float(c['time_us']):.1f}" if c else "" for c in cells]
            floor = next((float(c["floor_us"]) for c in cells if c), 0.0)
            name = f"**{stage}**" if stage == REPLAY else stage
            floor_cell = f"{floor:.1f}" if floor > 0 else ""
            lines.append(f"| {name} | " + " | ".join(times) + f" | {floor_cell} |")
        lines.append("")
    return "\n".join(lines)


def main():
    args = parse()
    rows = load_csv(args.csv, COLUMNS, NUMBERS, "plot_layer.py")
    if args.markdown:
        print(markdown(rows))
        return
    out = output_folder(args.out, args.csv, "plot_layer.py")
    for path in plot(rows, out, args.prefix):
        print(path)


if __name__ == "__main__":
    main()
