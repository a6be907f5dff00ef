"""Image files in and labels out, with nnU-Net's axis and spacing conventions (issue #4).

The contract (DESIGN.md): an image read by napari-nnseg reaches the network exactly as it does through
nnU-Net's own reader, and the labels land on the source file's grid. So every NIfTI variant is read by both
``read_image`` and nnunetv2's ``SimpleITKIO().read_images`` and must agree bit for bit (array, dtype, spacing
values), including oblique and flipped affines, scaled integers, 2-D and 4-D files; written labels are read
back with SimpleITK and must carry the source's spacing, origin and direction.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
sitk = pytest.importorskip("SimpleITK")
tifffile = pytest.importorskip("tifffile")
pytest.importorskip("nnunetv2")

from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO  # noqa: E402
from nnunetv2.imageio.tif_reader_writer import Tiff3DIO  # noqa: E402

from napari_nnseg import napari_io  # noqa: E402
from napari_nnseg.errors import NnsegError  # noqa: E402
from napari_nnseg.image_files import (  # noqa: E402
    atomic_path,
    file_ending,
    geometry_for_array,
    read_image,
    write_image,
    write_labels,
)

RNG = np.random.default_rng(0)


def _oblique_affine(zooms=(0.9, 0.7, 2.3), flip_x=False, origin=(10.0, -20.0, 5.5)) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    rot = Rotation.from_euler("xyz", [20, 10, 35], degrees=True).as_matrix()
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(zooms)
    if flip_x:
        affine[:3, 0] *= -1
    affine[:3, 3] = origin
    return affine


def _nifti_variants(folder: Path) -> dict[str, Path]:
    data = RNG.normal(size=(7, 9, 5)).astype(np.float32)  # NIfTI (x, y, z)
    out = {}

    def save(name, img):
        out[name] = folder / f"{name}.nii.gz"
        nib.save(img, str(out[name]))

    save("identity", nib.Nifti1Image(data, np.diag([0.9, 0.7, 2.3, 1.0])))
    save("oblique", nib.Nifti1Image(data, _oblique_affine()))
    save("oblique_flipped", nib.Nifti1Image(data, _oblique_affine(flip_x=True)))
    scaled = nib.Nifti1Image((data * 100).astype(np.int16), _oblique_affine())
    scaled.header.set_slope_inter(0.37, 3.1)
    save("scaled_int16", scaled)
    save("two_d", nib.Nifti1Image(data[:, :, 0], np.diag([0.9, 0.7, 1.0, 1.0])))
    save("one_slice", nib.Nifti1Image(data[:, :, :1], np.diag([0.9, 0.7, 3.0, 1.0])))
    save("trailing_one", nib.Nifti1Image(data[..., None], np.diag([0.9, 0.7, 2.3, 1.0])))
    save("channels_4d", nib.Nifti1Image(RNG.normal(size=(7, 9, 5, 2)).astype(np.float32), _oblique_affine()))
    uncompressed = folder / "plain.nii"
    nib.save(nib.Nifti1Image(data, _oblique_affine()), str(uncompressed))
    out["plain_nii"] = uncompressed
    return out


@pytest.fixture(scope="module")
def nifti_files(tmp_path_factory) -> dict[str, Path]:
    return _nifti_variants(tmp_path_factory.mktemp("nifti"))


VARIANTS = ["identity", "oblique", "oblique_flipped", "scaled_int16", "two_d", "one_slice", "trailing_one",
            "channels_4d", "plain_nii"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_read_image_equals_nnunet_simpleitk_reader(nifti_files, variant):
    path = nifti_files[variant]
    ref, props = SimpleITKIO().read_images([str(path)])
    image, spacing, geometry = read_image(path)
    assert image.dtype == ref.dtype == np.float32
    assert image.shape == ref.shape
    assert np.array_equal(image, ref)
    # the exact float64 values of the float32 header, as nnU-Net passes them on
    assert list(spacing) == [float(s) for s in props["spacing"]]
    assert geometry.shape == ref.shape[1:]
    assert image.flags.c_contiguous


def test_read_image_channel_files_equal_nnunet(tmp_path):
    affine = _oblique_affine()
    files = []
    for c in range(2):
        files.append(tmp_path / f"case_{c:04d}.nii.gz")
        nib.save(nib.Nifti1Image(RNG.normal(size=(6, 8, 4)).astype(np.float32), affine), str(files[-1]))
    ref, props = SimpleITKIO().read_images([str(f) for f in files])
    image, spacing, _ = read_image(files)
    assert np.array_equal(image, ref) and image.shape == (2, 4, 8, 6)
    assert list(spacing) == [float(s) for s in props["spacing"]]


def _sitk_geometry(path: Path):
    img = sitk.ReadImage(str(path))
    return img.GetSpacing(), img.GetOrigin(), img.GetDirection(), sitk.GetArrayFromImage(img)


@pytest.mark.parametrize("variant", ["identity", "oblique_flipped", "scaled_int16", "two_d", "channels_4d"])
def test_written_labels_sit_on_the_source_grid(nifti_files, tmp_path, variant):
    src = nifti_files[variant]
    image, _, geometry = read_image(src)
    labels = (image[0] > 0).astype(np.uint8) + (image[0] > 1).astype(np.uint8)
    out = write_labels(tmp_path / "labels.nii.gz", labels, geometry)

    src_img = sitk.ReadImage(str(src))
    spacing, origin, direction, array = _sitk_geometry(out)
    dim = len(spacing)
    assert dim == (2 if variant == "two_d" else 3)
    assert np.allclose(spacing, src_img.GetSpacing()[:dim])
    assert np.allclose(origin, src_img.GetOrigin()[:dim])
    src_dir = np.asarray(src_img.GetDirection()).reshape(src_img.GetDimension(), -1)[:dim, :dim]
    assert np.allclose(direction, src_dir.ravel())
    assert np.array_equal(array.reshape(labels.shape), labels)
    written = nib.load(str(out))
    assert written.get_data_dtype() == np.uint8
    assert np.allclose(written.affine, nib.load(str(src)).affine)
    # the source's intensity scaling must not leak into the labels
    assert np.array_equal(np.asanyarray(written.dataobj).T.reshape(labels.shape), labels)
    # and reading it back with our reader gives the labels and the source spacing
    back, back_spacing, _ = read_image(out)
    assert np.array_equal(back[0], labels)
    assert back_spacing == read_image(src)[1]


def test_written_labels_equal_nnunet_write_seg(nifti_files, tmp_path):
    """Same file content (array, spacing, origin, direction) as nnU-Net's SimpleITKIO.write_seg."""
    src = nifti_files["oblique"]
    image, props = SimpleITKIO().read_images([str(src)])
    labels = (image[0] > 0.5).astype(np.uint8)
    SimpleITKIO().write_seg(labels, str(tmp_path / "ref.nii.gz"), props)
    _, _, geometry = read_image(src)
    write_labels(tmp_path / "ours.nii.gz", labels, geometry)
    ref, ours = _sitk_geometry(tmp_path / "ref.nii.gz"), _sitk_geometry(tmp_path / "ours.nii.gz")
    assert np.array_equal(ref[3], ours[3]) and ref[3].dtype == ours[3].dtype
    for a, b in zip(ref[:3], ours[:3]):
        assert np.allclose(a, b, atol=1e-6)


