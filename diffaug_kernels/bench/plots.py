"""The paper's two DiffAug figures, as PNG files: the augmentation grid (original images, then DiffAug samples at
t = 350, 400, ..., 700) and the mean prediction entropy of classifiers on DiffAug samples against t; and benchmark
results (bench, bench-model, bench-ensemble, bench-certify, bench-train) as bar charts.

Drawing uses matplotlib when it is installed and PIL (always there, through torchvision) otherwise; the grid and
the bar chart are always PIL.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["GRID_TIMES", "ENTROPY_TIMES", "diffaug_samples", "augmentation_grid", "save_image_grid",
           "entropy_vs_t", "plot_lines", "plot_bars", "results_chart"]

GRID_TIMES = tuple(range(350, 701, 50))  # the paper's figure: 8 columns, t = 350..700 step 50
ENTROPY_TIMES = tuple(range(0, 1000, 50)) + (999,)


# ------------------------------------------------------------------------------------------------ grid
@torch.no_grad()
def diffaug_samples(aug, x: Tensor, times: Sequence[int], seed: int = 0) -> Tensor:
    """[len(times), B, C, H, W]: aug(x, t) for each t, each time with its own fixed Philox seed."""
    return torch.stack([aug(x, t=int(t), seed=seed + k) for k, t in enumerate(times)])


def _to_uint8(img: Tensor) -> np.ndarray:
    """[C, H, W] in [-1, 1] -> HxW (grey) or HxWx3 uint8."""
    a = ((img.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return a[0].numpy() if a.shape[0] == 1 else a[:3].permute(1, 2, 0).numpy()


def save_image_grid(rows: Sequence[Sequence[Tensor]], path: str, headers: Optional[Sequence[str]] = None,
                    scale: Optional[int] = None, pad: int = 2) -> str:
    """Tiles rows of [C, H, W] images in [-1, 1] into one PNG (nearest-neighbour upscaled by `scale`, default so a
    cell is at least 64 px), with optional column headers. Returns path."""
    from PIL import Image, ImageDraw

    if not rows or not rows[0]:
        raise ValueError("save_image_grid needs at least one row with one image")
    C, H, W = rows[0][0].shape
    scale = scale or max(1, math.ceil(64 / max(H, W)))
    ch, cw = H * scale, W * scale
    ncol = max(len(r) for r in rows)
    top = 16 if headers else 0
    canvas = Image.new("RGB", (ncol * (cw + pad) + pad, top + len(rows) * (ch + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, h in enumerate(headers or []):
        draw.text((pad + j * (cw + pad) + 2, 2), str(h), fill=(0, 0, 0))
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            tile = Image.fromarray(_to_uint8(img)).convert("RGB").resize((cw, ch), Image.NEAREST)
            canvas.paste(tile, (pad + j * (cw + pad), top + pad + i * (ch + pad)))
    canvas.save(path, format="PNG")
    return path


def augmentation_grid(aug, x: Tensor, path: str, times: Sequence[int] = GRID_TIMES, seed: int = 0,
                      scale: Optional[int] = None) -> str:
    """The paper's figure: one row per image of x ([B, C, H, W] in [-1, 1]); the original, then one DiffAug
    sample per t in times (default 350..700 step 50)."""
    samples = diffaug_samples(aug, x, times, seed)  # [T, B, C, H, W]
    rows = [[x[b]] + [samples[k, b] for k in range(len(times))] for b in range(x.shape[0])]
    return save_image_grid(rows, path, headers=["x0"] + [f"t={t}" for t in times], scale=scale)


# ------------------------------------------------------------------------------------------------ entropy
@torch.no_grad()
def entropy_vs_t(classifiers: Dict[str, Callable[[Tensor], Tensor]], aug, x: Tensor,
                 times: Sequence[int] = ENTROPY_TIMES, batch_size: int = 128, seed: int = 0,
                 progress: Optional[Callable[[int], None]] = None) -> Dict[str, list]:
    """Mean prediction entropy (nats) of each classifier on DiffAug samples of x at each t. The same samples
    (one Philox seed per t and batch) are shown to every classifier. t = 0 is still one diffusion step (the
    package's convention); the raw images are not included. progress(k) is called after each t."""
    out = {name: [] for name in classifiers}
    for k, t in enumerate(times):
        sums = {name: 0.0 for name in classifiers}
        for s in range(0, x.shape[0], batch_size):
            xb = x[s:s + batch_size]
            x0 = aug(xb, t=int(t), seed=seed + 1000 * k + s)
            for name, clf in classifiers.items():
                logp = torch.log_softmax(clf(x0).float(), -1)
                sums[name] += float(-(logp.exp() * logp).sum(-1).sum())
        for name in classifiers:
            out[name].append(sums[name] / x.shape[0])
        if progress is not None:
            progress(k)
    return out


# ------------------------------------------------------------------------------------------------ line plot
_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]  # matplotlib's tab10


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_lines(series: Dict[str, tuple], path: str, title: str = "", xlabel: str = "", ylabel: str = "",
               hline: Optional[tuple] = None, use_matplotlib: Optional[bool] = None,
               marker: Optional[str] = "o") -> str:
    """series: {label: (xs, ys)} -> a line plot PNG at path. hline=(y, label) draws a dashed reference line.
    marker=None draws the lines alone (curves sampled on a fine grid). matplotlib when installed
    (use_matplotlib=None), else PIL."""
    if use_matplotlib is None:
        use_matplotlib = _have_matplotlib()
    if use_matplotlib:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for label, (xs, ys) in series.items():
            ax.plot(xs, ys, marker=marker, markersize=3, label=label)
        if hline is not None:
            ax.axhline(hline[0], linestyle="--", color="grey", label=hline[1])
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, format="png")
        plt.close(fig)
        return path
    return _plot_lines_pil(series, path, title, xlabel, ylabel, hline, marker is not None)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list:
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    ticks, v = [], start
    while v <= hi + 1e-9 * step:
        ticks.append(round(v, 10))
        v += step
    return ticks


