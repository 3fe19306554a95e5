#!/usr/bin/env python3
"""Plots the CSV that benchmarks/peers/bench_peers.py writes: per number of
ranks, median time vs tokens per rank (dispatch and combine side by side, one
line per row of the benchmark, log-log) and achieved GB/s vs tokens. Writes
PNGs named <prefix>_time_<ranks>ranks.png and <prefix>_gbps_<ranks>ranks.png
into --out (by default the first CSV's folder); PNGs need matplotlib.

With --markdown it prints, instead, one Markdown table per number of ranks:
each row's median time per tokens count, with its ratio to the torch a2a
row (> 1: faster than plain PyTorch) and its output check.

  tools/plot_perf.py RESULTS.csv [MORE.csv ...] [--out DIR] [--prefix NAME]
      [--markdown]
"""

import argparse
import csv
import os
import sys
from collections import defaultdict

COLUMNS = {"ranks", "tokens", "row", "phase", "median_us", "gbps", "device"}
# The columns read as numbers, and as which type.
NUMBERS = {"ranks": int, "tokens": int, "median_us": float, "gbps": float}


def parse():
    parser = argparse.ArgumentParser(
        description="Plot bench_peers.py CSV results (time and GB/s vs tokens).")
    parser.add_argument("csv", nargs="+", help="CSV files written by bench_peers.py")
    parser.add_argument("--out", help="folder for the PNGs (made if missing; default: "
                        "the folder of the first CSV)")
    parser.add_argument("--prefix", default="moe", help="file name prefix")
    parser.add_argument("--markdown", action="store_true",
                        help="print Markdown tables instead of writing PNGs")
    return parser.parse_args()


def load(paths, columns=COLUMNS, numbers=NUMBERS, script="plot_perf.py"):
    """The rows of the CSV files `paths` as dicts of strings; exits naming
    `script` and the file when one cannot be read or is not text, is empty,
    lacks any of `columns`, has a line with fewer fields than its header or
    a value of a column of `numbers` that is not a number of its type
    (naming the line), or when there are no rows."""
    rows = []
    for path in paths:
        try:
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames is None:
                    sys.exit(f"{script}: {path} is empty (no header line)")
                missing = set(columns) - set(reader.fieldnames)
                if missing:
                    sys.exit(f"{script}: {path} lacks the columns {sorted(missing)}")
                for row in reader:
                    if None in row.values():
                        sys.exit(f"{script}: {path}, line {reader.line_num}: fewer "
                                 "fields than the header")
                    for column, kind in numbers.items():
                        try:
                            kind(row[column])
                        except (TypeError, ValueError):
                            sys.exit(f"{script}: {path}, line {reader.line_num}: "
                                     f"{column} = {row[column]!r} is not "
                                     f"{'an integer' if kind is int else 'a number'}")
                    rows.append(row)
        except OSError as error:
            sys.exit(f"{script}: cannot read {path}: {error.strerror}")
        except (UnicodeDecodeError, csv.Error) as error:
            sys.exit(f"{script}: {path} is not a CSV file ({error})")
    if not rows:
        sys.exit(f"{script}: no rows in " + ", ".join(paths))
    return rows


def pyplot(script):
    """matplotlib.pyplot on the Agg backend; exits naming `script` when
    matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        sys.exit(f"{script}: writing PNGs needs matplotlib, which {sys.executable} "
                 "lacks (pip install matplotlib); --markdown needs nothing more")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def output_folder(out, paths, script):
    """`out`, or the folder of the first of `paths` when None, made if
    missing; exits naming `script` when it cannot be made."""
    folder = out if out is not None else (os.path.dirname(paths[0]) or ".")
    if not folder:
        sys.exit(f"{script}: --out is empty")
    if os.path.exists(folder) and not os.path.isdir(folder):
        sys.exit(f"{script}: --out {folder} is a file, not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        sys.exit(f"{script}: cannot make the output folder {folder}: {error.strerror}")
    return folder


def plot(rows, metric, ylabel, out, prefix):
    plt = pyplot("plot_perf.py")
    written = []
    by_ranks = defaultdict(list)
    for row in rows:
        by_ranks[int(row["ranks"])].append(row)
    for ranks, group in sorted(by_ranks.items()):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=(metric == "median_us"))
        # One colour per benchmark row in both panels.
        names = sorted({row["row"] for row in group})
        palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        colour = {name: palette[i % len(palette)] for i, name in enumerate(names)}
        for ax, phase in zip(axes, ("dispatch", "combine")):
            lines = defaultdict(dict)
            for row in group:
                if row["phase"] == phase:
                    lines[row["row"]][int(row["tokens"])] = float(row[metric])
            for name, points in sorted(lines.items()):
                tokens = sorted(points)
                ax.plot(tokens, [points[t] for t in tokens], marker="o", label=name,
                        color=colour[name])
            ax.set_xscale("log", base=2)
            if metric == "median_us":
                ax.set_yscale("log")
            ax.set_xlabel("tokens per rank")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{phase}")
            ax.grid(True, which="both", alpha=0.3)
            if lines:
                ax.legend(fontsize=8)
        device = group[0]["device"]
        fig.suptitle(f"MoE {ylabel.split(' (')[0]} on {ranks} x {device}")
        fig.tight_layout()
        path = os.path.join(out, f"{prefix}_{'time' if metric == 'median_us' else 'gbps'}"
                                 f"_{ranks}ranks.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def markdown(rows, baseline="torch a2a"):
    """Markdown tables: per ranks, per tokens, every row's dispatch and
    combine time and its ratio to `baseline` in the same run."""
    lines = []
    by_ranks = defaultdict(list)
    for row in rows:
        by_ranks[int(row["ranks"])].append(row)
    for ranks, group in sorted(by_ranks.items()):
        lines.append(f"{ranks} x {group[0]['device']}:")
        lines.append("")
        lines.append("| T | row | dispatch us | vs torch a2a | combine us | vs torch a2a | check |")
        lines.append("|---:|---|---:|---:|---:|---:|---|")
        cells = defaultdict(dict)
        order = []
        for row in group:
            key = (int(row["tokens"]), row["row"])
            if key not in cells:
                order.append(key)
            cells[key][row["phase"]] = row
        for tokens, name in sorted(order, key=lambda k: (k[0], order.index(k))):
            phases = cells[(tokens, name)]
            out = [str(tokens), name]
            for phase in ("dispatch", "combine"):
                mine = phases.get(phase)
                base = cells.get((tokens, baseline), {}).get(phase)
                if mine is None:
                    out += ["", ""]
                    continue
                us = float(mine["median_us"])
                out.append(f"{us:.1f}")
                out.append(f"{float(base['median_us']) / us:.2f}x" if base and us > 0 else "")
            # "-": a row with no output to check (the NVLink floor).
            checks = {p["check"] for p in phases.values()} - {"-"}
            out.append("MISMATCH" if checks - {"ok"} else "ok" if checks else "-")
            lines.append("| " + " | ".join(out) + " |")
        lines.append("")
    return "\n".join(lines)


def main():
    args = parse()
    rows = load(args.csv)
    if args.markdown:
        print(markdown(rows))
        return
    out = output_folder(args.out, args.csv, "plot_perf.py")
    written = plot(rows, "median_us", "median time (us)", out, args.prefix)
    written += plot(rows, "gbps", "GB/s (bytes sent / time)", out, args.prefix)
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
