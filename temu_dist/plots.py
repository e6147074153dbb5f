"""Pictures people look at instead of tables: heatmaps, prediction scatter (seed Fig. 10), score vs time (Fig. 6)."""
from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: training nodes have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import colormaps, font_manager  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import Image  # noqa: E402

from temu_dist.atomic import write_atomic  # noqa: E402
from temu_dist.config import Notice  # noqa: E402

HEATMAP_COLOURS = "RdYlGn"  # red is bad, green is good
# Families with CJK glyphs, as Linux, macOS and Windows install them. matplotlib falls back along font.family glyph by
# glyph, so a photo or run named in Chinese, Japanese or Korean is drawn in its script where one is installed.
CJK_FAMILIES = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans CJK TC", "Noto Sans CJK KR", "Source Han Sans SC",
                "Source Han Sans", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", "Droid Sans Fallback", "PingFang SC",
                "Hiragino Sans GB", "Hiragino Sans", "Apple SD Gothic Neo", "Microsoft YaHei", "SimHei", "Yu Gothic",
                "Malgun Gothic")
_missing_said = False  # the missing glyphs are said once a process, not once a plot


def with_cjk_fallback(families: tuple[str, ...] = CJK_FAMILIES) -> list[str]:
    """Adds the installed ones of `families` behind font.family; returns them."""
    installed = {f.name for f in font_manager.fontManager.ttflist}
    found = [name for name in families if name in installed and name not in plt.rcParams["font.family"]]
    plt.rcParams["font.family"] = [*plt.rcParams["font.family"], *found]
    return found


with_cjk_fallback()
# EXIF orientation -> the turn that shows an image as viewers show it. Pillow keeps this table inside exif_transpose,
# which turns an image but not the patch-score map that goes with it.
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}


def heatmap_overlay(image: Image.Image, patch_scores: np.ndarray, alpha: float = 0.45,
                    span: tuple[float, float] = (0.0, 1.0)) -> Image.Image:
    """The patch-score map [gh, gw], upsampled over the image, coloured over `span`: red is bad, green is good."""
    rgb = image.convert("RGB")
    lo, hi = span
    scores = Image.fromarray(np.clip((patch_scores - lo) / (hi - lo), 0.0, 1.0).astype(np.float32), mode="F")
    scores = np.asarray(scores.resize(rgb.size, Image.BILINEAR))
    colours = (colormaps[HEATMAP_COLOURS](scores)[..., :3] * 255).astype(np.uint8)
    return Image.blend(rgb, Image.fromarray(colours), alpha)


def upright(image: Image.Image, patch_scores: np.ndarray, orientation: int) -> tuple[Image.Image, np.ndarray]:
    """The image and its patch-score map [gh, gw] turned together as the EXIF orientation tag says (1, or none of
    2-8: as they are)."""
    turn = UPRIGHT.get(orientation)
    if turn is None:
        return image, patch_scores
    grid = Image.fromarray(np.asarray(patch_scores, dtype=np.float32), mode="F").transpose(turn)
    return image.transpose(turn), np.asarray(grid)


def heatmap(image: Image.Image, patch_scores: np.ndarray, score: float, path: str | Path, name: str = "",
            stretch: bool = False, orientation: int = 1) -> Path:
    """The overlay under the image's name and score, with a colour bar for the patch scores. Shown at the image's own
    pixel size, brought within 256-1024 px on its longer side so small images stay legible and large ones stay light.
    The colours span 0-1, the same for every image; `stretch`: this map's own lowest to highest score, which shows
    where a model whose patch scores differ little looks, but not how much. `orientation`: the file's EXIF tag, by
    which the image and its map are shown upright, as viewers show the photo."""
    image, patch_scores = upright(image, patch_scores, orientation)
    lo, hi = float(patch_scores.min()), float(patch_scores.max())
    span = (lo, hi) if stretch and hi > lo else (0.0, 1.0)
    w, h = image.size
    scale = min(max(1.0, 256 / max(w, h)), 1024 / max(w, h))
    shown_w, shown_h = round(w * scale), round(h * scale)
    if scale < 1:  # coloured at the size shown: a 48 MP photo's map at full size took 4 GB
        image = image.resize((shown_w, shown_h), Image.BILINEAR, reducing_gap=3.0)
    overlay = heatmap_overlay(image, patch_scores, span=span)
    # px: the title's line, the colour bar with its labels; the image's column and row at least as wide as a short
    # title and as tall as a legible bar, whatever the image's aspect.
    title_px, bar_px, column, row = 30, 130, max(shown_w, 160), max(shown_h, 120)
    width, height = column + bar_px, row + title_px
    fig = plt.figure(figsize=(width / 100, height / 100), dpi=100)
    ax = fig.add_axes((0, 0, shown_w / width, shown_h / height))
    ax.imshow(overlay, interpolation="antialiased")
    ax.set_axis_off()
    # A file name in another encoding (Latin-1 from a zip) holds surrogates, which matplotlib cannot draw.
    name = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    title = f"{name}: score {score:.3f}" if name else f"score {score:.3f}"
    fits = (width - 8) // 8  # characters of 10 pt text across the canvas
    fig.text(4 / width, 1 - title_px / 2 / height, title if len(title) <= fits else "..." + title[3 - fits:],
             ha="left", va="center", fontsize=10)
    cax = fig.add_axes(((column + 10) / width, 0.05 * row / height, 12 / width, 0.9 * row / height))
    ticks = [span[0], sum(span) / 2, span[1]]
    cbar = fig.colorbar(plt.cm.ScalarMappable(norm=plt.Normalize(*span), cmap=HEATMAP_COLOURS), cax=cax, ticks=ticks)
    cbar.ax.set_yticklabels([f"{ticks[0]:.3g} worse", f"{ticks[1]:.3g}", f"{ticks[2]:.3g} better"], fontsize=8)
    cbar.set_label("patch score", fontsize=8)
    # Not bbox "tight": the canvas is laid out to the pixel above. Whole or not at all, as every plot (a kill mid-write
    # would leave a broken PNG for MLflow to log).
    try:
        _savefig(fig, path, dpi=100)
    finally:
        plt.close(fig)
    return Path(path)


