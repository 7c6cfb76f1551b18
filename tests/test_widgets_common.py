"""Geometry and error helpers shared by the docks (_widgets/_common.py)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_staindiffuser._widgets import _common as c


@pytest.fixture
def pyramid(make_napari_viewer):
    viewer = make_napari_viewer()
    levels = [np.zeros((1000, 800, 3), np.uint8), np.zeros((500, 400, 3), np.uint8)]
    levels.append(np.zeros((250, 200, 3), np.uint8))
    layer = viewer.add_image(
        levels, multiscale=True, rgb=True, scale=(0.25, 0.25), translate=(10, 20), units="um"
    )
    return viewer, layer


def test_levels_and_pixel_size(pyramid):
    _, layer = pyramid
    assert c.layer_mpp(layer) == 0.25
    assert c.level_downsample(layer, 2) == (4.0, 4.0)
    # the coarsest level not coarser than the model: never upsample for the model
    assert [c.choose_level(layer, m) for m in (0.2, 0.25, 0.5, 0.9, 1.0, 5.0)] == [0, 0, 1, 1, 2, 2]
    assert c.level_box((101, 203, 398, 198), layer, 1) == (50, 101, 200, 100)
    assert c.level_box((900, 700, 500, 500), layer, 2) == (225, 175, 25, 25)  # clipped


def test_outputs_line_up_with_what_napari_draws(pyramid):
    _, layer = pyramid
    kw = c.placed_like(layer, 1, (50, 100, 200, 100))
    assert kw["scale"] == (0.5, 0.5) and kw["translate"] == (10 + 50 * 0.5, 20 + 100 * 0.5)
    assert kw["units"] == ("micrometer", "micrometer") or kw["units"] == ("um", "um")


def test_unknown_pixel_size(make_napari_viewer):
    viewer = make_napari_viewer()
    plain = viewer.add_image(np.zeros((10, 10, 3), np.uint8), rgb=True)
    assert c.layer_mpp(plain) is None and c.choose_level(plain, 0.5) == 0
    read = viewer.add_image(np.zeros((10, 10, 3), np.uint8), rgb=True, metadata={"mpp": 0.4})
    assert c.layer_mpp(read) == 0.4


def test_shape_boxes_and_empty_shapes(pyramid):
    viewer, layer = pyramid
    shapes = viewer.add_shapes(
        [np.array([[20, 30], [60, 70]]), np.array([[900, 900], [950, 950]])],
        shape_type="rectangle",
    )
    assert c.shape_boxes(shapes, layer) == [(40, 40, 160, 160)]  # the second misses the image
    with pytest.raises(ValueError, match="has no shapes"):
        c.shape_boxes(viewer.add_shapes(), layer)


def test_add_or_replace_never_touches_user_layers(pyramid):
    viewer, _ = pyramid
    mine = viewer.add_image(np.ones((4, 4)), name="out")
    a = c.add_or_replace(viewer, np.zeros((4, 4)), "image", "out")
    assert a is not mine and a.name != "out" and mine.data.max() == 1
    b = c.add_or_replace(viewer, np.full((5, 5), 2.0), "image", a.name, translate=(1, 2))
    assert b is a and b.data.shape == (5, 5) and tuple(b.translate) == (1, 2)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (MemoryError(), "Out of memory"),
        (type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory"), "Out of memory"),
        (ValueError("device 'cuda' was asked for but no CUDA GPU is available"), "device"),
        (ValueError("no tissue in the region"), "Pan to tissue"),
        (KeyError("x"), "bug"),
    ],
)
def test_error_messages_say_what_to_do(exc, expected):
    msg = c.error_message(exc, "Virtual staining")
    assert msg.startswith("Virtual staining failed: ") and expected in msg
