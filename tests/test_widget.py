"""The widget in a real napari viewer under Xvfb, opened through the manifest as a user would.

Runs use the session's tiny two-fold model with mirroring off (and often one fold) so the whole file stays
well under two minutes on two CPU cores; the bundled demo model is exercised where the demo itself matters.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from napari.layers import Labels
from napari.utils.colormaps import DirectLabelColormap
from qtpy.QtCore import QTimer

import napari_nnseg
from napari_nnseg import _widget

WIDGET = "nnU-Net segmentation"


@pytest.fixture(scope="module", autouse=True)
def models_before_any_gl_context(tiny_two_fold_model):
    """Build the nnunetv2 test model before the first viewer exists.

    nnunetv2 imports torch._dynamo, which imports triton; loading triton's LLVM after Mesa's llvmpipe has
    created a GL context segfaults the process. The plugin itself never imports triton.
    """
    return tiny_two_fold_model


@pytest.fixture(autouse=True)
def config_dir(tmp_path, monkeypatch):
    """Keep the remembered model folder out of the user's real config directory."""
    monkeypatch.setenv("NAPARI_NNSEG_CONFIG_DIR", str(tmp_path / "config"))
    return tmp_path / "config"


@pytest.fixture
def errors(monkeypatch):
    shown = []
    monkeypatch.setattr(_widget, "show_error", shown.append)
    return shown


def add_image(viewer, name="img", shape=(12, 20, 18)):
    from nnunet_reference import make_image

    data = make_image(shape, 1, seed=5)[0]
    return viewer.add_image(data, name=name, scale=(2.0, 0.8, 0.8), translate=(4.0, -3.0, 1.5), units="mm")


def open_widget(viewer, qtbot, folder=None):
    _, widget = viewer.window.add_plugin_dock_widget("napari-nnseg", WIDGET)
    if folder is not None:
        widget._folder.line_edit.value = str(folder)
    qtbot.waitUntil(lambda: widget.model is not None or widget._summary.value.startswith("Not usable"),
                    timeout=60_000)
    assert widget.model is not None, widget._summary.value
    return widget


def quick_settings(widget, folds=1):
    """Fewest forward passes: one fold (by default) and no mirroring."""
    for box in list(widget._folds)[folds:]:
        box.value = False
    widget._mirroring.value = False
    widget._device.value = "cpu"


def run(widget, qtbot, preview=False):
    (widget._preview if preview else widget._run).native.click()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)


def test_widget_opens_through_the_manifest_and_offers_the_demo_model(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    widget = open_widget(viewer, qtbot)
    assert "bundled demo model" in widget._summary.value
    assert "Dataset001_Demo" in widget._summary.value
    assert [box.text for box in widget._folds] == ["0", "1"]
    assert widget._device.choices[0] == "auto"
    assert widget._run.enabled


def test_model_folder_is_remembered_between_sessions(make_napari_viewer, qtbot, tiny_two_fold_model, config_dir):
    viewer = make_napari_viewer()
    add_image(viewer)
    first = open_widget(viewer, qtbot, tiny_two_fold_model)
    model = first.model
    viewer.add_shapes(name="box")  # napari resets the dock widget's choices: the model must survive that
    assert first.model is model and first._configuration.choices == ("3d_fullres",)
    assert first._region_source.choices[-1] is viewer.layers["box"]
    assert json.loads((config_dir / "widget.json").read_text())["model_folder"] == str(tiny_two_fold_model)
    widget = open_widget(make_napari_viewer(), qtbot)
    assert widget._folder.line_edit.value == str(tiny_two_fold_model)
    assert "Dataset999_Toy" in widget._summary.value


def test_full_run_adds_labels_on_the_image_and_leaves_the_image_alone(make_napari_viewer, qtbot,
                                                                      tiny_two_fold_model, errors):
    viewer = make_napari_viewer()
    image = add_image(viewer)
    before = image.data.tobytes()
    widget = open_widget(viewer, qtbot, tiny_two_fold_model)
    assert widget._spacing.value == "2, 0.8, 0.8" and widget._spacing_warning.value == ""
    quick_settings(widget)
    assert widget._cost.value.startswith("4 tiles × 1 mirrored passes × 1 folds = 4 forward passes")
    widget._uncertainty.value = True
    run(widget, qtbot)
    assert errors == []
    layer = viewer.layers["img Dataset999_Toy segmentation"]
    assert isinstance(layer, Labels)
    assert layer.data.dtype == np.uint8 and layer.data.shape == image.data.shape
    np.testing.assert_allclose(layer.scale, image.scale)
    np.testing.assert_allclose(layer.translate, image.translate)
    assert tuple(layer.units) == tuple(image.units)
    assert list(layer.features["name"]) == ["background", "organ", "tumor"]
    assert isinstance(layer.colormap, DirectLabelColormap)
    assert layer.metadata["napari_nnseg"]["folds"] == [0]
    assert layer.metadata["napari_nnseg"]["use_mirroring"] is False
    assert viewer.layers["img Dataset999_Toy uncertainty"].data.dtype == np.float32
    assert image.data.tobytes() == before
    assert widget._run.text == "Run" and widget._run.enabled


def test_cancel_mid_run_adds_nothing_and_reenables_run(make_napari_viewer, qtbot, tiny_two_fold_model, errors):
    viewer = make_napari_viewer()
    add_image(viewer, shape=(24, 40, 40))
    widget = open_widget(viewer, qtbot, tiny_two_fold_model)  # both folds, mirroring on: many tiles
    ticks = []

    def cancel_on_first_tile(event):
        if event.stage == "predict" and not ticks:
            ticks.append(event)
            widget._run.native.click()  # the Run button is Cancel now

    widget._run.native.click()
    assert widget._run.text == "Cancel" and not widget._preview.enabled
    widget._worker.yielded.connect(cancel_on_first_tile)
    qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)
    assert ticks and ticks[0].n_steps > 10
    assert [layer.name for layer in viewer.layers] == ["img"]
    assert widget._run.text == "Run" and widget._run.enabled and widget._preview.enabled
    assert "cancelled" in widget._status.value and errors == []