def scatter(pred: np.ndarray, mos: np.ndarray, title: str, target: str, path: str | Path) -> Path:
    """Predicted versus target score, both in [0, 1], with the identity line (seed Fig. 10). The axes widen for
    targets a little outside (LIVE's labels past 0-100), so no point is cut off."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=110)
    ax.scatter(mos, pred, s=8, alpha=0.6)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    finite = mos[np.isfinite(mos)]
    lo, hi = min(0.0, float(finite.min(initial=0.0))), max(1.0, float(finite.max(initial=1.0)))
    ax.set(xlim=(lo, hi), ylim=(lo, hi), xlabel=target, ylabel="predicted score", title=title)
    return _save(fig, path)


def score_vs_time(history: list[dict], sets: list[str], path: str | Path) -> Path:
    """(SRCC + PLCC) / 2 of each evaluation set against cumulative train + eval time, one point per epoch (Fig. 6)."""
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=110)
    for name in sets:
        points = [(h["elapsed_s"], (h["eval"][name]["srcc"] + h["eval"][name]["plcc"]) / 2)
                  for h in history if name in h["eval"]]
        if points:
            ax.plot(*zip(*points), marker="o", ms=3, label=name)
    ax.set(xlabel="cumulative train + eval time (s)", ylabel="(SRCC + PLCC) / 2", title="score vs time")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _pick(mode: str):
    """The better of values by a search's `mode`: max or min."""
    return max if mode == "max" else min


def _best_by(rows: list[dict], key: str, mode: str = "max") -> dict[str, float]:
    """The best value (by `mode`, max or min) each setting of `key` reached over a search's result rows."""
    pick = _pick(mode)
    best: dict[str, float] = {}
    for r in rows:
        if r.get("best") is not None:
            best[r[key]] = pick(best.get(r[key], r["best"]), r["best"])
    return best


# A search row's keys that are not searched settings.
_RESULT_KEYS = ("trial", "epochs", "best", "error")


def _others(rows: list[dict], key: str) -> list[str]:
    """The searched keys besides `key` whose values differ between rows: what a plot of `key` takes the best over."""
    return [k for k in rows[0] if k not in (*_RESULT_KEYS, key) and len({str(r.get(k)) for r in rows}) > 1] \
        if rows else []


def prompt_cells(rows: list[dict], mode: str = "max") -> list[list[str]]:
    """Per prompt option of a search: its best value, the other settings of the trial that reached it, and the mean
    and standard deviation over its trials (repeats or other settings)."""
    others = _others(rows, "model.prompt")
    cells = []
    for prompt, label in (("none", "(1) none"), ("coop", "(2) CoOp"), ("cocoop", "(3) CoCoOp")):
        values = [r for r in rows if r.get("model.prompt") == prompt and r.get("best") is not None]
        if not values:
            continue
        top = _pick(mode)(values, key=lambda r: r["best"])
        scores = np.array([r["best"] for r in values])
        cells.append([label, f"{top['best']:.4f}", ", ".join(f"{k}={top[k]}" for k in others) or "-",
                      f"{scores.mean():.4f} ± {scores.std(ddof=1):.4f} (n={len(scores)})" if len(scores) > 1 else "-"])
    return cells


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    # The canvas grows to hold a title wider than the plot, never cuts it.
    try:
        _savefig(fig, path, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)


def _savefig(fig, path: str | Path, **kwargs) -> None:
    """fig as a PNG at path, whole or not at all. matplotlib warns of each glyph no font has, a line per character
    of every title: they are said once, in one line, with the font that has them."""
    global _missing_said
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_atomic(Path(path), lambda tmp: fig.savefig(tmp, format="png", **kwargs))
    missing = []
    for w in caught:
        if str(w.message).startswith("Glyph ") and "missing from font" in str(w.message):
            missing.append(chr(int(str(w.message).split()[1])))
        else:  # under the caller's filters again
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if missing and not _missing_said:
        _missing_said = True
        warnings.warn(f"no installed font has {''.join(dict.fromkeys(missing))}: plots show boxes in their place; "
                      "install a font with them (CJK: Noto Sans CJK, Debian and Ubuntu's fonts-noto-cjk)", Notice,
                      stacklevel=2)


