"""Glands of a predicted mask: per-gland measurements (CSV) and QuPath-compatible GeoJSON.

Glands are the 8-connected components of the binary mask (`oeem_jax.evaluation.metrics.label_instances`, as
the GlaS object metrics count them), or with `split_h` > 0 those components with touching glands
split (`oeem_jax.evaluation.metrics.split_instances`); holes are the 4-connected non-gland components they
enclose.

Coordinates (CSV and GeoJSON alike): full-resolution pixels of the input image, origin at the
top-left *corner* of the top-left pixel, x to the right, y down; pixel (row r, column c) covers
[c, c + 1) x [r, r + 1), so its centre is (c + 0.5, r + 0.5). This is QuPath's convention.

Polygons (`component_geometry`) are the iso-line at 0.5 of the component's mask
(`skimage.measure.find_contours` with `fully_connected="high"`, matching 8-connected glands and
4-connected holes): vertices sit at the midpoints of pixel edges and cut the pixel corners
diagonally, so no pixel centre lies on a boundary and filling the polygons (every pixel whose centre
is inside the exterior ring and outside the holes, e.g. `skimage.draw.polygon`) reproduces the mask
exactly. The polygon's own area is the pixel count minus 1/8 px² per convex corner plus 1/8 px² per
concave one (a 6 x 6 square: 35.5 px²); the measurements report the pixel count
(`skimage.measure.regionprops`). Collinear vertices (within `EXACT_TOLERANCE` px) are dropped;
`simplify_px` > 0 simplifies further (Douglas-Peucker, `skimage.measure.approximate_polygon`), which
breaks the exact round trip. Rings are closed and wound as RFC 7946 asks of the numbers: exterior
rings with positive shoelace area in (x, y), holes negative.
"""

from __future__ import annotations

import csv
import io
from typing import Any, Sequence

import numpy as np

from oeem_jax.evaluation import metrics

