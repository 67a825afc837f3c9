#!/usr/bin/python3
"""Draws shmps-bench's scale group: applied throughput and memory against the number of workers.

    build/release/bin/shmps-bench --only scale --out scale.txt
    tools/bench/plot_scale.py scale.txt docs/scale.png [--title "2-core VM"]

Reads the bench's "name value unit" lines (scale.<mode>.<W>.<figure>) and writes one PNG with
two panels: Gfloat/s applied by the server (and its busy fraction), and MiB of /dev/shm and of
each worker's private memory, both against W, for ASP and BSP. Needs Debian's python3-matplotlib.
"""
import argparse
import collections
import re
import sys


def read_figures(path):
    """{mode: {W: {figure: value}}} from the bench's output lines."""
    figures = collections.defaultdict(lambda: collections.defaultdict(dict))
    pattern = re.compile(r"^scale\.(asp|bsp)\.(\d+)\.([a-z_.]+) ([-+0-9.eE]+) ")
    with open(path) as f:
        for line in f:
            m = pattern.match(line)
            if m:
                figures[m.group(1)][int(m.group(2))][m.group(3)] = float(m.group(4))
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench_output", help="the file shmps-bench --out wrote")
    parser.add_argument("png", help="the picture to write")
    parser.add_argument("--title", default="shmps-bench scale", help="the picture's title")
    args = parser.parse_args()
    figures = read_figures(args.bench_output)
    if not figures:
        sys.exit(f"plot_scale.py: no scale.* figures in {args.bench_output}: run shmps-bench --only scale --out FILE")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plot_scale.py: needs matplotlib: apt-get install python3-matplotlib")

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"asp": "o-", "bsp": "s--"}
    for mode, by_w in sorted(figures.items()):
        ws = sorted(by_w)
        speed.plot(ws, [by_w[w].get("applied", 0) for w in ws], styles[mode], label=f"{mode.upper()} applied")
        memory.plot(ws, [by_w[w].get("shm", 0) for w in ws], styles[mode], label=f"{mode.upper()} /dev/shm (segment)")
        memory.plot(ws, [by_w[w].get("worker_rss", 0) * w for w in ws], styles[mode], alpha=0.5,
                    label=f"{mode.upper()} workers' private memory (all W)")
    busy = speed.twinx()
    for mode, by_w in sorted(figures.items()):
        ws = sorted(by_w)
        busy.plot(ws, [by_w[w].get("busy", 0) for w in ws], styles[mode], color="grey", alpha=0.4)
    busy.set_ylabel("server busy fraction (grey)")
    busy.set_ylim(0, 1)
    for ax in (speed, memory):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({w for by_w in figures.values() for w in by_w}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("workers W")
        ax.grid(alpha=0.3)
    speed.set_ylabel("Gfloat/s applied by the server")
    speed.set_ylim(bottom=0)
    speed.legend(loc="upper left", fontsize=8)
    memory.set_ylabel("MiB")
    memory.set_yscale("log")
    memory.legend(loc="upper left", fontsize=8)
    fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(f"plot_scale.py: wrote {args.png}")


if __name__ == "__main__":
    main()
