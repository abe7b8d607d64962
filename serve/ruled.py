"""The lines of ruled and squared paper, found in a photo of a digit and taken out of it.

A line of the paper reaches both edges of the photo, so the digit's bounding box would be the
whole photo and the digit a speck in it (digits photographed on faint ruled paper: 87 of 200 read
right, against 199 on plain paper). A phone is rarely held square to the page, and a line tilted
by 2 degrees drifts 10 rows across a 280-px photo: it is in no single row. So the image is cut
into strips across, narrow enough for a tilted line to stay within a row or two in each; the
strips are lined up along each tilt up to MAX_TILT and the tilt that lines up the most rows is
kept (as document scanners straighten a page by its projection profile). A line is then a thin
band of rows crossed in most strips, both end strips among them. Each of its pixels is replaced
by a blend of the nearest ones above and below it off the line: paper where the line crossed
paper, ink where a stroke of the digit crossed the line. An image with no line reaching both of
its sides (a drawing, a scan, MNIST) costs a look at its side strips, across and down.
"""

from __future__ import annotations

import numpy as np

LINE_LEVEL = 0.1  # a line is at least this bright (the ink at most 1): fainter ones change nothing
LINE_STRIPS = 16  # strips across the image: in each, a line tilted by MAX_TILT drifts 1-3 rows
STRIP_CROSSED = 1 / 3  # a strip's row that is at least this share tinted: a tilted thin line, in part
LINE_COVER = 0.75  # a line crosses at least this share of the strips, and both end strips
LINE_THICKNESS = 0.03  # and is at most this share of the image thick: a pen's stroke is thicker
# Ruled paper shows two lines or more in a photo of a digit on it; one line alone from edge to
# edge may be the digit's own stroke (a 1 from the top of a tight scan to its bottom).
MIN_LINES = 2
# A photo is taken at most 5 degrees from square to the page. The tilt is searched for by whole
# degrees, then by quarters around the best (16 tilts looked at, not 41): lines half a degree off
# still line up well enough across the strips to tell the nearest whole degree. Ties go to the
# squarer tilt, first in each list.
COARSE_DEGREES = np.array([0, 1, -1, 2, -2, 3, -3, 4, -4, 5, -5], dtype=float)
FINE_DEGREES = np.array([0, 0.25, -0.25, 0.5, -0.5])
MAX_TILT = np.tan(np.radians(COARSE_DEGREES.max() + FINE_DEGREES.max()))  # rows per column


def without_ruled_lines(gray: np.ndarray) -> np.ndarray:
    """``gray`` (white ink at most 1 on a black page) without the lines across and down it, scaled
    back to a brightest ink of 1; ``gray`` itself where it has fewer than MIN_LINES."""
    across, lines_across = _lines_across(gray)
    down, lines_down = _lines_across(gray.T)
    if lines_across + lines_down < MIN_LINES:
        return gray
    if across is not None:
        gray = _bridged(gray, across)
    if down is not None:
        gray = _bridged(gray.T, down).T
    return gray / max(gray.max(), np.finfo(np.float32).tiny)  # a ruled page with nothing on it: all 0


def _lines_across(gray: np.ndarray) -> tuple[np.ndarray | None, int]:
    """Where ``gray``'s lines across (at most MAX_TILT from level) are, [row, column], and how many
    there are; None and 0 where there is none."""
    height, width = gray.shape
    strips = np.linspace(0, width, min(LINE_STRIPS, width) + 1).astype(int)
    if not _reaches_both_sides(gray, strips):
        return None, 0  # a drawing, a scan, MNIST, a digit on plain paper: no line
    crossed = _crossed(gray > LINE_LEVEL, strips)
    margin = int(np.ceil(MAX_TILT * width / 2)) + 1  # a tilted line may be beyond the image at its middle
    tilt, shifts = _tilt(crossed, strips, margin)
    lines, count = _thin_runs(_lines(crossed, shifts, margin), LINE_THICKNESS * height + 2)  # + the rows _lines adds
    if not count:
        return None, 0
    column_shifts = np.rint(tilt * (np.arange(width) + 0.5 - width / 2)).astype(int)
    return lines[np.arange(height)[:, None] - column_shifts + margin], count


def _reaches_both_sides(gray: np.ndarray, strips: np.ndarray) -> bool:
    """Whether the first strip and the last each have a crossed row, as every line crosses one."""
    return all(((gray[:, side] > LINE_LEVEL).mean(axis=1) >= STRIP_CROSSED).any()
               for side in (slice(0, strips[1]), slice(strips[-2], None)))


def _crossed(tinted: np.ndarray, strips: np.ndarray) -> np.ndarray:
    """[strip, row]: whether the row is at least STRIP_CROSSED tinted within the strip."""
    share = np.add.reduceat(tinted, strips[:-1], axis=1, dtype=np.int32) / np.diff(strips)
    return (share >= STRIP_CROSSED).T