EXACT_TOLERANCE = 1e-3
GLAND_CLASS = "Gland"
GLAND_COLOUR = (0, 200, 0)
CSV_FIELDS = ("id", "area_px", "area_um2", "perimeter_px", "perimeter_um", "centroid_x",
              "centroid_y", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1", "eccentricity", "solidity")


def signed_area(ring: np.ndarray) -> float:
  """Shoelace area of a closed or open ring of (x, y) vertices (float[N, 2]); positive when the
  vertices run counter-clockwise in a y-up frame."""
  x, y = ring[:, 0], ring[:, 1]
  return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _ring(contour_rc: np.ndarray, offset_x: float, offset_y: float, simplify_px: float) -> np.ndarray:
  """find_contours (row, col) of a padded crop -> closed (x, y) ring in image corner coordinates."""
  from skimage.measure import approximate_polygon

  rc = approximate_polygon(contour_rc, tolerance=max(float(simplify_px), EXACT_TOLERANCE))
  xy = np.stack([rc[:, 1] + offset_x, rc[:, 0] + offset_y], axis=1)
  if not np.array_equal(xy[0], xy[-1]):
    xy = np.concatenate([xy, xy[:1]])
  return xy


def component_geometry(crop: np.ndarray, x0: int = 0, y0: int = 0, simplify_px: float = 0.0
                       ) -> dict[str, Any]:
  """GeoJSON geometry of the foreground of a binary crop (module docstring).

  Args:
    crop: bool[h, w]; True = inside (one gland, or any set of pixels).
    x0, y0: image column and row of the crop's top-left pixel (px).
    simplify_px: Douglas-Peucker tolerance in px (0 = exact: only collinear vertices dropped).

  Returns:
    {"type": "Polygon", "coordinates": [exterior, hole, ...]} when the foreground has one
    8-connected part, else {"type": "MultiPolygon", "coordinates": [[exterior, holes...], ...]};
    rings are lists of [x, y] (floats, multiples of 0.5 when exact), closed.

  Raises:
    ValueError: empty crop or not 2-D.
  """
  from skimage.measure import find_contours, points_in_poly

  crop = np.asarray(crop, bool)
  if crop.ndim != 2 or not crop.any():
    raise ValueError(f"component_geometry: expected a non-empty 2-D mask, got shape {crop.shape}")
  padded = np.pad(crop, 1).astype(np.float32)
  # Padded (row, col) -> image corner coordinates: x = col - 1 + x0 + 0.5.
  rings = [_ring(c, x0 - 0.5, y0 - 0.5, simplify_px)
           for c in find_contours(padded, 0.5, fully_connected="high")]
  rings = [r for r in rings if len(r) >= 4]
  areas = [signed_area(r) for r in rings]
  # With find_contours' default positive_orientation="low", and (row, col) swapped to (x, y),
  # rings around foreground come out with a positive shoelace area and rings around enclosed
  # background (holes) with a negative one: already the RFC 7946 winding.
  exteriors = [r for r, a in zip(rings, areas) if a > 0]
  holes = [r for r, a in zip(rings, areas) if a < 0]
  exteriors.sort(key=lambda r: -abs(signed_area(r)))
  polygons: list[list[np.ndarray]] = [[e] for e in exteriors]
  for h in holes:
    # A hole belongs to the smallest exterior that contains it (its first vertex is strictly inside).
    for poly in sorted(polygons, key=lambda p: abs(signed_area(p[0]))):
      if points_in_poly(h[:1], poly[0])[0]:
        poly.append(h)
        break
  as_list = [[r.tolist() for r in poly] for poly in polygons]
  if len(as_list) == 1:
    return {"type": "Polygon", "coordinates": as_list[0]}
  return {"type": "MultiPolygon", "coordinates": as_list}


def measure(labels: np.ndarray, mpp: float | None) -> list[dict[str, Any]]:
  """One row per gland (`skimage.measure.regionprops`).

  Args:
    labels: int[H, W] gland ids 1..K (0 = background), e.g. `metrics.label_instances(mask)`.
    mpp: µm per pixel, or None (the µm columns are then None).

  Returns:
    list of dicts with `CSV_FIELDS`: id (the label), area_px (pixel count), area_um2, perimeter_px
    (skimage's 4-connected boundary length estimate), perimeter_um, centroid_x/_y (px, corner
    convention: mean pixel centre), bbox_x0/_y0 (first column/row) and bbox_x1/_y1 (one past the
    last), eccentricity (of the ellipse with the same second moments, 0 = circle), solidity (area /
    convex hull area).
  """
  from skimage.measure import regionprops

  rows = []
  for p in regionprops(labels):
    r0, c0, r1, c1 = p.bbox
    cy, cx = p.centroid
    area, perim = float(p.area), float(p.perimeter)
    rows.append({
        "id": int(p.label), "area_px": int(area),
        "area_um2": None if mpp is None else area * mpp * mpp,
        "perimeter_px": perim, "perimeter_um": None if mpp is None else perim * mpp,
        "centroid_x": cx + 0.5, "centroid_y": cy + 0.5,
        "bbox_x0": int(c0), "bbox_y0": int(r0), "bbox_x1": int(c1), "bbox_y1": int(r1),
        "eccentricity": float(p.eccentricity), "solidity": float(p.solidity),
    })
  return rows


def _measurements(row: dict[str, Any]) -> list[dict[str, Any]]:
  """QuPath measurement list ([{"name", "value"}], read by QuPath 0.2 and later)."""
  items = [("Area px^2", row["area_px"]), ("Perimeter px", row["perimeter_px"])]
  if row["area_um2"] is not None:
    items += [("Area µm^2", row["area_um2"]), ("Perimeter µm", row["perimeter_um"])]
  items += [("Eccentricity", row["eccentricity"]), ("Solidity", row["solidity"])]
  return [{"name": n, "value": float(v)} for n, v in items]


def feature_collection(labels: np.ndarray, rows: Sequence[dict[str, Any]], *,
                       simplify_px: float = 0.0, colour: Sequence[int] = GLAND_COLOUR,
                       properties: dict[str, Any] | None = None) -> dict[str, Any]:
  """A GeoJSON FeatureCollection with one QuPath annotation per gland.

  Args:
    labels: int[H, W] gland ids (as given to `measure`).
    rows: `measure(labels, mpp)`.
    simplify_px: polygon simplification (`component_geometry`).
    colour: [r, g, b] of the "Gland" class in QuPath.
    properties: extra members of the collection (foreign members; QuPath ignores them).

  Returns:
    {"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": Polygon |
    MultiPolygon, "properties": {"objectType": "annotation", "name": "Gland <id>",
    "classification": {"name": "Gland", "color": [r, g, b]}, "isLocked": false,
    "measurements": [{"name", "value"}, ...]}}, ...]}.
  """
  from scipy import ndimage

  slices = ndimage.find_objects(labels)
  features = []
  for row in rows:
    sl = slices[row["id"] - 1]
    crop = labels[sl] == row["id"]
    geom = component_geometry(crop, x0=sl[1].start, y0=sl[0].start, simplify_px=simplify_px)
    features.append({
        "type": "Feature",
        "geometry": geom,
        "properties": {
            "objectType": "annotation",
            "name": f"{GLAND_CLASS} {row['id']}",
            "classification": {"name": GLAND_CLASS, "color": [int(c) for c in colour]},
            "isLocked": False,
            "measurements": _measurements(row),
        },
    })
  out: dict[str, Any] = {"type": "FeatureCollection", "features": features}
  if properties:
    out["properties"] = properties
  return out


def csv_text(rows: Sequence[dict[str, Any]]) -> str:
  """The per-gland CSV (header `CSV_FIELDS`; µm columns empty when the pixel size is unknown)."""
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
  w.writeheader()
  for r in rows:
    w.writerow({k: ("" if r[k] is None else (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]))
                for k in CSV_FIELDS})
  return buf.getvalue()


def label(mask: np.ndarray, split_h: int = 0) -> np.ndarray:
  """Gland ids of a binary mask: int32[H, W], 0 = background, 1..K.

  split_h = 0: the 8-connected components (`metrics.label_instances`); > 0: touching glands split
  by a distance-transform watershed with h-maxima of height `split_h` pixels
  (`metrics.split_instances`; split glands share a border). Raises ValueError for a bad `split_h`.
  """
  return metrics.split_instances(mask, metrics.check_split_h(split_h, "glands.label: split_h"))
