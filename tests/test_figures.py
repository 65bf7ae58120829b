"""The figures: drawn for a 4-layer and a 50-layer model and checked from matplotlib's own artists
(tick labels apart, markers inside the axes, init and trained both drawn, legible fonts) and from
the saved files (sane pixel sizes, pages, dpi, Type 42 fonts in PDFs)."""

from __future__ import annotations

import itertools
import re
import struct
from contextlib import contextmanager

import matplotlib
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from hpa.graph import INPUT, ConvGraph, Layer
from hpa.plugins import registries
from hpa.registry import StatisticContext
from hpa.render import style
from hpa.result import ScanResult

CHANNELS, PLANE = 4, 4  # small, so that the cone statistic over 50 layers stays fast


def _graph(depth: int, seed: int, shift: float) -> ConvGraph:
    """``depth`` stacked 3x3 convs (ReLU between) on a 4x4 plane; ``shift`` pushes cosines negative."""
    rng = np.random.default_rng(seed)
    layers, previous = [], INPUT
    for index in range(depth):
        in_channels = 1 if index == 0 else CHANNELS
        weight = rng.normal(0, 1 / np.sqrt(9 * in_channels), (CHANNELS, in_channels, 3, 3))
        weight -= shift * (index % 3) / np.sqrt(9 * in_channels)
        name = f"block{index // 3}.conv{index % 3}"
        layers.append(Layer(name=name, index=index, kind="conv2d", weight=weight, bias=rng.normal(0, 0.1, CHANNELS),
                            stride=(1, 1), padding=((1, 1), (1, 1)), dilation=(1, 1), activation="relu",
                            input_shape=(in_channels, PLANE, PLANE), output_shape=(CHANNELS, PLANE, PLANE),
                            predecessors=(previous,), via={previous: ("relu",)} if index else {}))
        previous = name
    return ConvGraph(layers, source={"spec": f"test:deep{depth}", "model": f"deep{depth}", "weights": "trained",
                                     "input_size": [1, PLANE, PLANE]}, input_shape=(1, PLANE, PLANE))


def _result(depth: int, compared: bool = True) -> ScanResult:
    """A real scan (the registered statistics compute it) of a made-up trained graph against its init."""
    graph, init = _graph(depth, 0, 0.6), _graph(depth, 1, 0.0)
    init.source.update(weights="none", seed=1, role="init")
    stats = [registries()["statistics"].get(name) for name in ("projection", "cones")]
    context = StatisticContext(options={"bins": 40}, init=init if compared else None)
    return ScanResult(graph=graph, statistics={s.name: s.compute(graph, context) for s in stats},
                      options={"bins": 40}, init=init if compared else None,
                      statistic_plugins={s.name: s for s in stats})


@pytest.fixture(scope="module")
def results():
    return {4: _result(4), 50: _result(50)}


@contextmanager
def _capturing():
    """Every figure the renderers save, by file stem (the real save still writes the files)."""
    figures: dict[str, list] = {}
    real_save = style.save

    def keep(figs, stem, fmt):
        figures[stem.name] = list(figs)
        return real_save(figs, stem, fmt)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(style, "save", keep)
        yield figures


@pytest.fixture
def drawn():
    with _capturing() as figures:
        yield figures


@pytest.fixture(scope="module")
def rendered(results, tmp_path_factory):
    """Each model drawn once with the defaults: {depth: (files, {stem: figures})} (drawing is the slow part)."""
    out = {}
    for depth, result in results.items():
        with _capturing() as figures:
            files = result.plot(tmp_path_factory.mktemp(f"deep{depth}"))
        out[depth] = files, figures
    return out


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


def _texts(fig):
    """Every text of ``fig`` that is drawn, with its extent, after a real Agg draw."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    drawn_ticks = set(_tick_labels(fig))
    all_ticks = {label for ax in fig.axes for label in ax.xaxis.get_majorticklabels() + ax.yaxis.get_majorticklabels()}
    found = []
    for text in fig.findobj(matplotlib.text.Text):
        if not (text.get_visible() and text.get_text().strip()):
            continue
        if (text in all_ticks and text not in drawn_ticks) or (text.axes is not None and not text.axes.get_visible()):
            continue
        found.append((text, text.get_window_extent(renderer)))
    return found


def _panels(fig):
    """The figure's visible axes with an axis drawn (not legend strips, not unused grid slots)."""
    return [ax for ax in fig.axes if ax.get_visible() and ax.axison]


