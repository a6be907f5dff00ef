"""napari-nnseg: run trained nnU-Net v2 models in napari, from Python and from the command line.

The public names are resolved lazily so that napari can list the plugin (which imports this package)
without importing torch.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "load_model": "napari_nnseg.model",
    "NnUNetModel": "napari_nnseg.model",
    "predict": "napari_nnseg.predictor",
    "predict_steps": "napari_nnseg.predictor",
    "PredictionResult": "napari_nnseg.predictor",
    "Progress": "napari_nnseg.progress",
    "NnsegError": "napari_nnseg.errors",
    "available_devices": "napari_nnseg.devices",
    "segment": "napari_nnseg.console",
    "predict_folder": "napari_nnseg.batch",
    "read_image": "napari_nnseg.image_files",
    "write_labels": "napari_nnseg.image_files",
    "demo_model_path": "napari_nnseg.demo",
    "demo_sample": "napari_nnseg.demo",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'napari_nnseg' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