def _tilt(crossed: np.ndarray, strips: np.ndarray, margin: int) -> tuple[float, np.ndarray]:
    """The tilt (rows per column) that lines up the most crossed rows across the strips, and each
    strip's shift in rows along it from the middle of the image."""
    degrees = _best_tilt(crossed, strips, margin, COARSE_DEGREES)
    degrees = _best_tilt(crossed, strips, margin, degrees + FINE_DEGREES)
    return float(np.tan(np.radians(degrees))), _shifts(strips, np.tan(np.radians([degrees])))[0]


def _best_tilt(crossed: np.ndarray, strips: np.ndarray, margin: int, degrees: np.ndarray) -> float:
    """Of ``degrees``, the first with the most lined-up rows: the sum of squares of the crossed
    strips per row, which is largest where whole lines fall in single rows."""
    lined_up = _gathered(crossed, _shifts(strips, np.tan(np.radians(degrees))), margin)
    return float(degrees[np.argmax(np.square(lined_up.sum(axis=-2, dtype=np.int32)).sum(axis=-1))])


def _shifts(strips: np.ndarray, tilts: np.ndarray) -> np.ndarray:
    """[tilt, strip]: the rows a line at each tilt moves from the middle of the image to each strip's."""
    return np.rint(np.outer(tilts, (strips[:-1] + strips[1:]) / 2 - strips[-1] / 2)).astype(int)


def _lines(crossed: np.ndarray, shifts: np.ndarray, margin: int) -> np.ndarray:
    """Rows (at the middle of the image, ``margin`` beyond it either way) along which a line runs,
    with a row either side: it crosses LINE_COVER of the strips it passes within the image (at
    least half of them), and the end strips, unless it leaves the image by the top or bottom first."""
    near = crossed.copy()  # a row either side: the tilt's rounding, and a line's pixels stepping down
    near[:, 1:] |= crossed[:, :-1]
    near[:, :-1] |= crossed[:, 1:]
    lined_up = _gathered(near, shifts, margin)
    within = _gathered(np.ones_like(crossed), shifts, margin)
    passes = within.sum(axis=0)
    return ((lined_up.sum(axis=0) >= LINE_COVER * passes) & (passes >= len(shifts) / 2)
            & (lined_up[0] | ~within[0]) & (lined_up[-1] | ~within[-1]))


def _gathered(rows: np.ndarray, shifts: np.ndarray, margin: int) -> np.ndarray:
    """[..., strip, row]: ``rows`` [strip, row] along each row of ``shifts`` [..., strip], from
    ``margin`` rows before the first to ``margin`` after the last (False beyond them)."""
    count = rows.shape[-1]
    padded = np.pad(rows, ((0, 0), (2 * margin, 2 * margin)))
    index = 2 * margin + shifts[..., None] + np.arange(-margin, count + margin)
    return padded[np.arange(rows.shape[0])[:, None], index]


def _thin_runs(rows: np.ndarray, thickest: float) -> tuple[np.ndarray, int]:
    """``rows`` with only the runs of True at most ``thickest`` long (at least 1), each widened by a
    row either side (a line's edges, blurred by the lens and the JPEG, are fainter than it), and
    how many runs those are."""
    edges = np.diff(rows.astype(np.int8), prepend=0, append=0)
    thin = np.zeros_like(rows)
    count = 0
    for start, end in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)):
        if end - start <= max(1.0, thickest):
            thin[max(0, start - 1):end + 1] = True
            count += 1
    return thin, count


def _bridged(gray: np.ndarray, line: np.ndarray) -> np.ndarray:
    """``gray`` with each pixel of ``line`` a linear blend of the nearest pixels above and below it
    in its column that are not (the one there is, at the top or bottom; itself, in a column all line)."""
    height = len(gray)
    rows = np.arange(height, dtype=np.int32)[:, None]
    above = np.maximum.accumulate(np.where(line, -1, rows), axis=0)
    below = np.minimum.accumulate(np.where(line, height, rows)[::-1], axis=0)[::-1]
    ys, xs = np.nonzero(line)
    up, down = above[ys, xs], below[ys, xs]
    up = np.where(up < 0, down, up)  # none above: the one below
    down = np.where(down >= height, up, down)  # none below: the one above
    up, down = np.where(down >= height, ys, up), np.where(down >= height, ys, down)  # neither: itself
    weight = np.clip((ys - up) / np.maximum(down - up, 1), 0, 1).astype(gray.dtype)
    bridged = gray.copy()
    bridged[ys, xs] = (1 - weight) * gray[up, xs] + weight * gray[down, xs]
    return bridged
