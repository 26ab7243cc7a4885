"""Tests for oeem_jax.predict.glands: hand-worked polygons, exact raster round trip, GeoJSON validity,
per-gland measurements and the CSV."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage
from skimage.draw import polygon as fill_polygon

from oeem_jax.predict import glands

SQRT_HALF = math.sqrt(0.5)


def ring_mask() -> np.ndarray:
  """A 6 x 6 square (rows 2..7, cols 3..8) with a 2 x 2 hole (rows 4..5, cols 5..6) in 10 x 12."""
  m = np.zeros((10, 12), bool)
  m[2:8, 3:9] = True
  m[4:6, 5:7] = False
  return m


def canonical(ring) -> list[tuple[float, float]]:
  """A closed ring without its closing vertex, rotated to start at its smallest vertex."""
  pts = [tuple(p) for p in ring]
  assert pts[0] == pts[-1], "ring not closed"
  pts = pts[:-1]
  k = pts.index(min(pts))
  return pts[k:] + pts[:k]


def perimeter(ring) -> float:
  r = np.asarray(ring)
  return float(np.hypot(*np.diff(r, axis=0).T).sum())


def rasterise(geometry: dict, shape: tuple[int, int]) -> np.ndarray:
  """Pixels whose centre (c + 0.5, r + 0.5) is inside an exterior ring and outside its holes."""
  polys = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
  out = np.zeros(shape, bool)
  for poly in polys:
    part = np.zeros(shape, bool)
    for k, ring in enumerate(poly):
      r = np.asarray(ring)
      rr, cc = fill_polygon(r[:, 1] - 0.5, r[:, 0] - 0.5, shape)
      part[rr, cc] = k == 0  # exterior fills, holes clear
    out |= part
  return out


def test_square_ring_with_hole_hand_worked():
  m = ring_mask()
  geom = glands.component_geometry(m)
  assert geom["type"] == "Polygon" and len(geom["coordinates"]) == 2
  outer, hole = geom["coordinates"]
  # The 0.5 iso-line runs along the pixel edges (x 3..9, y 2..8 in corner coordinates) and cuts
  # each corner of the square by half a pixel; the hole's ring does the same around x 5..7, y 4..6.
  # Exterior counter-clockwise in a y-up frame (positive shoelace area), hole the other way round.
  assert canonical(outer) == [(3.0, 2.5), (3.5, 2.0), (8.5, 2.0), (9.0, 2.5), (9.0, 7.5), (8.5, 8.0),
                              (3.5, 8.0), (3.0, 7.5)]
  assert canonical(hole) == [(5.0, 4.5), (5.0, 5.5), (5.5, 6.0), (6.5, 6.0), (7.0, 5.5), (7.0, 4.5),
                             (6.5, 4.0), (5.5, 4.0)]
  # Areas: 36 - 4 corners of 1/8 = 35.5 and 4 - 4/8 = 3.5; RFC 7946 winding (exterior > 0, hole < 0).
  assert glands.signed_area(np.asarray(outer)) == 35.5
  assert glands.signed_area(np.asarray(hole)) == -3.5
  assert 35.5 - 3.5 == m.sum() == 32  # the corner cuts cancel between exterior and hole here
  assert perimeter(outer) == pytest.approx(4 * 5 + 4 * SQRT_HALF)
  assert perimeter(hole) == pytest.approx(4 * 1 + 4 * SQRT_HALF)
  np.testing.assert_array_equal(rasterise(geom, m.shape), m)

  labels = glands.label(m)
  (row,) = glands.measure(labels, mpp=0.5)
  assert row["id"] == 1 and row["area_px"] == 32 and row["area_um2"] == 32 * 0.25
  assert (row["bbox_x0"], row["bbox_y0"], row["bbox_x1"], row["bbox_y1"]) == (3, 2, 9, 8)
  # Mean pixel centre: columns 3..8 -> 5.5 (+0.5 = 6.0), rows 2..7 -> 4.5 (+0.5 = 5.0).
  assert (row["centroid_x"], row["centroid_y"]) == (6.0, 5.0)
  assert row["eccentricity"] == pytest.approx(0.0, abs=1e-12)  # symmetric: equal moments
  assert row["solidity"] == pytest.approx(32 / 36)              # convex hull = the full square
  assert row["perimeter_um"] == pytest.approx(row["perimeter_px"] * 0.5)


def test_offsets_shift_the_vertices():
  m = ring_mask()
  a = glands.component_geometry(m)
  b = glands.component_geometry(m, x0=100, y0=7)
  for ra, rb in zip(a["coordinates"], b["coordinates"]):
    np.testing.assert_array_equal(np.asarray(rb), np.asarray(ra) + [100, 7])


def blobs(seed: int, shape=(60, 80)) -> np.ndarray:
  rng = np.random.default_rng(seed)
  m = ndimage.gaussian_filter(rng.normal(size=shape), 2.0) > 0.05
  m[0, :] |= rng.random(shape[1]) > 0.5   # glands touching the image border
  m[10, 10] = m[11, 11] = True            # diagonal contacts (8-connected)
  m[10, 11] = m[11, 10] = False
  m[30:45, 30:45] = True                  # a gland with a hole holding an island
  m[34:41, 34:41] = False
  m[36:39, 36:39] = True
  return m


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_geojson_round_trip_is_exact(seed):
  m = blobs(seed)
  labels = glands.label(m)
  rows = glands.measure(labels, mpp=None)
  fc = glands.feature_collection(labels, rows)
  fc = json.loads(json.dumps(fc))  # what is written is plain JSON
  assert fc["type"] == "FeatureCollection" and len(fc["features"]) == labels.max() == len(rows)
  total = np.zeros(m.shape, bool)
  holes = 0
  for feat, row in zip(fc["features"], rows):
    assert feat["type"] == "Feature"
    geom = feat["geometry"]
    assert geom["type"] == "Polygon"  # one 8-connected gland = one exterior ring
    for k, ring in enumerate(geom["coordinates"]):
      assert len(ring) >= 4 and ring[0] == ring[-1]
      a = glands.signed_area(np.asarray(ring))
      assert (a > 0) if k == 0 else (a < 0), "RFC 7946 winding"
    holes += len(geom["coordinates"]) - 1
    props = feat["properties"]
    assert props["objectType"] == "annotation"
    assert props["classification"] == {"name": "Gland", "color": list(glands.GLAND_COLOUR)}
    meas = {d["name"]: d["value"] for d in props["measurements"]}
    assert meas["Area px^2"] == row["area_px"] and "Area µm^2" not in meas
    part = rasterise(geom, m.shape)
    np.testing.assert_array_equal(part, labels == row["id"])
    assert not (total & part).any()
    total |= part
  np.testing.assert_array_equal(total, m)
  assert holes >= 1  # the ring at 30:45 has a hole (with a separate island gland inside)


def test_multipolygon_for_several_parts_and_islands_in_holes():
  m = np.zeros((20, 30), bool)
  m[2:6, 2:6] = True
  m[10:18, 15:28] = True
  m[12:16, 17:26] = False
  m[13:15, 19:21] = True  # an island inside the hole: its own polygon, not a hole
  geom = glands.component_geometry(m)
  assert geom["type"] == "MultiPolygon" and len(geom["coordinates"]) == 3
  rings = sorted(len(p) for p in geom["coordinates"])
  assert rings == [1, 1, 2]
  np.testing.assert_array_equal(rasterise(geom, m.shape), m)


def test_simplification_reduces_vertices_and_stays_close():
  m = np.zeros((80, 80), bool)
  yy, xx = np.mgrid[:80, :80]
  m[(yy - 40) ** 2 + (xx - 40) ** 2 < 30 ** 2] = True
  exact = glands.component_geometry(m)
  simple = glands.component_geometry(m, simplify_px=1.0)
  n_exact, n_simple = len(exact["coordinates"][0]), len(simple["coordinates"][0])
  assert n_simple < n_exact / 2
  assert abs(rasterise(simple, m.shape) ^ m).sum() < 0.02 * m.sum()


def test_csv_columns_and_units():
  m = ring_mask()
  labels = glands.label(m)
  text = glands.csv_text(glands.measure(labels, mpp=None))
  header, line = text.strip().split("\n")
  assert header.split(",") == list(glands.CSV_FIELDS)
  values = dict(zip(glands.CSV_FIELDS, line.split(",")))
  assert values["area_px"] == "32" and values["area_um2"] == "" and values["perimeter_um"] == ""
  text = glands.csv_text(glands.measure(labels, mpp=2.0))
  values = dict(zip(glands.CSV_FIELDS, text.strip().split("\n")[1].split(",")))
  assert float(values["area_um2"]) == 128.0


def test_empty_crop_is_refused():
  with pytest.raises(ValueError, match="non-empty"):
    glands.component_geometry(np.zeros((3, 3), bool))


def test_split_h_splits_touching_glands_in_rows_and_geojson():
  yy, xx = np.mgrid[:80, :130]
  two = (((yy - 40) ** 2 + (xx - 35) ** 2 <= 400) | ((yy - 40) ** 2 + (xx - 85) ** 2 <= 400)
         | ((np.abs(yy - 40) <= 4) & (xx >= 35) & (xx <= 85)))
  np.testing.assert_array_equal(glands.label(two), glands.label(two, split_h=0))
  assert glands.label(two).max() == 1
  labels = glands.label(two, split_h=4)
  rows = glands.measure(labels, mpp=None)
  assert [r["id"] for r in rows] == [1, 2]
  assert sum(r["area_px"] for r in rows) == int(two.sum())
  assert rows[0]["centroid_x"] < 60 < rows[1]["centroid_x"]
  fc = glands.feature_collection(labels, rows)
  assert len(fc["features"]) == 2
  # The two polygons tile the gland pixels exactly (split glands share a border, no gap).
  parts = [rasterise(f["geometry"], two.shape) for f in fc["features"]]
  assert not (parts[0] & parts[1]).any()
  np.testing.assert_array_equal(parts[0] | parts[1], two)
  with pytest.raises(ValueError, match="split_h"):
    glands.label(two, split_h=-3)
