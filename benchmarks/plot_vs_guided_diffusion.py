"""Bar chart of vs_guided_diffusion.py results: guided-diffusion's time / ours per loop, with [min, max].

    python benchmarks/plot_vs_guided_diffusion.py --out benchmarks/results/vs_guided_diffusion.png \\
        benchmarks/results/cpu-x86_64-2core_vs_guided_diffusion.json ...

Each JSON becomes one group of three bars (IDDPM loop, DDIM loop, training step), labelled by
its device, batch and whether ours was compiled; a dashed line marks issue 15's 1.3x target and
a solid one parity.
"""

from __future__ import annotations

import argparse
import json
import sys

KINDS = (("iddpm", "IDDPM loop"), ("ddim", "DDIM loop"), ("train", "training step"))


def label(result: dict) -> str:
    if result.get("device", "cpu") == "cpu":
        cpu = result.get("cpu", "")  # "AMD EPYC (AVX2)"; records from before it was kept have none
        ident = cpu[cpu.rindex("(") + 1 : -1] if cpu.endswith(")") and "(" in cpu else ""
        isa, _, model = ident.partition("; ")  # "AVX-512; family 25 model 17": the numbers on a line of their own
        if isa.startswith("family "):  # no vector ISA flag, only the numbers
            isa, model = "", isa
        device = f"CPU{f' ({isa})' if isa else ''}, {result['threads']} thread{'s' if result['threads'] > 1 else ''}"
        if model:
            device += f"\n{model}"
    else:  # the benchmark turns TF32 off on CUDA
        device = result["device"].replace("NVIDIA ", "") + ", fp32"
    parts = [device, f"batch {result['batch']}"]
    if result.get("ours_compiled"):
        parts.append("ours compiled")
    if result.get("ours_channels_last"):
        parts.append("ours channels_last")
    if result.get("ours_winograd"):
        parts.append("ours Winograd")
    if str(result.get("host_allocator", "default")).startswith("tuned"):
        parts.append("allocator tuned")
    return "\n".join(parts)


def plot(paths: list[str], out: str) -> list[dict]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = []
    for path in paths:
        with open(path) as f:
            results.append(json.load(f))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.9 * len(results)), 4.0))
    width = 0.8 / len(KINDS)
    for i, (kind, name) in enumerate(KINDS):
        ratios = [r[kind]["ratio_theirs_over_ours"] for r in results]
        xs = [g + (i - 1) * width for g in range(len(results))]
        med = [q["median"] for q in ratios]
        err = [[q["median"] - q["min"] for q in ratios], [q["max"] - q["median"] for q in ratios]]
        ax.bar(xs, med, width, yerr=err, capsize=3, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(1.3, color="gray", linestyle="--", linewidth=0.8, label="issue 15 target (1.3x)")
    ax.set_xticks(range(len(results)), [label(r) for r in results], fontsize=8)
    ax.set_ylabel("guided-diffusion time / dkdm time")
    ax.set_ylim(0.6, max(1.6, max(r[k]["ratio_theirs_over_ours"]["max"] for r in results for k, _ in KINDS) + 0.05))
    ax.set_title(
        "dkdm vs guided-diffusion on identical weights (> 1: dkdm faster; bars: median, [min, max])", fontsize=9
    )
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return results


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("results", nargs="+", help="vs_guided_diffusion.py JSON files, one group of bars each")
    a = p.parse_args(argv)
    plot(a.results, a.out)
    print(a.out)


if __name__ == "__main__":
    main(sys.argv[1:])
