"""Run the widget on the demo volume in a real viewer, save a screenshot, and report main-thread stalls.

It is what a new user sees after File > Open Sample > nnU-Net demo volume and one click on Run, so it doubles
as an end-to-end check of the plugin. While the run is in flight a 10 ms QTimer on the main thread records
the gaps between its ticks: the longest gap is how long the viewer was unresponsive.

    xvfb-run -a /work/venv/bin/python scripts/screenshot_demo.py --out demo.png            # nnU-Net defaults
    xvfb-run -a /work/venv/bin/python scripts/screenshot_demo.py --out demo.png --fast     # 1 fold, no mirroring
"""

from __future__ import annotations

import argparse
import time

import napari
import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QApplication


def wait(condition, timeout: float) -> None:
    app, start = QApplication.instance(), time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise TimeoutError("the demo run did not finish in time")
        app.processEvents()
        time.sleep(0.005)


def ticks_after(ticks: list[float], moment: float) -> float:
    """The first timer tick after ``moment``: when the main thread was free again."""
    return next((t for t in ticks if t > moment), ticks[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_screenshot.png")
    parser.add_argument("--fast", action="store_true", help="one fold, no mirroring")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()

    viewer = napari.Viewer(title="napari-nnseg demo")
    viewer.window.resize(1400, 850)
    viewer.open_sample("napari-nnseg", "demo")
    _, widget = viewer.window.add_plugin_dock_widget("napari-nnseg", "nnU-Net segmentation")
    widget._folder.line_edit.value = ""  # the bundled demo model, whatever was remembered before
    wait(lambda: widget.model is not None, 120)
    if args.fast:
        list(widget._folds)[-1].value = False
        widget._mirroring.value = False
    widget._uncertainty.value = True
    print(widget._summary.value)
    print("cost:", widget._cost.value)

    ticks: list[float] = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(10)
    inserted: list[float] = []
    viewer.layers.events.inserted.connect(lambda _: inserted.append(time.perf_counter()))
    started = time.perf_counter()
    widget._run.native.click()
    wait(lambda: widget._worker is None, args.timeout)
    seconds = time.perf_counter() - started
    settle = time.perf_counter() + 0.5  # keep probing while napari draws the new layers
    wait(lambda: time.perf_counter() > settle, 5)
    timer.stop()
    gaps = np.diff(ticks) * 1000
    print(f"run: {seconds:.1f} s wall; status: {widget._status.value}")
    print(f"main-thread gaps between 10 ms ticks: max {gaps.max():.0f} ms, 99th percentile "
          f"{np.percentile(gaps, 99):.0f} ms, median {np.median(gaps):.0f} ms over {len(ticks)} ticks")
    added = inserted[0] if inserted else ticks[-1]
    during = gaps[np.asarray(ticks[1:]) < added]
    print(f"max gap before the result layers were added (worker running): {during.max():.0f} ms; "
          f"adding the result layers: {(ticks_after(ticks, added) - added) * 1000:.0f} ms")

    labels = viewer.layers[-1] if not widget._uncertainty.value else viewer.layers[-3]
    print("layers:", [layer.name for layer in viewer.layers])
    for name in ("uncertainty", "fold disagreement"):
        for layer in viewer.layers:
            if layer.name.endswith(name):
                layer.visible = False
    viewer.layers.selection.active = labels
    z = int(np.argmax((labels.data > 0).sum(axis=(1, 2))))
    viewer.dims.set_point(0, labels.data_to_world((z, 0, 0))[0])
    viewer.reset_view()
    settle = time.perf_counter() + 1
    wait(lambda: time.perf_counter() > settle, 5)
    viewer.window.screenshot(args.out, canvas_only=False)
    print("saved", args.out)
    viewer.close()


if __name__ == "__main__":
    main()
