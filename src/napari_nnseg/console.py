"""Segment from napari's console or a notebook: ``napari_nnseg.segment(viewer, "image")``.

It runs the same job the widget runs (same input assembly, same core generator, same layer building), only
synchronously, so a script gets exactly the layer a click would give. The job pieces are public to the widget
for that reason; torch is imported only when a job actually runs.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import NnsegError
from .layers import InputImage, add_result_layers, model_input

if TYPE_CHECKING:
    from napari.layers import Image, Labels

    from .model import NnUNetModel
    from .predictor import PredictionResult
    from .progress import Progress


def resolve_model(model: Any = None, *, configuration: str | None = None,
                  folds: Sequence[int | str] | int | str | None = None,
                  checkpoint: str = "checkpoint_final.pth") -> NnUNetModel:
    """``None`` (the bundled demo), a path (folder or zip) or a loaded model, narrowed to ``folds``."""
    from .model import NnUNetModel, load_model

    if isinstance(model, NnUNetModel):
        wanted = None if folds is None else ([folds] if isinstance(folds, (int, str)) else list(folds))
        if wanted is None or [str(f) for f in wanted] == [str(f) for f in model.folds]:
            return model
        held = [str(f) for f in model.folds]
        if all(str(f) in held for f in wanted):
            # Narrow to weights already in memory (no checkpoint re-read on the GUI thread), in the order asked
            # for, as load_model would give it (nnU-Net's fold sum depends on the order).
            keep = [held.index(str(f)) for f in wanted]
            return dataclasses.replace(model, folds=tuple(model.folds[i] for i in keep),
                                       fold_weights=[model.fold_weights[i] for i in keep], _network=None)
        return load_model(model.folder, model.configuration, folds=wanted, checkpoint=model.checkpoint)
    if model is None:
        from .demo import demo_model_path

        model = demo_model_path()
    if not isinstance(model, (str, os.PathLike)):
        raise NnsegError(f"model must be None (the demo), a results folder or zip path, or a loaded model; "
                         f"got {type(model).__name__}.")
    return load_model(model, configuration, folds=folds, checkpoint=checkpoint)


@dataclass
class SegmentationJob:
    """One run, gathered on the main thread (layers are read there) and executed anywhere.

    ``options`` are ``predict_steps`` keyword arguments (device, tile_step_size, use_mirroring, ...).
    """

    model: NnUNetModel
    image: InputImage
    spacing: tuple[float, ...]
    region: tuple[slice, ...] | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def steps(self) -> Generator[Progress, None, PredictionResult]:
        """The core generator for this job: progress events, then the result."""
        from .predictor import predict_steps

        return (yield from predict_steps(self.model, self.image.data, self.spacing, region=self.region,
                                         **self.options))

    def add_to(self, viewer, result: PredictionResult) -> Labels:
        """Put the result into ``viewer`` as new layers; returns the Labels layer."""
        return add_result_layers(viewer, result, self.image, self.model, spacing=self.spacing,
                                 region=self.region, preview=self.region is not None)


def _as_layers(viewer, image) -> list[Image]:
    from napari.layers import Image

    items = list(image) if isinstance(image, (list, tuple)) else [image]
    layers = []
    for item in items:
        if isinstance(item, str):
            if item not in viewer.layers:
                names = ", ".join(repr(lay.name) for lay in viewer.layers if isinstance(lay, Image)) or "none"
                raise NnsegError(f"No layer named {item!r} in the viewer; image layers: {names}.")
            item = viewer.layers[item]
        if not isinstance(item, Image):
            raise NnsegError(f"{getattr(item, 'name', item)!r} is not an image layer.")
        layers.append(item)
    return layers


def segment(viewer, image: Image | str | Sequence[Image | str], model: Any = None, *,
            folds: Sequence[int | str] | int | str | None = None, configuration: str | None = None,
            checkpoint: str = "checkpoint_final.pth", device: str = "auto", tile_step_size: float = 0.5,
            use_mirroring: bool = True, perform_everything_on_device: bool = True,
            probabilities: bool = False, uncertainty: bool = False,
            spacing: Sequence[float] | None = None, region: tuple[slice, ...] | None = None) -> Labels:
    """Segment an image layer with a trained nnU-Net v2 model and add the result to ``viewer``.

    Parameters
    ----------
    viewer
        The napari viewer (``viewer`` in napari's console).
    image
        An image layer or its name; for multi-channel models one per input channel, or one (C, z, y, x) layer.
    model
        ``None`` for the bundled demo model, a results folder / exported zip path, or a loaded
        :class:`~napari_nnseg.NnUNetModel`.
    folds, configuration, checkpoint
        Which trained networks to use (``None`` folds: every trained fold, as nnU-Net does). With a loaded
        model only ``folds`` applies (its folder is re-read for a different set of folds).
    device, tile_step_size, use_mirroring, perform_everything_on_device
        As for :func:`napari_nnseg.predict`.
    probabilities, uncertainty
        Also add class probabilities / the ensemble's entropy and fold disagreement as image layers.
    spacing
        Voxel spacing (z, y, x); default: the layer's scale.
    region
        Slices over (z, y, x) to segment only part of the image (the result is placed there).

    Returns
    -------
    napari.layers.Labels
        The new layer, named ``"<image> <dataset> segmentation"`` (made unique; nothing is replaced).
    """
    loaded = resolve_model(model, configuration=configuration, folds=folds, checkpoint=checkpoint)
    image_input = model_input(_as_layers(viewer, image), loaded.num_input_channels, loaded.target_spacing)
    job = SegmentationJob(
        model=loaded, image=image_input,
        spacing=tuple(float(s) for s in (spacing if spacing is not None else image_input.spacing)),
        region=region,
        options={"device": device, "tile_step_size": tile_step_size, "use_mirroring": use_mirroring,
                 "perform_everything_on_device": perform_everything_on_device,
                 "return_probabilities": probabilities, "return_uncertainty": uncertainty})
    gen = job.steps()
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return job.add_to(viewer, stop.value)
