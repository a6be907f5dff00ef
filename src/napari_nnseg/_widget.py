"""The napari dock widget: choose a trained nnU-Net model and image layers, see the cost, run or preview.

It is a thin adapter: model folders are read by ``model_folder``/``model``, inputs and result layers are built
by ``layers``, and a run is the same ``SegmentationJob`` that :func:`napari_nnseg.segment` runs, here driven
by a napari generator worker so the viewer stays responsive and Cancel stops between tiles. torch is imported
only inside workers and functions, never when napari lists the plugin.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, FloatSpinBox, Label, LineEdit, PushButton
from napari.layers import Image, Shapes
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_warning

from .console import SegmentationJob
from .errors import NnsegError
from .layers import box_region, half_patch, model_input, scale_looks_unset, visible_region
from .model_folder import detect_folds, find_results_folder, list_configurations

_TIPS = {
    "folder": "An nnU-Net v2 results folder (or the dataset folder above it, or an exported zip). "
              "Leave empty to use the bundled demo model.",
    "spacing": "Voxel spacing in the image's axis order; taken from the layer's scale. Wrong spacing means "
               "wrong results: nnU-Net resamples to the spacing it was trained at.",
    "step": "Sliding-window step as a fraction of the patch. nnU-Net uses 0.5; larger is faster, less overlap.",
    "mirroring": "Average predictions over mirrored copies (nnU-Net's default): up to 8x slower on 3D.",
    "on_device": "Keep the sliding-window buffers on the GPU (falls back to CPU memory when it runs out).",
    "uncertainty": "Add the ensemble's normalised entropy and the share of folds that disagree, as image layers.",
    "preview": "Segment only the displayed slice (plus half a patch around it) or the box in a Shapes layer.",
}


def _settings_file() -> Path:
    base = os.environ.get("NAPARI_NNSEG_CONFIG_DIR")
    if not base:
        from platformdirs import user_config_dir

        base = user_config_dir("napari-nnseg")
    return Path(base) / "widget.json"


def _load_settings() -> dict:
    try:
        return json.loads(_settings_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _save_settings(settings: dict) -> None:
    try:
        path = _settings_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings), encoding="utf-8")
    except OSError:
        pass  # remembering the folder is a convenience; a read-only home must not break the widget


@dataclass
class _Failure:
    """A generator worker swallows RuntimeErrors (DESIGN.md), so failures travel as a return value."""

    error: BaseException


def _guarded(steps):
    try:
        return (yield from steps())
    except Exception as exc:  # noqa: BLE001 - every failure must reach the user and re-enable Run
        return _Failure(exc)


def _load(results_folder: Path, checkpoint: str):
    """Runs in a worker: the checkpoints, the device probe (imports torch) and a warm-up of napari's Labels.

    napari's first Labels layer imports pandas and builds colour tables (~0.5 s); doing that here keeps it
    from freezing the viewer when the first result is added.
    """
    try:
        import numpy as np
        from napari.layers import Labels

        from .devices import available_devices
        from .model import load_model

        loaded = load_model(results_folder, checkpoint=checkpoint), available_devices()
        Labels(np.zeros((1, 1), np.uint8), features={"index": [0], "name": ["background"]})
        return loaded
    except Exception as exc:  # noqa: BLE001
        return _Failure(exc)


class NnsegWidget(Container):
    """Model, inputs, options, cost and Run/Cancel for one viewer."""

    def __init__(self, napari_viewer):
        super().__init__(scrollable=False)
        self._viewer = napari_viewer
        self.model = None
        self._worker = self._pbar = None
        self._load_token, self._loading = 0, False
        self._folder = FileEdit(mode="d", label="model folder", value=_load_settings().get("model_folder", ""),
                                tooltip=_TIPS["folder"])
        self._demo = PushButton(text="Use the bundled demo model")
        self._summary = Label(label="model")
        self._configuration = ComboBox(label="configuration")
        self._checkpoint = ComboBox(label="checkpoint")
        self._folds = Container(layout="horizontal", label="folds", labels=False)
        self._inputs = Container(label="inputs")
        self._spacing = LineEdit(label="spacing (z, y, x)", tooltip=_TIPS["spacing"])
        self._spacing_warning = Label()
        self._device = ComboBox(label="device", choices=["auto", "cpu"])
        self._step = FloatSpinBox(label="step size", value=0.5, min=0.05, max=1.0, step=0.05,
                                  tooltip=_TIPS["step"])
        self._mirroring = CheckBox(text="mirroring", value=True, tooltip=_TIPS["mirroring"])
        self._on_device = CheckBox(text="keep results on GPU", value=True, tooltip=_TIPS["on_device"])
        self._probabilities = CheckBox(text="probabilities")
        self._uncertainty = CheckBox(text="uncertainty", tooltip=_TIPS["uncertainty"])
        self._cost = Label(label="cost")
        self._region_source = ComboBox(choices=self._region_choices, tooltip=_TIPS["preview"])
        self._preview = PushButton(text="Preview")
        self._run = PushButton(text="Run")
        self._status = Label()
        row = {"layout": "horizontal", "labels": False}
        self.extend([self._folder, self._demo, self._summary, self._configuration, self._checkpoint, self._folds,
                     self._inputs, self._spacing, self._spacing_warning, self._device, self._step,
                     Container(widgets=[self._mirroring, self._on_device], label="options", **row),
                     Container(widgets=[self._probabilities, self._uncertainty], label="outputs", **row),
                     self._cost, Container(widgets=[self._region_source, self._preview], label="preview", **row),
                     self._run, self._status])
        for text in (self._summary, self._spacing_warning, self._cost, self._status):
            text.native.setWordWrap(True)  # long paths and messages must not widen the dock
        self._folder.changed.connect(self._folder_changed)
        self._demo.clicked.connect(lambda: setattr(self._folder.line_edit, "value", ""))
        self._configuration.changed.connect(self._configuration_changed)
        self._checkpoint.changed.connect(self._checkpoint_changed)
        for w in (self._spacing, self._step, self._mirroring):
            w.changed.connect(self._update_cost)
        self._run.clicked.connect(lambda: self._start(preview=False))
        self._preview.clicked.connect(lambda: self._start(preview=True))
        self._viewer.layers.events.inserted.connect(self.reset_choices)
        self._viewer.layers.events.removed.connect(self.reset_choices)
        self._folder_changed()

    def reset_choices(self, *_) -> None:
        """Refresh only the layer dropdowns (napari calls this whenever layers are added or removed).

        The model dropdowns hold lists set in code; magicgui's reset would put back their initial choices.
        """
        self._inputs.reset_choices()
        self._region_source.reset_choices()

    # ---- model ---------------------------------------------------------------------------------------------
    def _model_path(self) -> Path:
        text = self._folder.line_edit.value.strip()
        if text:
            return Path(text)
        from .demo import demo_model_path

        return demo_model_path()

    def _set_choices(self, combo: ComboBox, choices: list[str], preferred: str | None = None) -> None:
        with combo.changed.blocked():
            combo.choices = choices
            if preferred in choices:
                combo.value = preferred

    def _folder_changed(self) -> None:
        self._model_changed(folder=True)

    def _configuration_changed(self) -> None:
        self._model_changed(configuration=True)

    def _checkpoint_changed(self) -> None:
        self._model_changed()

    def _model_changed(self, folder: bool = False, configuration: bool = False) -> None:
        """Re-read the folder cheaply (no torch) on the main thread; load the weights in a worker."""
        self.model, self._load_token = None, self._load_token + 1
        if self._worker is None:  # a running job keeps its model, and Cancel must stay clickable
            self._run.enabled = self._preview.enabled = False
        try:
            if folder:
                self._set_choices(self._configuration, list_configurations(self._model_path()), "3d_fullres")
            if folder or configuration:
                self._results = find_results_folder(self._model_path(), self._configuration.value)
                names = sorted({p.name for p in self._results.glob("fold_*/*.pth")}) or ["checkpoint_final.pth"]
                self._set_choices(self._checkpoint, names, "checkpoint_final.pth")
            folds = detect_folds(self._results, self._checkpoint.value)
        except (NnsegError, OSError) as exc:
            self._summary.value = f"Not usable: {exc}"
            return
        self._folds.clear()
        self._folds.extend([CheckBox(text=str(f), value=True) for f in folds])
        for box in self._folds:
            box.changed.connect(self._update_cost)
        self._summary.value = "loading..."
        if not self._loading:
            self._start_load()

    def _start_load(self) -> None:
        # One load at a time: typing a path must not pile up checkpoint reads (and torch's safe_globals
        # allow-list is process-global, so concurrent safe loads can refuse each other's files).
        self._loading, token = True, self._load_token
        create_worker(_load, self._results, self._checkpoint.value,
                      _connect={"returned": lambda out: self._model_loaded(out, token)})

    def _model_loaded(self, out, token: int) -> None:
        self._loading = False
        if token != self._load_token:  # the user picked another folder meanwhile: load that one instead
            if self._summary.value == "loading...":
                self._start_load()
            return
        if isinstance(out, _Failure):
            self._summary.value = f"Not usable: {out.error}"
            return
        self.model, devices = out
        demo = "" if self._folder.line_edit.value.strip() else "bundled demo model\n"
        self._summary.value = demo + self.model.summary()
        self._set_choices(self._device, devices, self._device.value)
        self._on_device.enabled = any(d.startswith(("cuda", "mps")) for d in devices)  # a GPU-only option
        _save_settings({"model_folder": self._folder.line_edit.value.strip()})
        self._inputs.clear()
        active = self._viewer.layers.selection.active
        for name in self.model.channel_names:
            combo = ComboBox(label=name, choices=self._image_choices)
            if isinstance(active, Image):
                combo.value = active
            combo.changed.connect(self._inputs_changed)
            self._inputs.append(combo)
        self._inputs_changed()
        self._update_cost()
        if self._worker is None:
            self._run.enabled = self._preview.enabled = True

    # ---- inputs and cost -----------------------------------------------------------------------------------
    def _image_choices(self, _widget=None) -> list[tuple[str, Image]]:
        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, Image)]

    def _region_choices(self, _widget=None) -> list[tuple[str, Shapes | None]]:
        shapes = [(f"box in {lay.name}", lay) for lay in self._viewer.layers if isinstance(lay, Shapes)]
        return [("visible slice", None), *shapes]

    def _input(self):
        channels = [combo.value for combo in self._inputs]
        return model_input(channels, self.model.num_input_channels, self.model.target_spacing)

    def _inputs_changed(self) -> None:
        try:
            spacing = self._input().spacing
        except NnsegError:
            return
        self._spacing.value = ", ".join(f"{s:g}" for s in spacing)  # triggers _update_cost

    def _spacing_value(self) -> tuple[float, ...]:
        try:
            spacing = tuple(float(s) for s in self._spacing.value.replace(",", " ").split())
        except ValueError:
            spacing = ()
        if len(spacing) != 3 or not all(0 < s < float("inf") for s in spacing):
            raise NnsegError(f"spacing {self._spacing.value!r} should be three positive numbers (z, y, x), "
                             "e.g. '2, 0.8, 0.8'.")
        return spacing

    def _selected_folds(self) -> list[int | str]:
        return [f for f, box in zip(self.model.folds, self._folds) if box.value]

    def _update_cost(self) -> None:
        if self.model is None:
            return
        from .predictor import estimate_cost

        try:
            image, spacing = self._input(), self._spacing_value()
            target = self.model.target_spacing
            self._spacing_warning.value = (
                f"⚠ The layer scale looks unset (all 1) but the model was trained at spacing "
                f"{', '.join(f'{t:g}' for t in target)}: enter the image's real spacing."
                if scale_looks_unset(spacing, target) else "")
            c = estimate_cost(self.model, image.shape, spacing, self._step.value, self._mirroring.value)
            n = len(self._selected_folds())
            self._cost.value = (f"{c['tiles']} tiles × {c['mirror_passes']} mirrored passes × {n} folds = "
                                f"{c['tiles'] * c['mirror_passes'] * n} forward passes")
        except NnsegError as exc:
            self._cost.value = f"cannot run: {exc}"

    # ---- running -------------------------------------------------------------------------------------------
    def _job(self, preview: bool) -> SegmentationJob:
        from .console import resolve_model

        folds = self._selected_folds()
        if not folds:
            raise NnsegError("Tick at least one fold.")
        image, spacing = self._input(), self._spacing_value()
        region = None
        if preview:
            half = half_patch(self.model, spacing)
            dims, source = self._viewer.dims, self._region_source.value
            region = (visible_region(image, dims.point, dims.displayed, half) if source is None
                      else box_region(image, source, half, dims.point))
        model = self.model if len(folds) == len(self.model.folds) else resolve_model(self.model, folds=folds)
        return SegmentationJob(model=model, image=image, spacing=spacing, region=region, options={
            "device": self._device.value, "tile_step_size": self._step.value,
            "use_mirroring": self._mirroring.value, "perform_everything_on_device": self._on_device.value,
            "return_probabilities": self._probabilities.value, "return_uncertainty": self._uncertainty.value})

    def _start(self, preview: bool) -> None:
        if self._worker is not None:  # the Run button is Cancel while a job runs
            self._worker.quit()
            self._run.text, self._run.enabled = "Cancelling...", False
            return
        try:
            job = self._job(preview)
        except NnsegError as exc:
            show_error(str(exc))
            return
        self._pbar = progress(total=0, desc="nnU-Net: preprocessing")
        self._first = None
        self._worker = create_worker(_guarded, job.steps, _connect={
            "yielded": self._on_progress, "returned": lambda r: self._on_returned(job, r),
            "errored": lambda e: show_error(f"Segmentation failed: {e}"),
            "warned": lambda w: show_warning(str(w[0])), "finished": self._on_finished,
            "aborted": lambda: setattr(self._status, "value", "cancelled; nothing was added")})
        self._run.text, self._preview.enabled = "Cancel", False

    def _on_progress(self, event) -> None:
        # napari's progress-bar widget spins the event loop on every update, so the run may finish (and this
        # bar close) in the middle of this handler: re-check before each call.
        text = event.message
        if event.stage == "predict":
            if self._first is None:
                self._first = (event.step, event.seconds)
            elif event.step > self._first[0]:
                rate = (event.seconds - self._first[1]) / (event.step - self._first[0])
                text += f", about {rate * (event.n_steps - event.step):.0f} s left"
        self._status.value = text
        pbar = self._pbar
        if pbar is not None:
            pbar.set_description(f"nnU-Net: {text}")
        if event.stage == "predict" and self._pbar is pbar is not None:
            if pbar.total != event.n_steps:
                pbar.total = event.n_steps
            if self._pbar is pbar:
                pbar.update(max(0, event.step - pbar.n))

    def _on_returned(self, job: SegmentationJob, result) -> None:
        if isinstance(result, _Failure):
            show_error(f"Segmentation failed: {result.error}")
            self._status.value = f"failed: {result.error}"
            return
        layer = job.add_to(self._viewer, result)
        self._status.value = f"added {layer.name!r} in {result.info.get('seconds', 0):.1f} s"

    def _on_finished(self) -> None:
        pbar, self._worker, self._pbar = self._pbar, None, None
        if pbar is not None:
            pbar.close()
        self._run.text = "Run"
        self._run.enabled = self._preview.enabled = self.model is not None