def _tick_labels(fig):
    labels = []
    for ax in _panels(fig):
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            span = (high - low) * 1e-6
            for loc, label in zip(axis.get_majorticklocs(), axis.get_majorticklabels()):
                if low - span <= loc <= high + span and label.get_visible() and label.get_text().strip():
                    labels.append(label)  # matplotlib draws only the ticks inside the view
    return labels


# -- each figure, two depths ---------------------------------------------------------------------

@pytest.mark.parametrize("depth", [4, 50])
def test_figures_are_legible_and_complete(rendered, depth):
    files, drawn = rendered[depth]
    stems = {"projection_histograms", "projection_n_l", "cones_states", "cones_distributions"}
    assert set(drawn) == stems
    for stem, figures in drawn.items():
        for fig in figures:
            canvas = FigureCanvasAgg(fig)
            canvas.draw()
            renderer = canvas.get_renderer()
            boxes = [t.get_window_extent(renderer) for t in _tick_labels(fig)]
            for (i, a), (j, b) in itertools.combinations(enumerate(boxes), 2):
                assert not a.overlaps(b), f"{stem}: tick labels {i} and {j} overlap"
            for text, box in _texts(fig):
                assert text.get_fontsize() >= 6, f"{stem}: {text.get_text()!r} at {text.get_fontsize()} pt"
                assert box.x0 >= -1 and box.x1 <= fig.bbox.width + 1, f"{stem}: {text.get_text()!r} cut off"
                assert box.y0 >= -1 and box.y1 <= fig.bbox.height + 1, f"{stem}: {text.get_text()!r} cut off"
            _assert_markers_inside(fig, stem)
    for path in files:
        width, height = _png_size(path)
        assert 300 <= width <= 2400 and 200 <= height <= 2400, (path.name, width, height)
        assert width / height < 3.2, f"{path.name} is a {width}x{height} strip"


def _assert_markers_inside(fig, stem: str) -> None:
    """No marker is cut by its axes: each lies a marker radius inside the axes box."""
    for ax in fig.axes:
        for line in ax.get_lines():
            if line.get_marker() in (None, "None", "", " ") or not line.get_visible():
                continue
            radius = line.get_markersize() * fig.dpi / 72 / 2
            points = ax.transData.transform(np.column_stack(line.get_data()).astype(float))
            points = points[np.isfinite(points).all(axis=1)]
            box = ax.bbox
            assert (points[:, 0] - radius >= box.x0 - 0.5).all() and (points[:, 0] + radius <= box.x1 + 0.5).all(), \
                f"{stem}: a marker is cut by the left or right edge"
            assert (points[:, 1] - radius >= box.y0 - 0.5).all() and (points[:, 1] + radius <= box.y1 + 0.5).all(), \
                f"{stem}: a marker is cut by the top or bottom edge"


def test_large_models_are_paged_with_fixed_panels(rendered):
    files, drawn = rendered[50]
    pages = sorted(p for p in files if p.name.startswith("projection_histograms"))
    assert [p.name for p in pages] == [f"projection_histograms-{k}.png" for k in (1, 2, 3)]  # 20 panels a page
    sizes = {_png_size(p)[0] for p in pages}
    assert len(sizes) == 1  # every page as wide: the panels keep their size
    panel_widths = {round(ax.get_position().width * fig.get_figwidth(), 2)
                    for fig in drawn["projection_histograms"] for ax in _panels(fig)}
    assert max(panel_widths) - min(panel_widths) < 0.05
    assert sum(len(_panels(f)) for f in drawn["projection_histograms"]) == 50


def _colour(artist, key="edgecolor"):
    from matplotlib.colors import to_hex

    value = artist.get_edgecolor() if key == "edgecolor" else artist.get_facecolor()
    return to_hex(value, keep_alpha=False).lower()


def test_init_and_trained_are_both_drawn_when_compared(results, rendered):
    result = results[4]
    _, drawn = rendered[4]
    trained, init = style.TRAINED.lower(), style.INIT.lower()
    (histograms,) = drawn["projection_histograms"]
    panels = _panels(histograms)
    assert len(panels) == 4
    for ax in panels:
        colours = {_colour(p) for p in ax.patches}
        assert {trained, init} <= colours
        assert any(p.get_hatch() for p in ax.patches if _colour(p) == init)  # init hatched: greyscale-safe
        assert "init" in ax.get_title()  # the title gives the init n_l too
    (n_l,) = drawn["projection_n_l"]
    labels = {line.get_label() for line in n_l.axes[-1].get_lines()}
    assert {"trained", "init"} <= labels
    (states,) = drawn["cones_states"]
    bars = [p for p in states.axes[0].patches]
    n_pairs = len(result.statistics["cones"].extra["pairs"])
    assert len([b for b in bars if b.get_hatch()]) == len([b for b in bars if not b.get_hatch()]) == 4 * n_pairs
    legend_hatches = [h.get_hatch() for h in states.legends[0].legend_handles]
    assert any(legend_hatches)  # the legend shows a hatch swatch for init
    (distributions,) = drawn["cones_distributions"]
    titles = [ax.get_title() for ax in distributions.axes]
    assert sum("init" in t for t in titles) == 3 and sum("trained" in t for t in titles) == 3
    for ax in distributions.axes:
        if ax.get_title():  # every panel draws every pair: one heat-map row each
            (image,) = ax.images
            assert image.get_array().shape[0] == n_pairs and np.isfinite(image.get_array()).all(), ax.get_title()


