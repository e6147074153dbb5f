from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import ExifTags, Image, ImageOps

from temu_dist import plots
from temu_dist.config import Notice
from temu_dist.plots import heatmap, layer_lines, layer_study, prompt_cells, prompt_table, scatter, upright


def test_search_plots_are_written(tmp_path):
    rows = [{"model.layers": "all", "model.prompt": "none", "best": 0.8},
            {"model.layers": "upto:2", "model.prompt": "coop", "best": 0.7},
            {"model.layers": "upto:4", "model.prompt": "coop", "best": 0.75},
            {"model.layers": "only:3", "model.prompt": "cocoop", "best": 0.6},
            {"model.layers": "only:1", "model.prompt": "none", "best": None}]
    for draw, name in ((layer_study, "layers.png"), (prompt_table, "prompts.png")):
        path = draw(rows, "test/srcc", tmp_path / name)
        image = Image.open(path)
        assert image.size[0] > 300 and len(set(image.convert("L").getdata())) > 2


def test_a_crossed_search_shows_each_prompt_where_it_peaked_and_its_own_layer_line():
    rows = [{"trial": "t1", "model.prompt": "none", "model.layers": "upto:2", "seed": 0, "best": 0.24},
            {"trial": "t2", "model.prompt": "none", "model.layers": "upto:4", "seed": 0, "best": 0.30},
            {"trial": "t3", "model.prompt": "coop", "model.layers": "upto:2", "seed": 0, "best": 0.11},
            {"trial": "t4", "model.prompt": "coop", "model.layers": "upto:4", "seed": 1, "best": -0.04},
            {"trial": "t5", "model.prompt": "coop", "model.layers": "all", "seed": 1, "best": None}]
    cells = prompt_cells(rows)
    assert [c[:3] for c in cells] == [["(1) none", "0.3000", "model.layers=upto:4, seed=0"],
                                      ["(2) CoOp", "0.1100", "model.layers=upto:2, seed=0"]]
    assert cells[0][3] == "0.2700 ± 0.0424 (n=2)"
    assert [c[1] for c in prompt_cells(rows, "min")] == ["0.2400", "-0.0400"]  # a search with mode: min
    assert layer_lines(rows) == {"coop": {"upto:2": 0.11, "upto:4": -0.04}, "none": {"upto:2": 0.24, "upto:4": 0.30}}
    one_prompt = [r for r in rows if r["model.prompt"] == "none"]
    assert layer_lines(one_prompt) == {"": {"upto:2": 0.24, "upto:4": pytest.approx(0.30)}}


def test_a_title_wider_than_the_plot_is_not_cut(tmp_path):
    import numpy as np

    points = np.linspace(0, 1, 5)
    short = Image.open(scatter(points, points, "test", "ground truth", tmp_path / "short.png"))
    long = Image.open(scatter(points, points, "shards_kadid10k-qalign:test-ldg, epoch 12: SRCC 0.912 PLCC 0.905 "
                              "(n=2015)", "ground truth", tmp_path / "long.png"))
    assert long.size[0] > short.size[0] + 100


def test_scatter_axes_widen_for_targets_a_little_outside_0_1(tmp_path, monkeypatch):
    import numpy as np

    import temu_dist.plots as plots

    limits = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: limits.append((fig.axes[0].get_xlim(),
                                                                         fig.axes[0].get_ylim())))
    plots.scatter(np.array([0.2, 0.5]), np.array([0.3, 0.6]), "t", "ground truth", tmp_path / "in.png")
    plots.scatter(np.array([0.2, 0.5]), np.array([-0.05, 1.03]), "t", "ground truth", tmp_path / "out.png")
    assert limits[0] == ((0.0, 1.0), (0.0, 1.0))
    assert limits[1] == ((-0.05, 1.03), (-0.05, 1.03))


def test_a_stretched_heatmap_colours_a_narrow_map_over_its_own_span(tmp_path):
    import numpy as np

    from temu_dist.plots import heatmap

    grey = Image.new("RGB", (256, 128), (128, 128, 128))
    narrow = np.array([[0.45, 0.55]])  # left patch a little worse than the right one

    def halves(**kw):
        path = heatmap(grey, narrow, 0.5, tmp_path / "h.png", "grey.png", **kw)
        im = np.asarray(Image.open(path).convert("RGB")).astype(int)
        return im[30 + 64, 10], im[30 + 64, 245]  # inside the left and the right patch, below the title

    left, right = halves()
    assert abs(left[0] - right[0]) < 40 and abs(left[1] - right[1]) < 40  # over 0-1: both near the middle
    left, right = halves(stretch=True)
    assert left[0] > left[1] + 40 and right[1] > right[0] + 40  # over 0.45-0.55: red, green
    heatmap(grey, np.full((1, 2), 0.5), 0.5, tmp_path / "flat.png", stretch=True)  # no span: 0-1, not a division by 0


