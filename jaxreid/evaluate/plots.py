"""Pictures of evaluation results: ranked-list grids (PIL) and CMC curves (matplotlib).

PIL and matplotlib are imported inside the functions. The CMC plot uses the
Agg canvas directly (no pyplot), so it never touches the global backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from jaxreid.evaluate.metrics import ranked_gallery

# Grid geometry in pixels; public so that tests (and callers cropping the grid)
# can find a given cell.
CELL_WIDTH = 64
CELL_HEIGHT = 128
BORDER = 4
GAP = 6
QUERY_GAP = 18  # extra space separating the query column from its ranked list
CAPTION_HEIGHT = 14

BACKGROUND = (255, 255, 255)
QUERY_COLOUR = (40, 90, 200)
MATCH_COLOUR = (0, 170, 0)
MISMATCH_COLOUR = (220, 0, 0)
UNKNOWN_COLOUR = (150, 150, 150)  # search results: identities unknown


def cell_origin(row: int, column: int) -> tuple[int, int]:
    """Top-left (x, y) of the bordered cell; column 0 is the query, k the rank-k image."""
    outer_w, outer_h = CELL_WIDTH + 2 * BORDER, CELL_HEIGHT + 2 * BORDER
    x = GAP + column * (outer_w + GAP) + (QUERY_GAP if column > 0 else 0)
    y = GAP + row * (outer_h + CAPTION_HEIGHT + GAP)
    return x, y


def grid_size(num_rows: int, top_k: int) -> tuple[int, int]:
    """(width, height) of a grid with `num_rows` queries and `top_k` ranks."""
    x, _ = cell_origin(0, top_k)
    _, y = cell_origin(num_rows, 0)
    return x + CELL_WIDTH + 2 * BORDER + GAP, y


def ranked_list_grid(
    distmat: np.ndarray,
    query_paths: Sequence[str],
    gallery_paths: Sequence[str],
    query_pids: np.ndarray | None,
    gallery_pids: np.ndarray | None,
    query_cams: np.ndarray | None,
    gallery_cams: np.ndarray | None,
    query_indices: Sequence[int],
    out_path: str,
    top_k: int = 10,
) -> str:
    """Writes a PNG: one row per query, the query then its top-k gallery images.

    The ranked list follows the evaluation protocol (same pid and camera
    removed, stable ranking). Gallery images get a green border when their pid
    is the query's and a red one otherwise; the query has a blue border.
    Captions give pid/camera (and the rank). Without identities (pids and
    cameras None: a search) the list is the plain stable ranking, borders
    grey, captions the rank and distance. Returns `out_path`.
    """
    from PIL import Image, ImageDraw

    def load(path: str) -> Image.Image:
        with Image.open(path) as image:
            return image.convert("RGB").resize((CELL_WIDTH, CELL_HEIGHT), Image.BILINEAR)

    distmat = np.asarray(distmat)
    known = query_pids is not None
    if known:
        query_pids, gallery_pids = np.asarray(query_pids), np.asarray(gallery_pids)
        query_cams, gallery_cams = np.asarray(query_cams), np.asarray(gallery_cams)
    canvas = Image.new("RGB", grid_size(len(query_indices), top_k), BACKGROUND)
    draw = ImageDraw.Draw(canvas)

    def put(row: int, column: int, path: str, colour: tuple[int, int, int], text: str):
        x, y = cell_origin(row, column)
        outer_w, outer_h = CELL_WIDTH + 2 * BORDER, CELL_HEIGHT + 2 * BORDER
        draw.rectangle([x, y, x + outer_w - 1, y + outer_h - 1], fill=colour)
        canvas.paste(load(path), (x + BORDER, y + BORDER))
        draw.text((x + 1, y + outer_h + 1), text, fill=(0, 0, 0))

    for row, q in enumerate(query_indices):
        q = int(q)
        if not known:
            put(row, 0, query_paths[q], QUERY_COLOUR, "query")
            ranked = np.argsort(distmat[q], kind="stable")
            for rank, g in enumerate(ranked[:top_k], start=1):
                caption = f"{rank}: {distmat[q, g]:.3f}"
                put(row, rank, gallery_paths[g], UNKNOWN_COLOUR, caption)
            continue
        put(row, 0, query_paths[q], QUERY_COLOUR, f"q {query_pids[q]} c{query_cams[q]}")
        ranked = ranked_gallery(
            distmat[q], query_pids[q], query_cams[q], gallery_pids, gallery_cams
        )
        for rank, g in enumerate(ranked[:top_k], start=1):
            colour = MATCH_COLOUR if gallery_pids[g] == query_pids[q] else MISMATCH_COLOUR
            caption = f"{rank}: {gallery_pids[g]} c{gallery_cams[g]}"
            put(row, rank, gallery_paths[g], colour, caption)
    canvas.save(out_path, format="PNG")
    return out_path


def cmc_curve_plot(
    cmc_by_name: Mapping[str, np.ndarray],
    out_path: str,
    *,
    title: str = "CMC",
    size_inches: tuple[float, float] = (5.0, 4.0),
    dpi: int = 100,
) -> str:
    """Writes a PNG of CMC curves (rank 1..len, accuracy in %), one per name."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size_inches, dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, cmc in cmc_by_name.items():
        cmc = np.asarray(cmc, dtype=np.float64)
        ranks = np.arange(1, len(cmc) + 1)
        axes.plot(ranks, 100 * cmc, marker="o", markersize=3, label=name)
    axes.set_xlabel("rank")
    axes.set_ylabel("matching rate (%)")
    axes.set_title(title)
    axes.set_ylim(0, 100)
    axes.grid(True, alpha=0.3)
    if cmc_by_name:
        axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(out_path, format="png", dpi=dpi)
    return out_path
