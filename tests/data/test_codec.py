"""Property tests for the heatmap codec: encode → decode at stride 4."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autopose.data import HeatmapCodec, crop_matrix, transform_points


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny tensors: one thread is fastest, and spares a busy machine thread hand-offs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SIZES = [(64, 48), (96, 128), (128, 96)]  # the default 256×192 is covered by a grid below


@st.composite
def keypoints_inside(draw):
    """A crop size and keypoints at least two heatmap pixels inside the border (see the codec docstring)."""
    height, width = draw(st.sampled_from(SIZES))
    count = draw(st.integers(1, 17))
    stride = 4
    margin = 2
    hx = draw(st.lists(st.floats(margin, width // stride - 1 - margin), min_size=count, max_size=count))
    hy = draw(st.lists(st.floats(margin, height // stride - 1 - margin), min_size=count, max_size=count))
    # heatmap coordinate u sits at input coordinate (u + 0.5)·stride − 0.5
    xy = (np.stack([hx, hy], axis=-1) + 0.5) * stride - 0.5
    return (height, width), xy


@settings(max_examples=100, deadline=None)
@given(case=keypoints_inside())
def test_encode_then_decode_within_one_pixel(case):
    size, xy = case
    codec = HeatmapCodec(input_size=size)
    keypoints = torch.tensor(xy, dtype=torch.float32)[None]
    visibility = torch.full(keypoints.shape[:2], 2.0)
    heatmaps, weight = codec.encode(keypoints, visibility)
    assert heatmaps.shape == (1, xy.shape[0], size[0] // 4, size[1] // 4)
    assert torch.all(weight == 1)
    decoded, scores = codec.decode(heatmaps)
    assert torch.all(scores > 0.5)
    assert (decoded - keypoints).abs().max() <= 1.0


@settings(max_examples=50, deadline=None)
@given(case=keypoints_inside(), cx=st.floats(100, 500), cy=st.floats(100, 500), w=st.floats(50, 400))
def test_decode_to_image_inverts_the_crop(case, cx, cy, w):
    size, xy = case
    codec = HeatmapCodec(input_size=size)
    center = np.array([cx, cy])
    scale = np.array([w, w * size[0] / size[1]])
    image_points = transform_points(
        xy, np.linalg.inv(np.vstack([crop_matrix(center, scale, size), [0, 0, 1]]))[:2]
    )
    heatmaps, _ = codec.encode(torch.tensor(xy, dtype=torch.float32)[None], torch.ones(1, len(xy)))
    decoded, _ = codec.decode_to_image(heatmaps, center[None], scale[None])
    pixels_per_crop_pixel = w / size[1]
    assert np.abs(decoded[0] - image_points).max() <= 1.0 * pixels_per_crop_pixel + 1e-6


def test_default_size_grid_within_one_pixel():
    """256×192: a grid of positions off the heatmap lattice, all decoded at once."""
    codec = HeatmapCodec()
    hx = np.arange(2.0, 48 - 3 + 1e-9, 1.3)
    hy = np.arange(2.0, 64 - 3 + 1e-9, 1.7)
    grid = np.stack(np.meshgrid(hx, hy), axis=-1).reshape(-1, 2)
    keypoints = torch.tensor((grid + 0.5) * 4 - 0.5, dtype=torch.float32)[None]
    heatmaps, weight = codec.encode(keypoints, torch.ones(keypoints.shape[:2]))
    assert torch.all(weight == 1)
    decoded, _ = codec.decode(heatmaps)
    assert (decoded - keypoints).abs().max() <= 1.0


def test_absent_and_outside_keypoints_get_no_target():
    codec = HeatmapCodec(input_size=(64, 48))
    keypoints = torch.tensor([[[10.0, 10.0], [60.0, 10.0], [-3.0, 5.0], [20.0, 30.0]]])
    visibility = torch.tensor([[2.0, 2.0, 1.0, 0.0]])
    heatmaps, weight = codec.encode(keypoints, visibility)
    assert weight.tolist() == [[1.0, 0.0, 0.0, 0.0]]
    assert heatmaps[0, 1:].abs().sum() == 0
    assert heatmaps[0, 0].max() > 0.5


def test_sigma_follows_the_input_size_as_hrnet_trains_it():
    from autopose.data.codec import heatmap_sigma

    assert HeatmapCodec((256, 192)).sigma == 2.0  # HRNet's and SimpleBaseline's 256×192
    assert HeatmapCodec((384, 288)).sigma == 3.0  # and their 384×288
    assert HeatmapCodec((64, 48)).sigma == heatmap_sigma((64, 48)) == 2.0  # never narrower than 2
    assert HeatmapCodec((384, 288), sigma=1.5).sigma == 1.5
    # the target's width in input pixels keeps its size relative to the person
    small, large = HeatmapCodec((256, 192)), HeatmapCodec((384, 288))
    assert small.sigma * small.stride / 256 == pytest.approx(large.sigma * large.stride / 384)