def test_a_large_photos_heatmap_is_coloured_at_the_size_shown_and_an_undecodable_name_is_drawn(tmp_path,
                                                                                                 monkeypatch):
    """A 48 MP photo's map was coloured at full size (4 GB, 16 s) before matplotlib shrank it to 1024 px; a file name
    from a zip in Latin-1 (surrogates in Python) stopped predict with matplotlib's traceback."""
    import os

    import numpy as np

    import temu_dist.plots as plots

    sizes = []
    real = plots.heatmap_overlay
    monkeypatch.setattr(plots, "heatmap_overlay", lambda image, *a, **kw: sizes.append(image.size) or real(image, *a,
                                                                                                           **kw))
    photo = Image.new("RGB", (4000, 3000), (128, 128, 128))
    name = os.fsdecode(b"caf\xe9.jpg")
    path = plots.heatmap(photo, np.array([[0.2, 0.8]]), 0.5, tmp_path / "h.png", name)
    assert sizes == [(1024, 768)]
    assert Image.open(path).size[0] == 1024 + 130  # the image's column and the colour bar's


def test_a_results_grid_of_few_runs_leaves_the_grid_room_beside_its_title_and_labels(tmp_path):
    from temu_dist.plots import results_grid

    path = results_grid(["variant=I [started for 2 epochs]", "variant=S"], ["kadid10k"], [[0.61], [0.55]], "srcc",
                        tmp_path / "grid.png", note="each run at its best epoch by test/srcc")
    # Cropped to what it draws, at 110 dpi: the grid was a sliver under the title (187 px in all), now 297 px.
    assert Image.open(path).size[1] >= 260
    # A run without a set: its cell grey, not white, which read as a middling value.
    import numpy as np

    path = results_grid(["a", "b"], ["x", "y"], [[0.6, float("nan")], [0.5, 0.7]], "srcc", tmp_path / "gaps.png")
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    assert (np.abs(pixels.astype(int) - 204).max(axis=1) <= 2).sum() > 500


def test_a_layer_study_of_one_k_ticks_whole_layers(tmp_path, monkeypatch):
    import temu_dist.plots as plots

    ticks = []
    real = plots._save

    def save(fig, path):
        ax = fig.axes[0]
        lo, hi = ax.get_xlim()
        ticks.extend(t for t in ax.get_xticks() if lo <= t <= hi)
        return real(fig, path)

    monkeypatch.setattr(plots, "_save", save)
    layer_study([{"model.layers": "upto:2", "best": 0.7}], "test/srcc", tmp_path / "one.png")
    assert ticks == [2]


def test_a_plot_whose_write_fails_leaves_the_earlier_one_whole(tmp_path, monkeypatch):
    # MLflow logs the plots of each new best epoch: a kill or a full disk mid-write must not leave a broken PNG.
    import matplotlib.figure
    import numpy as np

    path = tmp_path / "scatter.png"
    scatter(np.array([0.1, 0.5, 0.9]), np.array([0.2, 0.4, 0.8]), "first", "target", path)
    before = path.read_bytes()

    def cut_short(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", cut_short)
    with pytest.raises(OSError, match="No space left"):
        scatter(np.array([0.1, 0.5, 0.9]), np.array([0.9, 0.4, 0.1]), "second", "target", path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["scatter.png"]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_heatmap_is_turned_upright_as_pillow_turns_the_photo_and_its_map_turns_with_it(tmp_path, orientation):
    grid = np.arange(8, dtype=np.float32).reshape(2, 4)

    def cells(g: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        # Each patch's pixels hold its score: the map lines up with the image where each cell's pixels hold its own.
        return np.asarray(Image.fromarray(g * 30, mode="F").resize(size, Image.NEAREST))

    image = Image.fromarray(cells(grid, (80, 40)).astype(np.uint8)).convert("RGB")
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    image.save(tmp_path / "photo.png", exif=exif)
    shown = ImageOps.exif_transpose(Image.open(tmp_path / "photo.png"))
    turned, turned_grid = upright(image, grid, orientation)
    assert np.array_equal(np.asarray(turned), np.asarray(shown))
    assert turned.size == ((40, 80) if orientation >= 5 else (80, 40))
    assert np.array_equal(cells(turned_grid, turned.size), np.asarray(turned)[..., 0])


def test_installed_fonts_with_other_scripts_are_fallen_back_on_and_only_those():
    with matplotlib.rc_context({"font.family": ["sans-serif"]}):
        # DejaVu Sans Mono ships with matplotlib: here it stands for an installed CJK family.
        assert plots.with_cjk_fallback(("No Such Font CJK", "DejaVu Sans Mono")) == ["DejaVu Sans Mono"]
        assert matplotlib.rcParams["font.family"] == ["sans-serif", "DejaVu Sans Mono"]


def test_characters_no_font_has_are_said_once_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(plots, "_missing_said", False)
    image = Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8))
    with matplotlib.rc_context({"font.family": ["DejaVu Sans"]}), pytest.warns(Warning) as said:
        heatmap(image, np.zeros((4, 4)), 0.5, tmp_path / "a.png", "照片.jpg")
        heatmap(image, np.zeros((4, 4)), 0.5, tmp_path / "b.png", "测试.jpg")
    # Before, a line per character of every title: 4 here.
    assert [(w.category, str(w.message)) for w in said] == [
        (Notice, "no installed font has 照片: plots show boxes in their place; install a font with them (CJK: Noto "
                 "Sans CJK, Debian and Ubuntu's fonts-noto-cjk)")]
    assert (tmp_path / "b.png").is_file()