def test_titles_name_model_weights_and_input(rendered):
    _, drawn = rendered[4]
    for stem, figures in drawn.items():
        title = figures[0]._suptitle.get_text()
        assert "deep4" in title and "weights trained" in title and "1×4×4" in title, (stem, title)


def test_histogram_range_is_symmetric_shared_and_from_the_data(results, rendered, drawn, tmp_path):
    result = results[50]
    largest = max(abs(c) for values in result.statistics["projection"].layers.values()
                  for c in values["cosines"] + values["init"]["cosines"] if c is not None)
    pages = rendered[50][1]["projection_histograms"]
    limits = {ax.get_xlim() for fig in pages for ax in _panels(fig)}
    assert len(limits) == 1
    ((low, high),) = limits
    assert low == -high and largest <= high < 2.5 * largest
    result.plot(tmp_path / "fixed", hist_range=0.25, layers="block0.*")
    (fig, *_) = drawn["projection_histograms"]
    assert {ax.get_xlim() for ax in _panels(fig)} == {(-0.25, 0.25)}
    first = result.statistics["projection"].layers["block0.conv0"]
    outside = sum(abs(c) > 0.25 for c in first["cosines"] + first["init"]["cosines"])
    notes = [t.get_text() for t in fig.axes[1].texts]  # axes 0 is the legend strip
    assert outside == 0 or notes == [f"{outside} beyond ±0.25"]  # nothing dropped silently


def test_count_axes_have_integer_ticks(rendered):
    for fig in rendered[4][1]["projection_histograms"]:
        for ax in _panels(fig):
            ticks = [t for t in ax.get_yticks() if ax.get_ylim()[0] <= t <= ax.get_ylim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks)


def test_layers_pattern_chooses_what_is_drawn(results, drawn, tmp_path):
    from hpa.errors import OptionError

    files = results[50].plot(tmp_path, layers="block1.*,block2.conv0")
    (fig,) = drawn["projection_histograms"]
    titles = [ax.get_title().split("\n")[0] for ax in _panels(fig)]
    assert titles == ["block1.conv0", "block1.conv1", "block1.conv2", "block2.conv0"]
    assert "projection_histograms.png" in [p.name for p in files]
    with pytest.raises(OptionError, match="matches no layer"):
        results[50].plot(tmp_path / "none", layers="fc*")
    assert not (tmp_path / "none").exists()


# -- files: dpi, matplotlibrc, formats ----------------------------------------------------------

def test_savefig_dpi_from_rcparams_and_dpi_option(results, tmp_path):
    result = results[4]
    with matplotlib.rc_context({"savefig.dpi": 50}):
        at_50 = _png_size(next(p for p in result.plot(tmp_path / "a") if p.name == "projection_n_l.png"))
    at_100 = _png_size(next(p for p in result.plot(tmp_path / "b", dpi=100) if p.name == "projection_n_l.png"))
    house = _png_size(next(p for p in result.plot(tmp_path / "c") if p.name == "projection_n_l.png"))
    assert abs(at_100[0] - 2 * at_50[0]) <= 2 and abs(at_100[1] - 2 * at_50[1]) <= 2
    assert abs(house[0] - style.HOUSE_DPI / 50 * at_50[0]) <= 4


def test_user_font_size_wins_over_the_house_style(results, drawn, tmp_path):
    with matplotlib.rc_context({"ytick.labelsize": 11}):
        results[4].plot(tmp_path)
    (fig,) = drawn["projection_n_l"]
    assert {t.get_fontsize() for t in fig.axes[-1].get_yticklabels()} == {11}


