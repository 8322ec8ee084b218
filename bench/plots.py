"""PNG plots: cost and saturation ratios to untraced with their 95 % intervals, the
in-traffic ns per invocation with theirs, and the per-packet breakdown. Needs matplotlib
(the `bench` extra); the bench skips plots without it."""
from __future__ import annotations

from pathlib import Path

def available() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def ratio_figure(section: dict, labels, key: str, xlabel: str, title: str,
                 path: Path) -> None:
    """One horizontal bar per (workload, configuration): the mean paired ratio with its
    95 % interval as an error bar, and a line at 1 (the reference)."""
    plt = _plt()
    rows = [(wl, c, row[key]) for wl, per in section.items() for c, row in per.items()
            if row.get(key)]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1.4))
    ys = list(range(len(rows)))
    means = [ci["mean"] for _, _, ci in rows]
    err = [[ci["mean"] - ci["lo"] for _, _, ci in rows],
           [ci["hi"] - ci["mean"] for _, _, ci in rows]]
    ax.barh(ys, means, xerr=err, color="tab:blue", alpha=0.7, capsize=3)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(ys)
    ax.set_yticklabels([f"{wl}: {labels.get(c, c)}" for wl, c, _ in rows], fontsize=7)
    ax.invert_yaxis()
    lo = min([ci["lo"] for _, _, ci in rows] + [1.0])
    ax.set_xlim(left=max(0.0, lo - 0.1))
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def in_traffic_figure(section: dict, labels, path: Path) -> None:
    plt = _plt()
    rows = [(wl, c, row["ns"]) for wl, per in section.items() for c, row in per.items()
            if row.get("ns")]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1.4))
    ys = list(range(len(rows)))
    ax.barh(ys, [ci["mean"] for *_, ci in rows],
            xerr=[[ci["mean"] - ci["lo"] for *_, ci in rows],
                  [ci["hi"] - ci["mean"] for *_, ci in rows]],
            color=["tab:red" if c == "thesis" else "tab:blue" for _, c, _ in rows],
            alpha=0.7, capsize=3)
    ax.set_yticks(ys)
    ax.set_yticklabels([f"{wl}: {labels.get(c, c)}" for wl, c, _ in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ns per classifier invocation in traffic (mean over rounds, 95 % interval)")
    ax.set_title("in-traffic cost")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def per_packet_figure(rows, path: Path) -> None:
    plt = _plt()
    subjects = [("empty", "grey"), ("thesis", "tab:red"), ("mirror", "tab:blue"),
                ("mirror+clone", "lightsteelblue")]
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(rows) + 1.2))
    h = 0.2
    for i, (name, color) in enumerate(subjects):
        ys = [j + (i - 1.5) * h for j in range(len(rows))]
        ax.barh(ys, [r["ns"].get(name, 0) for r in rows], height=h, color=color, label=name)
    large = [j for j, r in enumerate(rows) if r.get("large_map")]
    if large:       # the large-map rows come last: a line above them
        ax.axhline(large[0] - 0.5, color="black", linewidth=0.6, linestyle="--")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r["frame"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ns per packet (BPF_PROG_TEST_RUN)")
    ax.set_title("per-packet cost by frame class")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def make_all(summary: dict, labels: dict[str, str], outdir: Path, stem: str) -> dict[str, str]:
    """Writes the PNGs; returns {title: file name} for the Markdown report."""
    out = {}
    jobs = [
        ("cost at a fixed load", f"{stem}-cost.png", summary["cost"],
         lambda p: ratio_figure(summary["cost"], labels, "vs_untraced",
                                "CPU time per request (GB) / untraced, 95 % interval",
                                "cost at a fixed offered load", p)),
        ("saturation throughput", f"{stem}-saturation.png", summary["saturation"],
         lambda p: ratio_figure(summary["saturation"], labels, "vs_untraced",
                                "throughput / untraced, 95 % interval",
                                "saturation throughput", p)),
        ("in-traffic cost", f"{stem}-in-traffic.png", summary["in_traffic"],
         lambda p: in_traffic_figure(summary["in_traffic"], labels, p)),
        ("per-packet cost", f"{stem}-per-packet.png", summary["microbench"],
         lambda p: per_packet_figure(summary["microbench"], p)),
    ]
    for title, name, data, fn in jobs:
        if not data:
            continue
        fn(outdir / name)
        _shrink(outdir / name)
        out[title] = name
    return out


def _shrink(path: Path) -> None:
    """Re-saves a plot with a 64-colour palette: a quarter of the size, same look."""
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)