def test_bad_spacing_is_refused_before_running(make_napari_viewer, qtbot, tiny_two_fold_model, errors):
    viewer = make_napari_viewer()
    add_image(viewer)
    widget = open_widget(viewer, qtbot, tiny_two_fold_model)
    widget._spacing.value = "0, 0.8, 0.8"
    assert widget._cost.value.startswith("cannot run: spacing '0, 0.8, 0.8' should be three positive numbers")
    widget._run.native.click()
    assert len(errors) == 1 and "three positive numbers" in errors[0]
    assert widget._worker is None and widget._run.enabled and [lay.name for lay in viewer.layers] == ["img"]


def test_an_error_in_the_worker_is_shown_closes_progress_and_reenables_run(make_napari_viewer, qtbot,
                                                                           tiny_two_fold_model, errors, monkeypatch):
    """A RuntimeError (torch's usual error type) raised mid-run would be swallowed by a bare generator worker."""
    from napari.utils import progress

    from napari_nnseg.console import SegmentationJob
    from napari_nnseg.progress import Progress

    def failing_steps(self):
        yield Progress("preprocess", "preprocessing")
        raise RuntimeError("simulated inference failure")

    viewer = make_napari_viewer()
    add_image(viewer)
    widget = open_widget(viewer, qtbot, tiny_two_fold_model)
    monkeypatch.setattr(SegmentationJob, "steps", failing_steps)
    open_bars = len(list(progress._all_instances))
    run(widget, qtbot)
    assert len(errors) == 1 and "simulated inference failure" in errors[0]
    assert len(list(progress._all_instances)) == open_bars
    assert [layer.name for layer in viewer.layers] == ["img"]
    assert widget._run.text == "Run" and widget._run.enabled


def test_running_twice_keeps_the_edited_first_result(make_napari_viewer, qtbot, tiny_two_fold_model):
    viewer = make_napari_viewer()
    add_image(viewer)
    widget = open_widget(viewer, qtbot, tiny_two_fold_model)
    quick_settings(widget)
    run(widget, qtbot)
    first = viewer.layers["img Dataset999_Toy segmentation"]
    first.data[:] = 0
    first.data[0, :4, :4] = 7  # a user's edit
    edited = first.data.copy()
    run(widget, qtbot)
    assert viewer.layers["img Dataset999_Toy segmentation"] is first
    assert np.array_equal(first.data, edited)
    second = viewer.layers["img Dataset999_Toy segmentation [2]"]
    assert second.data.max() > 0


def test_preview_segments_the_visible_slice_as_its_own_layer(make_napari_viewer, qtbot, tiny_two_fold_model):
    viewer = make_napari_viewer()
    image = add_image(viewer, shape=(30, 20, 18))
    widget = open_widget(viewer, qtbot, tiny_two_fold_model)
    quick_settings(widget)
    viewer.dims.set_point(0, image.data_to_world((20, 0, 0))[0])
    run(widget, qtbot, preview=True)
    layer = viewer.layers["img Dataset999_Toy preview"]
    assert layer.data.shape == (17, 20, 18)  # slice 20 +- half of a 16-slice patch (same spacing)
    np.testing.assert_allclose(layer.translate, image.data_to_world((12, 0, 0)))


def test_sample_data_opens_with_its_spacing(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-nnseg", "demo")
    layer = viewer.layers[-1]
    _, spacing = napari_nnseg.demo_sample()
    np.testing.assert_allclose(layer.scale, spacing)


def test_console_segment_adds_the_same_layer_as_the_widget(make_napari_viewer, tiny_two_fold_model):
    viewer = make_napari_viewer()
    image = add_image(viewer)
    layer = napari_nnseg.segment(viewer, "img", model=tiny_two_fold_model, folds=[0], device="cpu",
                                 use_mirroring=False)
    assert layer is viewer.layers[-1] and layer.name == "img Dataset999_Toy segmentation"
    np.testing.assert_allclose(layer.translate, image.translate)
    assert isinstance(layer.colormap, DirectLabelColormap)


def test_viewer_stays_responsive_during_a_demo_run(make_napari_viewer, qtbot):
    """A 10 ms QTimer on the main thread must keep ticking while the demo model runs in the worker."""
    viewer = make_napari_viewer()
    image, spacing = napari_nnseg.demo_sample()
    viewer.add_image(image, name="demo", scale=spacing)
    widget = open_widget(viewer, qtbot)
    quick_settings(widget)
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(10)
    run(widget, qtbot)
    timer.stop()
    gaps = np.diff(ticks)
    print(f"\nmain-thread stall during a demo run: max {gaps.max() * 1000:.0f} ms over {len(ticks)} ticks")
    assert "demo Dataset001_Demo segmentation" in viewer.layers
    assert gaps.max() < 0.5
