"""The grid's geometry, colours and pixels, the label words and the relevance marks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cbmir.figures.grid import COLOURS, Cell, GridLayout, _fit, _font, render_grid
from cbmir.figures.images import display_image
from cbmir.figures.labels import NO_LABEL, label_text, names_from_config, relevance
from cbmir.figures.neighbours import QueryResult, neighbour_cells


@pytest.mark.parametrize(("rows", "cols", "title"), [(1, 1, False), (3, 6, True), (8, 11, True)])
def test_grid_size_follows_the_layout(rows, cols, title) -> None:
    layout = GridLayout(tile=40, border=3, pad=5, line_height=11, caption_lines=2, title_height=20)
    cell = Cell(np.zeros((10, 10), np.uint8), ["a", "b"])
    image = render_grid([[cell] * cols] * rows, layout, "title" if title else None)
    width = 5 + cols * (40 + 2 * 3 + 5)
    height = (20 if title else 0) + 5 + rows * (40 + 2 * 3 + 2 * 11 + 5)
    assert image.size == layout.size(rows, cols, title) == (width, height)


def test_borders_mark_the_role_and_tiles_show_the_pixels() -> None:
    layout = GridLayout(tile=56, border=4, pad=6)
    picture = np.zeros((28, 28), np.uint8)
    picture[:14] = 255  # top half white: enlarged 2x by nearest neighbour
    roles = ["query", "hit", "miss", "unknown"]
    image = np.asarray(render_grid([[Cell(picture, ["x"], r) for r in roles]], layout))
    for col, role in enumerate(roles):
        x, y = layout.origin(0, col)
        assert tuple(image[y + 1, x + 1]) == COLOURS[role]  # border corner
        top, bottom = y + layout.border, y + layout.border + layout.tile - 1
        assert tuple(image[top + 27, x + layout.border + 5]) == (255, 255, 255)
        assert tuple(image[top + 28, x + layout.border + 5]) == (0, 0, 0)
        assert tuple(image[bottom, x + layout.border + 5]) == (0, 0, 0)


def test_neighbour_grid_marks_hits_by_the_query_label() -> None:
    database_labels = np.array([[0], [1], [0], [2]])
    result = QueryResult(
        "q", np.full((8, 8), 9, np.uint8), np.array([2, 1, 0]), np.ones(3), np.array([0])
    )
    layout = GridLayout(tile=16)
    cells = neighbour_cells(
        [result], lambda r: np.zeros((8, 8), np.uint8), database_labels, {}, False
    )
    image = np.asarray(render_grid(cells, layout))
    corners = [
        tuple(image[layout.origin(0, c)[1] + 1, layout.origin(0, c)[0] + 1]) for c in range(4)
    ]
    assert corners == [COLOURS["query"], COLOURS["hit"], COLOURS["miss"], COLOURS["hit"]]


def test_long_captions_are_shortened_to_the_cell() -> None:
    font = _font(12)
    text = "actinic keratoses and intraepithelial carcinoma"
    fitted = _fit(text, font, 80)
    assert fitted.endswith("…") and font.getlength(fitted) <= 80
    assert _fit("short", font, 80) == "short"


def test_display_image_shows_volumes_by_their_middle_slice() -> None:
    volume = torch.arange(5).view(5, 1, 1).expand(5, 4, 4).to(torch.uint8)
    assert (display_image(volume, volume=True) == 2).all()
    rgb = np.stack([np.full((3, 3), v, np.uint8) for v in (10, 20, 30)])
    assert display_image(rgb, volume=False).shape == (3, 3, 3)
    assert display_image(rgb, volume=False)[0, 0].tolist() == [10, 20, 30]
    assert display_image(np.ones((1, 5, 6), np.uint8), volume=False).shape == (5, 6)


def test_labels_read_as_words_and_relevance_follows_the_metrics_rule() -> None:
    names = {0: "atelectasis", 1: "cardiomegaly", 2: "effusion"}
    assert label_text(np.array([0, 1, 1]), names, multilabel=True) == "cardiomegaly, effusion"
    assert label_text(np.array([0, 0, 0]), names, multilabel=True) == NO_LABEL
    assert label_text(np.array([2]), names, multilabel=False) == "effusion"
    database = np.array([[1, 0, 0], [0, 0, 0], [0, 1, 1]])
    queries = np.array([[0, 0, 1], [0, 0, 0]])
    hits = relevance(queries, database, np.array([[0, 1, 2], [0, 1, 2]]), multilabel=True)
    assert hits.tolist() == [[False, False, True], [False, True, False]]


def test_label_names_come_from_medmnist_info_or_the_config() -> None:
    assert names_from_config({"flag": "breastmnist"}) == {0: "malignant", 1: "normal, benign"}
    assert names_from_config({"label_names": ["a", "b"]}) == {0: "a", 1: "b"}
    assert names_from_config({}, np.array([[0], [3]])) == {0: "0", 1: "1", 2: "2", 3: "3"}


def test_save_png_writes_grids_and_matplotlib_figures_alike(tmp_path) -> None:
    from matplotlib.figure import Figure
    from PIL import Image

    from cbmir.figures.png import save_png

    grid = render_grid([[Cell(np.full((28, 28), 200, np.uint8), ["a"], "hit")]])
    with Image.open(save_png(grid, tmp_path / "grid.png")) as back:
        assert np.array_equal(np.asarray(back.convert("RGB")), np.asarray(grid))
    figure = Figure(figsize=(2, 1), dpi=50)
    with Image.open(save_png(figure, tmp_path / "figure.png")) as back:
        assert back.size == (100, 50)  # the figure's own dpi
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figure.png", "grid.png"]  # no temps