def prompt_table(rows: list[dict], metric: str, path: str | Path, mode: str = "max", note: str = "") -> Path:
    """The prompt-tuning table (seed Table 5): the best `metric` each prompt option reached over the search, where,
    and its mean and spread over its trials; `note` follows the title (a search still running says how far)."""
    cells = prompt_cells(rows, mode)
    fig, ax = plt.subplots(figsize=(8, 0.6 + 0.4 * len(cells)), dpi=110)
    ax.axis("off")
    table = ax.table(cellText=cells or [["-"] * 4], colLabels=["prompt", f"best {metric}", "best at", "mean ± sd"],
                     loc="center", cellLoc="center")
    table.auto_set_column_width(range(4))
    table.scale(1, 1.4)
    if cells:
        top = _pick(mode)(range(len(cells)), key=lambda i: float(cells[i][1]))
        table[(top + 1, 1)].get_text().set_fontweight("bold")
    ax.set_title("prompt tuning" + (f" ({note})" if note else ""))
    return _save(fig, path)


def layer_lines(rows: list[dict], mode: str = "max") -> dict[str, dict[str, float]]:
    """The best value per layer selection, a set of them per prompt option where the search varied the prompt too
    (keyed by the option, else ""): the lines of the layer study."""
    prompts = sorted({str(r.get("model.prompt")) for r in rows}) if "model.prompt" in _others(rows, "model.layers") \
        else [""]
    return {p: best for p in prompts
            if (best := _best_by([r for r in rows if not p or str(r.get("model.prompt")) == p], "model.layers", mode))}


def layer_study(rows: list[dict], metric: str, path: str | Path, mode: str = "max", note: str = "") -> Path:
    """The best `metric` per layer selection (seed Fig. 8): upto:K and only:K against K, `all` as a line; a line per
    prompt option where the search varied it, and the title names what else it took the best over."""
    lines = layer_lines(rows, mode)
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=110)
    ks = set()
    for (prompt, best), colour in zip(lines.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        for kind, style in (("upto", "o-"), ("only", "s--")):
            points = sorted((int(k.split(":")[1]), v) for k, v in best.items() if k.startswith(kind + ":"))
            ks.update(k for k, _ in points)
            if points:
                ax.plot(*zip(*points), style, ms=4, color=colour, label=f"{kind}:K" + (f", {prompt}" if prompt else ""))
        if "all" in best:
            ax.axhline(best["all"], color=colour, lw=1, ls=":", label="all layers" + (f", {prompt}" if prompt else ""))
    over = [k for k in _others(rows, "model.layers") if k != "model.prompt"]
    said = [*([f"best over {', '.join(over)}"] if over else []), *([note] if note else [])]
    ax.set(xlabel="layer K", ylabel=metric, title="layer study" + (f" ({'; '.join(said)})" if said else ""))
    if 0 < len(ks) <= 12:  # the layers searched; a single K got ticks from 1.9 to 2.1
        ax.set_xticks(sorted(ks))
        ax.set_xlim(min(ks) - 0.5, max(ks) + 0.5)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def layer_sets(lines: dict[str, list[tuple[int, float]]], metric: str, path: str | Path, note: str = "") -> Path:
    """`metric` against layer K, a line per evaluation set (seed Fig. 8: a model per single layer, on six test
    sets); `note` says under the title how the values were taken."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for name, points in lines.items():
        ax.plot(*zip(*sorted(points)), "o-", ms=4, label=name)
    ks = sorted({k for points in lines.values() for k, _ in points})
    ax.set(xlabel="layer K", ylabel=metric, title="per layer and set" + (f"\n{note}" if note else ""))
    if len(ks) <= 12:
        ax.set_xticks(ks)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def results_grid(rows: list[str], columns: list[str], values: list[list[float]], metric: str,
                 path: str | Path, note: str = "") -> Path:
    """Runs against evaluation sets, each cell coloured by its `metric` and printed in it (a missing one grey, marked
    "-"): a cross-dataset table (seed Table 8) read at a glance; `note` says under the title how the values were
    taken."""
    grid = np.array(values, dtype=float)
    # Room for the title, the set names under the grid and the colour bar, which crushed a grid of few runs.
    width = max(4.5, 1.6 + 1.1 * len(columns) + 0.06 * max(map(len, rows)))
    fig, ax = plt.subplots(figsize=(width, 1.7 + 0.45 * len(rows) + 0.2 * bool(note)), dpi=110)
    finite = grid[np.isfinite(grid)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    # A missing cell in grey: white read as a middling value, near the map's own pale middle.
    colours = colormaps[HEATMAP_COLOURS].with_extremes(bad="0.8")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=colours, vmin=lo, vmax=hi if hi > lo else lo + 1e-6,
                      aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
        ax.text(j, i, f"{value:.3f}" if np.isfinite(value) else "-", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    fig.colorbar(image, ax=ax, label=metric)
    ax.set_title(f"{metric} per evaluation set" + (f"\n{note}" if note else ""), fontsize=10)
    return _save(fig, path)
