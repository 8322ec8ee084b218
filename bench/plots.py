"""PNG plots in the manner of the thesis's figures 5.1 (throughput against error
percentage), 5.2 (mean latency against error percentage) and 5.3 (request time
distribution on a log2 scale, and its difference from untraced), plus the per-packet
cost. Needs matplotlib (the `bench` extra); the bench skips plots without it."""
from __future__ import annotations

from pathlib import Path

STYLE = {"untraced": ("black", "o", "-"), "qdiscs": ("grey", "s", "--"),
         "mirror-htb": ("tab:orange", "^", "-"), "mirror-clsact": ("tab:blue", "D", "-"),
         "thesis": ("tab:red", "v", ":")}


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


def _lines(ax, summary, labels, metric, scale=1.0, ratio=False):
    levels = list(summary["http"])
    for c, label in labels.items():
        ys = []
        for p in levels:
            s = summary["http"][p][c][metric]
            v = s.get("ratio") if ratio else s["median"]
            ys.append(None if v is None else v * scale)
        color, marker, ls = STYLE.get(c, (None, "o", "-"))
        ax.plot(levels, [float("nan") if y is None else y for y in ys], label=label,
                color=color, marker=marker, linestyle=ls)
    ax.set_xticks(levels)
    ax.set_xlabel("error requests (%)")
    ax.grid(alpha=0.3)


def http_figure(summary, labels, metric, ylabel, title, path: Path) -> None:
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    _lines(a, summary, labels, metric)
    a.set_ylabel(ylabel)
    a.set_title(title)
    _lines(b, summary, {k: v for k, v in labels.items() if k != "untraced"}, metric,
           scale=100, ratio=True)
    b.axhline(100, color="black", linewidth=0.8)
    b.set_ylabel("% of untraced (paired by round)")
    b.set_title(f"{title}, relative to untraced")
    a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def distribution_figure(summary, labels, path: Path) -> None:
    plt = _plt()
    levels = [p for p in (0, 100) if p in summary["http"]]
    fig, axes = plt.subplots(2, len(levels), figsize=(5.5 * len(levels), 6.5), squeeze=False)
    for col, pct in enumerate(levels):
        row = summary["http"][pct]
        base = _fractions(row.get("untraced", {}).get("log2_hist"))
        top, bottom = axes[0][col], axes[1][col]
        for c, label in labels.items():
            frac = _fractions(row[c].get("log2_hist"))
            if not frac:
                continue
            color, marker, ls = STYLE.get(c, (None, "o", "-"))
            xs = list(range(len(frac)))
            top.step(xs, [100 * f for f in frac], where="post", label=label, color=color,
                     linestyle=ls)
            if base and c != "untraced":
                bottom.step(xs, [100 * (f - b) for f, b in zip(frac, base)], where="post",
                            label=label, color=color, linestyle=ls)
        for ax in (top, bottom):
            ax.set_xlim(3, 15)
            ticks = list(range(3, 16, 2))
            ax.set_xticks(ticks)
            ax.set_xticklabels([_us(2 ** k) for k in ticks])
            ax.grid(alpha=0.3)
        top.set_title(f"request time distribution, {pct} % errors")
        top.set_ylabel("% of requests")
        bottom.axhline(0, color="black", linewidth=0.8)
        bottom.set_title(f"difference from untraced, {pct} % errors")
        bottom.set_ylabel("percentage points")
        bottom.set_xlabel("request time, log2 buckets [2^k, 2^(k+1))")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _us(x: int) -> str:
    return f"{x} us" if x < 1000 else f"{x / 1000:.0f} ms"


def _fractions(hist):
    if not hist:
        return None
    total = sum(hist)
    return [h / total for h in hist] if total else None


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
        ("HTTP throughput", f"{stem}-http-throughput.png",
         lambda p: http_figure(summary, labels, "req_per_s", "requests/s (median)",
                               "h2load throughput", p)),
        ("mean request latency", f"{stem}-http-latency.png",
         lambda p: http_figure(summary, labels, "mean_us", "mean request time (us, median)",
                               "h2load mean request time", p)),
        ("latency distribution", f"{stem}-latency-distribution.png",
         lambda p: distribution_figure(summary, labels, p)),
        ("per-packet cost", f"{stem}-per-packet.png",
         lambda p: per_packet_figure(summary["microbench"], p)),
    ]
    for title, name, fn in jobs:
        if title == "per-packet cost" and not summary["microbench"]:
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
