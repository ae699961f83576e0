"""Property tests for the crop geometry: the affine map, its inverse, and the pixels it moves."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from autopose.data import box_to_center_scale, crop_matrix, invert_affine, transform_points, warp_image

sizes = st.sampled_from([(64, 48), (128, 96), (256, 192), (96, 96)])
coords = st.floats(-500, 1500, allow_nan=False)
extents = st.floats(5, 800, allow_nan=False)
angles = st.floats(-180, 180, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(cx=coords, cy=coords, w=extents, h=extents, size=sizes, rotation=angles, px=coords, py=coords)
def test_crop_map_and_inverse_round_trip(cx, cy, w, h, size, rotation, px, py):
    matrix = crop_matrix(np.array([cx, cy]), np.array([w, h]), size, rotation)
    point = np.array([[px, py]])
    back = transform_points(transform_points(point, matrix), invert_affine(matrix))
    np.testing.assert_allclose(back, point, atol=1e-6 * max(1.0, abs(px), abs(py)))


@settings(max_examples=100, deadline=None)
@given(x=coords, y=coords, w=extents, h=extents, size=sizes)
def test_the_padded_box_fills_the_crop_edge_to_edge(x, y, w, h, size):
    out_h, out_w = size
    center, scale = box_to_center_scale([x, y, w, h], aspect_ratio=out_w / out_h)
    matrix = crop_matrix(center, scale, size)
    np.testing.assert_allclose(transform_points(center[None], matrix)[0], [(out_w - 1) / 2, (out_h - 1) / 2])
    corners = center + np.array([[-0.5, -0.5], [0.5, 0.5]]) * scale  # pixel edges of the crop's area
    np.testing.assert_allclose(
        transform_points(corners, matrix), [[-0.5, -0.5], [out_w - 0.5, out_h - 0.5]], atol=1e-6 * max(w, h)
    )
    # the unpadded box sits inside, with the 1.25 padding around it
    assert scale[0] >= w * 1.25 - 1e-9 and scale[1] >= h * 1.25 - 1e-9


@settings(max_examples=60, deadline=None)
@given(
    bx=st.floats(20, 140),
    by=st.floats(20, 100),
    zoom=st.floats(0.6, 1.5),
    rotation=angles,
    dx=st.floats(-4, 4),
    dy=st.floats(-4, 4),
)
def test_warped_pixels_land_where_the_map_sends_points(bx, by, zoom, rotation, dx, dy):
    """A blob drawn at p in the image shows up at M·p in the crop (warp_image agrees with crop_matrix).

    The blob (σ = 2 px, 3σ reach) and the offset stay well inside the 64×48 crop, so the crop's
    edge does not cut it and bias the centroid."""
    height, width = 120, 160
    ys, xs = np.mgrid[0:height, 0:width]
    blob = np.exp(-((xs - bx) ** 2 + (ys - by) ** 2) / (2 * 2.0**2))
    image = np.repeat((blob * 255).round().astype(np.uint8)[..., None], 3, axis=2)
    size = (64, 48)
    scale = np.array([48.0, 64.0]) / zoom
    matrix = crop_matrix(np.array([bx + dx, by + dy]), scale, size, rotation)
    expected = transform_points(np.array([[bx, by]]), matrix)[0]
    crop = warp_image(image, matrix, size)[..., 0].astype(np.float64)
    cys, cxs = np.mgrid[0 : size[0], 0 : size[1]]
    weights = crop / crop.sum()
    centroid = np.array([(weights * cxs).sum(), (weights * cys).sum()])
    np.testing.assert_allclose(centroid, expected, atol=0.35)
