"""Classes, regions and the ignore label from ``dataset.json``, as nnU-Net's LabelManager reads them."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import NnsegError


@dataclass(frozen=True)
class LabelInfo:
    """What the network's output channels mean.

    ``names`` maps each output label value to a class name. For region models the network predicts one
    sigmoid channel per region (no background channel) and ``regions_class_order`` says which label value
    each region paints, later regions overwriting earlier ones.
    """

    names: dict[int, str]
    regions: tuple[tuple[int, ...], ...] | None
    regions_class_order: tuple[int, ...] | None
    ignore_label: int | None

    @property
    def has_regions(self) -> bool:
        return self.regions is not None

    @property
    def all_labels(self) -> list[int]:
        return sorted(self.names)

    @property
    def foreground_labels(self) -> list[int]:
        return [v for v in self.all_labels if v != 0]

    @property
    def num_heads(self) -> int:
        return len(self.regions) if self.regions is not None else len(self.all_labels)

    @property
    def labels_dtype(self):
        import numpy as np

        return np.uint8 if len(self.foreground_labels) < 255 else np.uint16

    @classmethod
    def from_dataset_json(cls, dataset: dict, where: str = "dataset.json") -> LabelInfo:
        labels = dataset.get("labels")
        if not isinstance(labels, dict) or "background" not in labels:
            raise NnsegError(f"{where}: 'labels' must be a dict with a 'background' entry equal to 0.")
        if labels["background"] != 0:
            raise NnsegError(f"{where}: the background label must be 0, got {labels['background']!r}.")
        ignore = labels.get("ignore")
        if ignore is not None and not isinstance(ignore, int):
            raise NnsegError(f"{where}: the 'ignore' label must be an integer, got {ignore!r}.")
        has_regions = any(isinstance(v, (list, tuple)) and len(v) > 1 for v in labels.values())
        values: set[int] = set()
        for key, value in labels.items():
            if key == "ignore":
                continue
            values.update(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
        if not has_regions:
            names = {int(v): k for k, v in labels.items() if k != "ignore"}
            return cls(names=dict(sorted(names.items())), regions=None, regions_class_order=None,
                       ignore_label=ignore)
        order = dataset.get("regions_class_order")
        regions, region_names = [], []
        for key, value in labels.items():
            if key == "ignore":
                continue
            vals = tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
            if set(vals) == {0}:
                continue
            regions.append(vals)
            region_names.append(key)
        if order is None or len(order) != len(regions):
            raise NnsegError(f"{where}: region-based labels need 'regions_class_order' with one entry per "
                             f"region ({len(regions)} regions: {', '.join(region_names)}).")
        names = {0: "background"}
        for label_value, name in zip(order, region_names):
            names[int(label_value)] = name
        return cls(names=dict(sorted(names.items())), regions=tuple(regions),
                   regions_class_order=tuple(int(o) for o in order), ignore_label=ignore)