def test_pdf_embeds_truetype_fonts_and_pages(results, tmp_path):
    files = results[50].plot(tmp_path, format="pdf", layers="block[0-7].*")  # 24 layers: two pages
    pdf = tmp_path / "projection_histograms.pdf"
    assert pdf in files and not list(tmp_path.glob("*.png"))
    data = pdf.read_bytes()
    assert b"/FontFile2" in data and b"/Subtype /Type3" not in data  # TrueType (Type 42) embedded, no Type 3
    assert len(re.findall(rb"/Type /Page\b(?!s)", data)) == 2


def test_svg_format(results, tmp_path):
    files = results[4].plot(tmp_path, format="svg")
    assert files and all(p.suffix == ".svg" and p.read_text().lstrip().startswith("<?xml") for p in files)


def test_bad_figure_options_are_refused(results, tmp_path):
    from hpa.errors import OptionError

    for options in ({"format": "jpg"}, {"dpi": 0}, {"hist_range": 1.5}):
        with pytest.raises(OptionError):
            results[4].plot(tmp_path, **options)


def test_figures_without_init_have_no_init_legend(drawn, tmp_path):
    result = _result(4, compared=False)
    result.plot(tmp_path)
    (fig,) = drawn["projection_histograms"]
    assert not fig.legends and all(not ax.get_legend() for ax in fig.axes)
    assert len(drawn["cones_distributions"][0].axes) == 3 + 1  # one row of panels and the colour bar


# -- hpa plot: figures from result.json alone, through the real command ----------------------------

def test_hpa_plot_redraws_a_scan_folder_in_place(run_hpa, tmp_path):
    from matplotlib.image import imread

    out = tmp_path / "scan"
    scanned = run_hpa("scan", "zoo:digits_cnn", "--out", out)
    assert scanned.returncode == 0, scanned.stderr
    before = {p.name: imread(p) for p in out.glob("*.png")}
    kept = {name: (out / name).read_bytes() for name in ("result.json", "layers.csv")}
    assert {"projection_histograms.png", "projection_n_l.png", "cones_states.png"} <= set(before)
    redrawn = run_hpa("plot", out / "result.json", "--out", out)
    assert redrawn.returncode == 0, redrawn.stderr
    after = {p.name: imread(p) for p in out.glob("*.png")}
    assert after.keys() == before.keys()
    for name in before:  # drawn from the JSON alone, pixel for pixel what the scan drew
        assert np.array_equal(before[name], after[name]), name
    assert {name: (out / name).read_bytes() for name in kept} == kept


@pytest.fixture
def result_json(results, tmp_path):
    path = tmp_path / "saved" / "result.json"
    path.parent.mkdir()
    path.write_text(results[4].to_json())
    return path


def test_hpa_plot_honours_matplotlibrc_dpi_format_and_layers(run_hpa, result_json, tmp_path):
    rc = tmp_path / "rc"
    rc.mkdir()
    (rc / "matplotlibrc").write_text("savefig.dpi: 40\n")
    env = {"MATPLOTLIBRC": str(rc)}
    assert run_hpa("plot", result_json, "--out", tmp_path / "rc40", env=env).returncode == 0
    assert run_hpa("plot", result_json, "--out", tmp_path / "dpi80", "--dpi", "80", env=env).returncode == 0
    at_40 = _png_size(tmp_path / "rc40" / "projection_n_l.png")
    at_80 = _png_size(tmp_path / "dpi80" / "projection_n_l.png")
    assert abs(at_40[0] - style.COLUMN * 40) <= 1 and abs(at_80[0] - 2 * at_40[0]) <= 2
    pdfs = run_hpa("plot", result_json, "--out", tmp_path / "pdf", "--format", "pdf", "--layers", "block0.conv[01]")
    assert pdfs.returncode == 0, pdfs.stderr
    assert sorted(p.suffix for p in (tmp_path / "pdf").iterdir() if not p.name.startswith(".")) == [".pdf"] * 4


def test_hpa_plot_refuses_bad_input_in_one_line_and_writes_nothing(run_hpa, result_json, tmp_path):
    from conftest import assert_bad_input

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert_bad_input(run_hpa("plot", result_json, "--out", foreign), "notes.txt")
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"] and (foreign / "notes.txt").read_text() == "keep me"
    assert_bad_input(run_hpa("plot", result_json, "--out", tmp_path / "new", "--layers", "fc*"), "matches no layer")
    assert not (tmp_path / "new").exists()
    (tmp_path / "broken.json").write_text("{")
    assert_bad_input(run_hpa("plot", tmp_path / "broken.json", "--out", tmp_path / "new"), "not valid JSON")
    assert not (tmp_path / "new").exists()