def test_labels_dtype_follows_nnunet_rule(nifti_files, tmp_path):
    _, _, geometry = read_image(nifti_files["identity"])
    labels = np.zeros(geometry.shape, np.int32)
    labels[0, 0, 0] = 254
    assert nib.load(str(write_labels(tmp_path / "a.nii.gz", labels, geometry))).get_data_dtype() == np.uint8
    labels[0, 0, 0] = 255
    out = write_labels(tmp_path / "b.nii.gz", labels, geometry)
    assert nib.load(str(out)).get_data_dtype() == np.uint16
    assert read_image(out)[0].max() == 255
    with pytest.raises(NnsegError, match="do not fit"):
        write_labels(tmp_path / "c.nii.gz", labels[:-1], geometry)
    with pytest.raises(NnsegError, match="non-negative"):
        write_labels(tmp_path / "d.nii.gz", labels - 300, geometry)


def test_interrupted_write_leaves_nothing(nifti_files, tmp_path, monkeypatch):
    _, _, geometry = read_image(nifti_files["identity"])

    def crash(img, filename):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(nib, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        write_labels(tmp_path / "labels.nii.gz", np.zeros(geometry.shape, np.uint8), geometry)
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_keeps_ending_and_hides_temp(tmp_path):
    with atomic_path(tmp_path / "x.nii.gz") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp.name.endswith(".nii.gz")
        tmp.write_text("done")
    assert (tmp_path / "x.nii.gz").read_text() == "done" and not tmp.exists()
    assert file_ending("a/CASE_0000.NII.GZ") == ".NII.GZ" and file_ending("x.tif") == ".tif"
    assert file_ending("x.png") == ""


def test_read_errors_are_clear(tmp_path, nifti_files):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti")
    with pytest.raises(NnsegError, match="broken.nii.gz.*NIfTI"):
        read_image(bad)
    with pytest.raises(NnsegError, match="does not exist"):
        read_image(tmp_path / "missing.nii.gz")
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(NnsegError, match="not a supported image"):
        read_image(tmp_path / "x.png")
    with pytest.raises(NnsegError, match="same shape"):
        read_image([nifti_files["identity"], nifti_files["two_d"]])


# ---------------------------------------------------------------------------------------------------------
# TIFF and npy
# ---------------------------------------------------------------------------------------------------------


def test_tiff_spacing_from_imagej_ome_sidecar_or_default(tmp_path):
    vol = RNG.integers(0, 1000, size=(6, 5, 7)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "ij.tif", vol, imagej=True, resolution=(1 / 0.4, 1 / 0.3),
                     metadata={"spacing": 2.5, "unit": "um", "axes": "ZYX"})
    image, spacing, geometry = read_image(tmp_path / "ij.tif")
    assert image.shape == (1, 6, 5, 7) and np.array_equal(image[0], vol)
    assert np.allclose(spacing, (2.5, 0.3, 0.4)) and geometry.spacing_source == "imagej"

    tifffile.imwrite(tmp_path / "two.ome.tif", np.stack([vol, vol + 1]), ome=True,
                     metadata={"axes": "CZYX", "PhysicalSizeX": 0.4, "PhysicalSizeY": 0.3, "PhysicalSizeZ": 2.5})
    image, spacing, geometry = read_image(tmp_path / "two.ome.tif")
    assert image.shape == (2, 6, 5, 7) and np.array_equal(image[1], vol + 1)
    assert np.allclose(spacing, (2.5, 0.3, 0.4)) and geometry.spacing_source == "ome"

    # nnU-Net's Tiff3DIO convention: CASE_0000.tif + CASE.json; must read as nnU-Net reads it
    tifffile.imwrite(tmp_path / "case_0000.tif", vol)
    (tmp_path / "case.json").write_text(json.dumps({"spacing": [3.0, 0.5, 0.25]}))
    ref, props = Tiff3DIO().read_images([str(tmp_path / "case_0000.tif")])
    image, spacing, geometry = read_image(tmp_path / "case_0000.tif")
    assert np.array_equal(image, ref) and list(spacing) == [float(s) for s in props["spacing"]]

    tifffile.imwrite(tmp_path / "plain.tif", vol)
    image, spacing, geometry = read_image(tmp_path / "plain.tif")
    assert image.shape == (1, 6, 5, 7) and spacing == (1.0, 1.0, 1.0) and geometry.spacing_source == "default"


def test_tiff_2d_rgb_and_label_round_trip(tmp_path):
    rgb = RNG.integers(0, 255, size=(5, 6, 3)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    image, spacing, geometry = read_image(tmp_path / "rgb.tif")
    assert image.shape == (3, 1, 5, 6) and np.array_equal(image[:, 0], rgb.transpose(2, 0, 1))
    assert spacing[1:] == (1.0, 1.0) and spacing[0] == 999.0 and geometry.file_ndim == 2

    vol = RNG.integers(0, 1000, size=(6, 5, 7)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "ij.tif", vol, imagej=True, resolution=(1 / 0.4, 1 / 0.3),
                     metadata={"spacing": 2.5, "unit": "um", "axes": "ZYX"})
    _, spacing, geometry = read_image(tmp_path / "ij.tif")
    labels = (vol > 500).astype(np.uint8)
    out = write_labels(tmp_path / "labels.tif", labels, geometry)
    back, back_spacing, _ = read_image(out)
    assert np.array_equal(back[0], labels) and np.allclose(back_spacing, spacing)


def test_npy_with_and_without_sidecar(tmp_path):
    vol = RNG.normal(size=(4, 5, 6)).astype(np.float32)
    np.save(tmp_path / "a.npy", vol)
    image, spacing, geometry = read_image(tmp_path / "a.npy")
    assert image.shape == (1, 4, 5, 6) and np.array_equal(image[0], vol) and spacing == (1.0, 1.0, 1.0)
    np.save(tmp_path / "b_0000.npy", np.stack([vol, vol]))
    (tmp_path / "b.json").write_text(json.dumps({"spacing": [2, 1, 0.5]}))
    image, spacing, geometry = read_image(tmp_path / "b_0000.npy")
    assert image.shape == (2, 4, 5, 6) and spacing == (2.0, 1.0, 0.5)
    out = write_labels(tmp_path / "b.npy", (vol > 0).astype(np.uint8), geometry)
    assert np.array_equal(np.load(out), vol > 0) and json.loads((tmp_path / "b.json").read_text())["spacing"]


# ---------------------------------------------------------------------------------------------------------
# napari reader / writer contributions (no napari needed)
# ---------------------------------------------------------------------------------------------------------


def test_napari_reader_gives_scale_translate_and_affine(nifti_files, tmp_path):
    assert napari_io.get_reader(str(tmp_path / "x.tif")) is None
    assert napari_io.get_reader([str(nifti_files["identity"]), str(tmp_path / "x.tif")]) is None
    reader = napari_io.get_reader(str(nifti_files["oblique"]))
    assert callable(reader)
    [(data, kwargs, layer_type)] = reader(str(nifti_files["oblique"]))
    image, spacing, geometry = read_image(nifti_files["oblique"])
    assert layer_type == "image" and data.shape == image.shape[1:]
    assert np.array_equal(np.asarray(data, np.float32), image[0])
    assert kwargs["scale"] == spacing
    assert np.allclose(kwargs["translate"], np.asarray(geometry.affine)[:3, 3][::-1])
    assert np.allclose(kwargs["metadata"]["nifti_affine"], nib.load(str(nifti_files["oblique"])).affine)
    assert kwargs["name"] == "oblique"

    [(data4, kwargs4, _)] = reader(str(nifti_files["channels_4d"]))
    assert data4.shape == (2, 5, 9, 7) and kwargs4["channel_axis"] == 0
    [(data2, kwargs2, _)] = reader(str(nifti_files["two_d"]))
    assert data2.shape == (9, 7) and len(kwargs2["scale"]) == 2


def test_napari_writer_uses_source_affine_or_scale(nifti_files, tmp_path):
    [(data, kwargs, _)] = napari_io.read_nifti_layers(str(nifti_files["oblique_flipped"]))
    labels = (np.asarray(data) > 0).astype(np.int32)
    # what the plugin's labels layer carries: only the copied nifti_affine, plus napari's scale/translate
    meta = {"scale": kwargs["scale"], "translate": kwargs["translate"],
            "metadata": {"nifti_affine": kwargs["metadata"]["nifti_affine"]}}
    [path] = napari_io.write_labels(str(tmp_path / "seg"), labels, meta)
    assert path.endswith("seg.nii.gz")
    written = nib.load(path)
    assert np.allclose(written.affine, nib.load(str(nifti_files["oblique_flipped"])).affine, atol=1e-5)
    assert written.get_data_dtype() == np.uint8
    assert np.array_equal(read_image(path)[0][0], labels)

    # no NIfTI provenance (e.g. labels drawn on a TIFF layer): affine from scale/translate
    meta = {"scale": (2.0, 0.5, 0.25), "translate": (10.0, 20.0, 30.0), "metadata": {}}
    [path] = napari_io.write_labels(str(tmp_path / "drawn.nii"), labels, meta)
    [(_, back, _)] = napari_io.read_nifti_layers(path)
    assert np.allclose(back["scale"], (2.0, 0.5, 0.25)) and np.allclose(back["translate"], (10.0, 20.0, 30.0))

    [path] = napari_io.write_labels(str(tmp_path / "flat.nii.gz"), labels[0], {"scale": (0.5, 0.25)})
    assert nib.load(path).shape == labels[0].T.shape


def test_write_image_and_array_geometry(tmp_path):
    vol = RNG.normal(size=(4, 5, 6)).astype(np.float32)
    geometry = geometry_for_array(vol.shape, (2.0, 0.8, 0.8), origin=(1.0, 2.0, 3.0))
    path = write_image(tmp_path / "img_0000.nii.gz", vol, geometry)
    ref, props = SimpleITKIO().read_images([str(path)])
    assert np.array_equal(ref[0], vol)
    assert np.allclose(props["spacing"], (2.0, 0.8, 0.8))
    assert np.allclose(read_image(path)[2].origin, (1.0, 2.0, 3.0))
