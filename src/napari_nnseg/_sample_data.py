"""The demo volume as napari sample data (File > Open Sample > napari-nnseg).

Its spacing goes into the layer's scale, so the widget reads the right spacing without the user typing it.
"""

from __future__ import annotations


def demo_volume() -> list[tuple]:
    """The bundled demo volume (spheres and tubes) with its spacing in mm as the layer scale."""
    from .demo import demo_sample

    image, spacing = demo_sample()
    return [(image, {"name": "nnseg demo", "scale": spacing, "units": "mm", "axis_labels": ("z", "y", "x"),
                     "colormap": "gray"}, "image")]
