"""Turning layers into model input and results into layers, on a headless ``ViewerModel`` (no Qt)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from napari.components import ViewerModel
from napari.layers import Image, Labels, Shapes
from napari.utils.colormaps import DirectLabelColormap

from napari_nnseg.errors import NnsegError
from napari_nnseg.layers import (
    box_region,
    class_colormap,
    half_patch,
    model_input,
    result_layer_data,
    scale_looks_unset,
    spatial_transform,
    unique_name,
    visible_region,
)
from napari_nnseg.predictor import PredictionResult

CLASSES = {0: "background", 1: "sphere", 2: "tube"}


def fake_model(patch=(24, 64, 64), spacing=(2.0, 0.8, 0.8), regions=False, transpose=(0, 1, 2)):
    """Just the attributes the layer code reads, so these tests need no weights."""
    labels = SimpleNamespace(has_regions=regions, all_labels=sorted(CLASSES), regions_class_order=(1, 2))
    return SimpleNamespace(dataset_name="Dataset001_Demo", labels=labels, patch_size=patch,
                           config={"spacing": list(spacing)}, transpose_forward=transpose)


def fake_result(shape, *, probabilities=False, uncertainty=False):
    rng = np.random.default_rng(0)
    return PredictionResult(
        labels=rng.integers(0, 3, shape).astype(np.uint8),
        probabilities=rng.random((3, *shape), dtype=np.float32) if probabilities else None,
        uncertainty=rng.random(shape, dtype=np.float32) if uncertainty else None,
        fold_disagreement=rng.random(shape, dtype=np.float32) if uncertainty else None,
        class_names=dict(CLASSES), info={"model_folder": "/m", "folds": [0], "seconds": 1.5, "device": "cpu"})


# ---- inbound -------------------------------------------------------------------------------------------------


def test_single_channel_volume_is_used_without_copy_and_spacing_comes_from_scale():
    layer = Image(np.zeros((4, 5, 6), np.float32), scale=(2.0, 0.8, 0.7))
    image = model_input([layer], 1)
    assert image.data.shape == (1, 4, 5, 6)
    assert np.shares_memory(image.data, layer.data)
    assert image.spacing == (2.0, 0.8, 0.7)
    assert image.spatial_axes == (0, 1, 2) and not image.added_z


def test_one_multichannel_layer_fills_every_input():
    layer = Image(np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5), scale=(1, 3, 0.5, 0.5))
    image = model_input([layer, layer], 2)
    assert image.data.shape == (2, 3, 4, 5)
    assert np.shares_memory(image.data, layer.data)
    assert image.spacing == (3.0, 0.5, 0.5)
    assert image.spatial_axes == (1, 2, 3)


def test_separate_layers_are_stacked_in_channel_order():
    a, b = Image(np.zeros((3, 4, 5))), Image(np.ones((3, 4, 5)))
    image = model_input([a, b], 2)
    assert image.data[0].max() == 0 and image.data[1].min() == 1


def test_two_dimensional_and_rgb_layers_get_a_z_axis_with_the_model_z_spacing():
    flat = model_input([Image(np.zeros((5, 6)), scale=(0.5, 0.5))], 1, target_spacing=(3.0, 0.5, 0.5))
    assert flat.data.shape == (1, 1, 5, 6) and flat.added_z and flat.spacing == (3.0, 0.5, 0.5)
    rgb = Image(np.zeros((5, 6, 3), np.uint8), rgb=True)
    image = model_input([rgb, rgb, rgb], 3)
    assert image.data.shape == (3, 1, 5, 6) and image.spatial_axes == (0, 1)


def test_wrong_channel_count_and_mismatched_shapes_are_named():
    with pytest.raises(NnsegError, match="2 input channel"):
        model_input([Image(np.zeros((3, 4, 5)))], 2)
    with pytest.raises(NnsegError, match="has 3 channels"):
        model_input([Image(np.zeros((3, 4, 5, 6)))], 1)
    with pytest.raises(NnsegError, match="co-registered"):
        model_input([Image(np.zeros((3, 4, 5)), name="a"), Image(np.zeros((3, 4, 6)), name="b")], 2)


def test_unset_scale_is_flagged_only_when_the_model_spacing_is_not_one():
    assert scale_looks_unset((1, 1, 1), (2.0, 0.8, 0.8))
    assert not scale_looks_unset((1, 1, 1), (1, 1, 1))
    assert not scale_looks_unset((2.0, 0.8, 0.8), (2.0, 0.8, 0.8))


def test_half_patch_converts_model_voxels_to_image_voxels():
    model = fake_model(patch=(24, 64, 64), spacing=(2.0, 0.8, 0.8))
    assert half_patch(model, (2.0, 0.8, 0.8)) == pytest.approx((12, 32, 32))
    assert half_patch(model, (1.0, 1.6, 0.4)) == pytest.approx((24, 16, 64))
    model_2d = fake_model(patch=(64, 64), spacing=(0.8, 0.8))
    assert half_patch(model_2d, (5.0, 0.8, 0.8)) == pytest.approx((0, 32, 32))


def test_visible_region_keeps_the_slice_plus_half_a_patch_and_whole_displayed_axes():
    viewer = ViewerModel()
    layer = viewer.add_image(np.zeros((40, 30, 30), np.float32), scale=(2.0, 1.0, 1.0))
    viewer.dims.set_point(0, 40.0)  # world z 40 -> data slice 20
    image = model_input([layer], 1)
    region = visible_region(image, viewer.dims.point, viewer.dims.displayed, (5, 8, 8))
    assert region == (slice(15, 26), slice(0, 30), slice(0, 30))
    viewer.dims.ndisplay = 3
    region = visible_region(image, viewer.dims.point, viewer.dims.displayed, (5, 8, 8))
    assert region == (slice(0, 40), slice(0, 30), slice(0, 30))


def test_box_region_uses_the_drawn_rectangle_and_half_a_patch_on_the_flat_axis():
    viewer = ViewerModel()
    layer = viewer.add_image(np.zeros((40, 30, 30), np.float32), scale=(2.0, 1.0, 1.0), translate=(0, 10, 0))
    viewer.dims.set_point(0, 20.0)  # data slice 10
    shapes = viewer.add_shapes([[[20, 12, 3], [20, 12, 9], [20, 20, 9], [20, 20, 3]]], shape_type="rectangle")
    region = box_region(model_input([layer], 1), shapes, (3, 8, 8), viewer.dims.point)
    assert region == (slice(7, 14), slice(2, 11), slice(3, 10))
    flat = Shapes([[[12, 3], [12, 9], [20, 9], [20, 3]]], shape_type="rectangle")  # a 2-D box over the volume
    region = box_region(model_input([layer], 1), flat, (3, 8, 8), viewer.dims.point)
    assert region[0] == slice(7, 14)
    with pytest.raises(NnsegError, match="holds no shape"):
        box_region(model_input([layer], 1), Shapes(ndim=3), (3, 8, 8), viewer.dims.point)


# ---- outbound ------------------------------------------------------------------------------------------------


def test_spatial_transform_drops_the_channel_axis_of_every_part():
    rotate = np.eye(4)
    rotate[2:, 2:] = [[0, -1], [1, 0]]
    affine = np.eye(5)
    affine[1:4, 4] = [7, 8, 9]
    layer = Image(np.zeros((2, 3, 4, 5)), scale=(1, 2, 3, 4), translate=(0, 1, 2, 3), rotate=rotate,
                  shear=[0, 0, 0, 0.5, 0, 0], affine=affine, units=("pixel", "mm", "mm", "mm"),
                  axis_labels=("c", "z", "y", "x"))
    t = spatial_transform(layer, (1, 2, 3))
    np.testing.assert_allclose(t["scale"], [2, 3, 4])
    np.testing.assert_allclose(t["translate"], [1, 2, 3])
    np.testing.assert_allclose(t["rotate"], rotate[1:, 1:], atol=1e-12)
    np.testing.assert_allclose(t["shear"], [[1, 0.5, 0], [0, 1, 0], [0, 0, 1]], atol=1e-12)
    np.testing.assert_allclose(t["affine"][:3, 3], [7, 8, 9])
    assert t["axis_labels"] == ("z", "y", "x")
    labels = Labels(np.zeros((3, 4, 5), np.uint8), **t)
    corner = (2, 3, 4)
    np.testing.assert_allclose(labels.data_to_world(corner), layer.data_to_world((0, *corner))[1:], atol=1e-9)


def test_unique_name_never_reuses_a_layer_name():
    assert unique_name([], "a") == "a"
    assert unique_name(["a"], "a") == "a [2]"
    assert unique_name(["a", "a [2]", "a [3]"], "a") == "a [4]"


def test_labels_layer_has_class_names_fixed_colours_transform_and_provenance():
    layer = Image(np.zeros((4, 5, 6), np.float32), name="ct", scale=(2, 1, 1), translate=(3, 0, 0))
    image = model_input([layer], 1)
    result = fake_result((4, 5, 6))
    (data, kwargs, kind), = result_layer_data(result, image, fake_model(), existing_names=["ct"])
    assert kind == "labels" and data is result.labels
    assert kwargs["name"] == "ct Dataset001_Demo segmentation"
    labels = Labels(data, **kwargs)
    assert isinstance(labels.colormap, DirectLabelColormap)
    assert list(labels.features["name"]) == ["background", "sphere", "tube"]
    assert list(labels.features["index"]) == [0, 1, 2]
    np.testing.assert_allclose(labels.scale, (2, 1, 1))
    np.testing.assert_allclose(labels.translate, (3, 0, 0))
    meta = labels.metadata["napari_nnseg"]
    assert meta["model_folder"] == "/m" and meta["image"] == "ct" and meta["spacing"] == [2.0, 1.0, 1.0]
    assert class_colormap(CLASSES) == class_colormap({2: "tube", 1: "sphere", 0: "background"})
    np.testing.assert_allclose(labels.colormap.map(1), [0xE6 / 255, 0x9F / 255, 0, 1], atol=1e-6)  # fixed colour
    assert labels.colormap.map(0)[3] == 0  # background transparent


def test_region_results_are_placed_where_the_region_lies():
    layer = Image(np.zeros((10, 8, 8), np.float32), scale=(2, 0.5, 0.5), translate=(1, 1, 1))
    image = model_input([layer], 1)
    region = (slice(3, 7), slice(0, 8), slice(2, 8))
    (data, kwargs, _), = result_layer_data(fake_result((4, 8, 6)), image, fake_model(), region=region,
                                           preview=True)
    np.testing.assert_allclose(kwargs["translate"], (1 + 3 * 2, 1, 1 + 2 * 0.5))
    assert kwargs["name"].endswith("preview")
    assert kwargs["metadata"]["napari_nnseg"]["region"] == [[3, 7], [0, 8], [2, 8]]


def test_optional_layers_follow_the_labels_and_two_dimensional_results_are_squeezed():
    layer = Image(np.zeros((5, 6), np.float32), name="slice")
    image = model_input([layer], 1)
    out = result_layer_data(fake_result((1, 5, 6), probabilities=True, uncertainty=True), image, fake_model())
    names = [kw["name"] for _, kw, _ in out]
    assert names == ["slice Dataset001_Demo segmentation", "slice Dataset001_Demo p(sphere)",
                     "slice Dataset001_Demo p(tube)", "slice Dataset001_Demo uncertainty",
                     "slice Dataset001_Demo fold disagreement"]
    assert all(data.shape == (5, 6) for data, _, _ in out)
    assert [kind for _, _, kind in out] == ["labels", "image", "image", "image", "image"]


def test_segment_adds_a_new_layer_on_a_headless_viewer(tiny_two_fold_model):
    from nnunet_reference import make_image

    from napari_nnseg import segment

    viewer = ViewerModel()
    data = make_image((12, 20, 18), 1, seed=5)[0]
    image = viewer.add_image(data, name="img", scale=(2.0, 0.8, 0.8), translate=(4, 0, 0))
    before = data.copy()
    edited = viewer.add_labels(np.ones((12, 20, 18), np.uint8), name="img Dataset999_Toy segmentation")
    layer = segment(viewer, "img", model=tiny_two_fold_model, folds=0, device="cpu", use_mirroring=False)
    assert layer.name == "img Dataset999_Toy segmentation [2]"
    assert np.all(edited.data == 1)
    assert layer.data.shape == data.shape and layer.data.dtype == np.uint8
    np.testing.assert_allclose(layer.translate, (4, 0, 0))
    assert layer.metadata["napari_nnseg"]["folds"] == [0]
    assert image.data.tobytes() == before.tobytes()
    with pytest.raises(NnsegError, match="No layer named"):
        segment(viewer, "missing", model=tiny_two_fold_model)


def test_nifti_grid_of_the_image_travels_to_the_labels_and_follows_a_region():
    affine = np.array([[-0.8, 0, 0, 10], [0, 0.8, 0, 20], [0, 0, 2.0, 30], [0, 0, 0, 1]])
    layer = Image(np.zeros((10, 8, 6), np.float32), scale=(2, 0.8, 0.8),
                  metadata={"nifti_affine": affine, "nifti_header": "hdr", "nifti_shape": (10, 8, 6), "other": 1})
    image = model_input([layer], 1)
    (_, kwargs, _), = result_layer_data(fake_result((10, 8, 6)), image, fake_model())
    meta = kwargs["metadata"]
    assert meta["nifti_header"] == "hdr" and meta["nifti_shape"] == (10, 8, 6) and "other" not in meta
    np.testing.assert_array_equal(meta["nifti_affine"], affine)
    region = (slice(2, 6), slice(1, 8), slice(3, 6))
    (_, kwargs, _), = result_layer_data(fake_result((4, 7, 3)), image, fake_model(), region=region)
    meta = kwargs["metadata"]
    assert "nifti_header" not in meta and "nifti_shape" not in meta
    np.testing.assert_allclose(meta["nifti_affine"][:3, 3], [10 - 0.8 * 3, 20 + 0.8 * 1, 30 + 2.0 * 2])
    np.testing.assert_array_equal(affine[:3, 3], [10, 20, 30])  # the image's own metadata is untouched


def test_a_loaded_model_is_narrowed_to_fewer_folds_without_reloading(tiny_two_fold_model, monkeypatch):
    import napari_nnseg.model as model_module
    from napari_nnseg.console import resolve_model

    model = model_module.load_model(tiny_two_fold_model)
    monkeypatch.setattr(model_module, "load_model", lambda *a, **k: pytest.fail("checkpoints were re-read"))
    one = resolve_model(model, folds=[1])
    assert one.folds == (1,) and one.fold_weights[0] is model.fold_weights[1]
    assert resolve_model(model) is model and model.folds == (0, 1)