def _plot_lines_pil(series, path, title, xlabel, ylabel, hline, markers: bool = True) -> str:
    from PIL import Image, ImageDraw

    Wd, Ht = 640, 420
    L, R, T, B = 60, 150, 30, 50  # margins; the legend sits in the right margin
    img = Image.new("RGB", (Wd, Ht), (255, 255, 255))
    d = ImageDraw.Draw(img)
    xs_all = [float(v) for xs, _ in series.values() for v in xs]
    ys_all = [float(v) for _, ys in series.values() for v in ys if v is not None and math.isfinite(v)]
    if hline is not None:
        ys_all.append(float(hline[0]))
    if not xs_all or not ys_all:
        raise ValueError("plot_lines needs at least one finite point")
    x0, x1 = min(xs_all), max(xs_all)
    y0, y1 = min(0.0, min(ys_all)), max(ys_all) * 1.05 + 1e-9
    if x1 == x0:
        x1 = x0 + 1

    def px(x, y):
        return (L + (x - x0) / (x1 - x0) * (Wd - L - R), Ht - B - (y - y0) / (y1 - y0) * (Ht - T - B))

    d.rectangle([L, T, Wd - R, Ht - B], outline=(0, 0, 0))
    for v in _nice_ticks(x0, x1):
        X, _ = px(v, y0)
        d.line([X, Ht - B, X, Ht - B + 4], fill=(0, 0, 0))
        d.line([X, T, X, Ht - B], fill=(230, 230, 230))
        d.text((X - 8, Ht - B + 6), f"{v:g}", fill=(0, 0, 0))
    for v in _nice_ticks(y0, y1):
        _, Y = px(x0, v)
        d.line([L - 4, Y, L, Y], fill=(0, 0, 0))
        d.line([L, Y, Wd - R, Y], fill=(230, 230, 230))
        d.text((4, Y - 6), f"{v:g}", fill=(0, 0, 0))
    d.rectangle([L, T, Wd - R, Ht - B], outline=(0, 0, 0))
    if hline is not None:
        _, Y = px(x0, hline[0])
        for s in range(L, Wd - R, 10):
            d.line([s, Y, min(s + 5, Wd - R), Y], fill=(128, 128, 128))
    legend = list(series.items())
    for k, (label, (xs, ys)) in enumerate(legend):
        col = _COLORS[k % len(_COLORS)]
        pts = [px(float(a), float(b)) for a, b in zip(xs, ys) if b is not None and math.isfinite(b)]
        if len(pts) > 1:
            d.line(pts, fill=col, width=2)
        for X, Y in pts if markers else ():
            d.ellipse([X - 2, Y - 2, X + 2, Y + 2], fill=col)
        ly = T + 10 + 16 * k
        d.line([Wd - R + 10, ly + 6, Wd - R + 30, ly + 6], fill=col, width=2)
        d.text((Wd - R + 34, ly), str(label)[:18], fill=(0, 0, 0))
    if hline is not None:
        ly = T + 10 + 16 * len(legend)
        d.line([Wd - R + 10, ly + 6, Wd - R + 30, ly + 6], fill=(128, 128, 128))
        d.text((Wd - R + 34, ly), str(hline[1])[:18], fill=(0, 0, 0))
    d.text((L, 2), title, fill=(0, 0, 0))
    d.text((L + (Wd - L - R) // 2 - 3 * len(xlabel), Ht - 20), xlabel, fill=(0, 0, 0))
    d.text((4, T - 13), ylabel, fill=(0, 0, 0))
    img.save(path, format="PNG")
    return path


# ----------------------------------------------------------------------------------------- bar charts
def bar_color(label: str) -> tuple:
    """One colour per kind of implementation, the same in every chart."""
    label = label.lower()
    if label.startswith("copy"):
        return (150, 150, 150)
    if "published" in label:
        return (214, 39, 40) if "compiled" not in label else (255, 127, 14)
    if label.startswith("dda"):
        return (148, 103, 189)
    if "triton" in label:
        return (31, 119, 180)
    if "(auto" in label:  # fused (auto: cuda)
        return (152, 223, 138)
    if "eager" in label:
        return (140, 86, 75)
    return (44, 160, 44)  # fused kernels, compiled dk code


def plot_bars(groups: Dict[str, Sequence[tuple]], path: str, title: str = "", xlabel: str = "",
              ref: Optional[tuple] = None) -> str:
    """groups: {group title: [(label, value, note), ...]} -> a horizontal bar chart PNG at path (PIL), one block
    of bars per group, the bar's length its value, the note written after it. ref=(value, label) draws a dashed
    line across every group."""
    from PIL import Image, ImageDraw

    bars = [b for g in groups.values() for b in g]
    values = [float(v) for _, v, _ in bars]
    if not bars or not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError("plot_bars needs at least one bar, and finite non-negative values")
    bar_h, gap, head_h, T, B, span = 16, 4, 22, 44, 30, 480
    d = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    L = 24 + max(d.textlength(str(label)) for label, _, _ in bars)  # labels left of the bars
    R = 16 + max(d.textlength(str(note)) for _, _, note in bars)  # notes right of them
    Wd = int(max(L + span + R, 16 + d.textlength(title), L + d.textlength(xlabel) + 200))
    Ht = T + B + sum(head_h + len(g) * (bar_h + gap) + 8 for g in groups.values())
    top = max(values + ([float(ref[0])] if ref else []))
    top = top if top > 0 else 1.0
    scale = span / top
    img = Image.new("RGB", (Wd, Ht), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.text((8, 6), title, fill=(0, 0, 0))
    for v in _nice_ticks(0.0, top, 5):
        X = L + v * scale
        d.line([X, T - 6, X, Ht - B], fill=(225, 225, 225))
        d.text((X - 8, T - 18), f"{v:g}", fill=(0, 0, 0))
    if ref is not None:
        X = L + float(ref[0]) * scale
        for s in range(T - 6, Ht - B, 8):
            d.line([X, s, X, min(s + 4, Ht - B)], fill=(100, 100, 100))
    y = T
    for head, g in groups.items():
        d.text((8, y + 5), str(head), fill=(0, 0, 0))
        y += head_h
        for label, value, note in g:
            end = L + max(1.0, float(value) * scale)
            d.text((16, y + 2), str(label), fill=(0, 0, 0))
            d.rectangle([L, y, end, y + bar_h], fill=bar_color(str(label)))
            d.text((end + 6, y + 2), str(note), fill=(0, 0, 0))
            y += bar_h + gap
        y += 8
    d.line([L, T - 6, L, Ht - B], fill=(0, 0, 0))
    d.text((L, Ht - B + 8), xlabel + (f"; dashed: {ref[1]}" if ref else ""), fill=(0, 0, 0))
    img.save(path, format="PNG")
    return path


def results_chart(result: dict, path: str) -> str:
    """A benchmark result (the dict `bench`, `bench-model` or `bench-ensemble` writes as JSON) as a bar chart:
    the ops as shares of the copy bandwidth, the model and DiffAug-Ensemble rows as images/s."""
    rows = result.get("rows") or []
    if not rows:
        raise ValueError("results_chart: the result has no rows to draw")
    env = result.get("env", {})
    where = f"{env.get('device_name', '?')} ({env.get('device', '?')}), torch {env.get('torch', '?')}"
    groups: Dict[str, list] = {}
    if "pct_copy" in rows[0]:  # the ops benchmark
        for r in rows:
            head = f"{r['op']}  {'x'.join(map(str, r['shape']))}  {r['dtype']}"
            groups.setdefault(head, []).append(
                (r["impl"], r["pct_copy"], f"{r['pct_copy']:.1f}%  {r['ms']:.3f} ms  {r['speedup']:.2f}x eager"))
        return plot_bars(groups, path, f"{where}: share of the measured copy bandwidth "
                                       f"({result.get('copy_gb_s', float('nan')):.0f} GB/s), longer is faster",
                         "% of copy bandwidth (bytes the op must read and write / time)", ref=(100, "100%"))
    if "images_per_s" not in rows[0]:
        raise ValueError("results_chart: rows carry neither pct_copy (bench) nor images_per_s (bench-model, "
                         "bench-ensemble)")
    what = (f"batch {result.get('batch', '?')} at {result.get('size', '?')}x{result.get('size', '?')}")
    baselines = {"vs_first": "each group's first row", "vs_published_loop": "the published per-t loop",
                 "vs_loop": "the published per-t loop",  # vs_loop: the name in older files
                 "vs_published": "the published row"}  # bench-certify, bench-train
    keys = set()
    for r in rows:
        key = next((k for k in baselines if r.get(k) is not None), None)
        keys.add(key)
        note = f"{r['images_per_s']:.1f} img/s  {r['ms']:.1f} ms" + (f"  {r[key]:.2f}x" if key else "")
        if r.get("pct_matmul") is not None:
            note += f"  {r['pct_matmul']:.0f}% of bf16 matmul"
        if r.get("split_share"):  # bench-train: the step's parts, as shares of it
            note += "  (" + ", ".join(f"{p.split()[0]} {100 * v:.0f}%" for p, v in r["split_share"].items()) + ")"
        group = r.get("group") or ("DiffAug training step" if "split_ms" in r else "DiffAug-Ensemble")
        groups.setdefault(group, []).append((r["impl"], r["images_per_s"], note))
    against = " and ".join(sorted(baselines[k] for k in keys if k))
    return plot_bars(groups, path, f"{where}, {what}: images/s, longer is faster",
                     "images per second" + (f"; ratios against {against}" if against else ""))
