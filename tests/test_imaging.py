"""pipeline.imaging: real radiographs, bit depths, colour, DICOM photometry, border crop, draft decoding,
and the PNG writer."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pydicom
import pytest
from PIL import Image

from pipeline.imaging import (
    UPSAMPLE_TOLERANCE,
    ImageError,
    MissingImageError,
    _reduced_crop,
    border_box,
    encode_png,
    load_for_shard,
    minmax_uint8,
    png_filter_rows,
    read_image,
)

SIIM = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"


def _real_files(folder):
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".dcm"))


# --------------------------------------------------------------------------- real files
def test_read_image_every_real_file(realcxr):
    files = _real_files(realcxr)
    assert len(files) >= 8
    for path in files:
        a = read_image(path)
        assert a.dtype == np.uint8 and a.ndim == 2, path.name
        if path.suffix == ".dcm":
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            assert a.shape == (ds.Rows, ds.Columns), path.name
        else:
            with Image.open(path) as im:
                assert a.shape == (im.height, im.width), path.name
        assert a.max() > a.min(), f"{path.name} decoded flat"
        sq, orig = load_for_shard(path, 64)
        assert sq.shape == (64, 64) and sq.dtype == np.uint8 and orig == a.shape, path.name
        assert sq.min() == 0 and sq.max() == 255, path.name


def test_monochrome1_is_inverted_monochrome2(realcxr):
    mono2 = read_image(realcxr / SIIM)
    mono1 = read_image(realcxr / "Fake_MONOHR1.dcm")
    np.testing.assert_array_equal(mono1.astype(int), 255 - mono2.astype(int))
    # The shard path keeps the relation too (both sides cropped the same way only without a crop).
    s2, _ = load_for_shard(realcxr / SIIM, 64, crop_border=False)
    s1, _ = load_for_shard(realcxr / "Fake_MONOHR1.dcm", 64, crop_border=False)
    assert np.abs(s1.astype(int) - (255 - s2.astype(int))).max() <= 1


def test_rgb_grey_content_keeps_brightness(realcxr):
    for name in ("h0001.png", "16747_3_1.jpg"):
        with Image.open(realcxr / name) as im:
            assert im.mode == "RGB"
            rgb = np.asarray(im)
        np.testing.assert_array_equal(read_image(realcxr / name), rgb[..., 0])


def test_8bit_png_values_unchanged(realcxr):
    with Image.open(realcxr / "00027426_000.png") as im:
        ref = np.asarray(im)
    np.testing.assert_array_equal(read_image(realcxr / "00027426_000.png"), ref)


# --------------------------------------------------------------------------- synthetic inputs
def test_16bit_png_minmax(tmp_path):
    a = np.linspace(1000, 4095, 64 * 48).reshape(48, 64).astype(np.uint16)  # 12-bit data in 16 bits
    Image.fromarray(a).save(tmp_path / "x.png")
    with Image.open(tmp_path / "x.png") as im:
        assert im.mode.startswith("I")
    out = read_image(tmp_path / "x.png")
    assert out.dtype == np.uint8 and out.shape == (48, 64)
    assert out.min() == 0 and out.max() == 255  # 255, not 256 wrapped to 0
    assert np.all(np.diff(out.ravel().astype(int)) >= 0)  # monotone mapping


def test_rgb_coloured_to_luma(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(tmp_path / "red.png")
    out = read_image(tmp_path / "red.png")
    assert out.shape == (8, 8) and abs(int(out[0, 0]) - round(200 * 0.299)) <= 1


def _write_dicom(path, arr, photometric="MONOCHROME2", slope=1.0, intercept=0.0, window=None):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = arr.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_dicom_16bit_rescale_window_and_monochrome1(tmp_path):
    arr = np.tile(np.arange(0, 4000, 40, dtype=np.uint16), (10, 1))  # 10 x 100
    _write_dicom(tmp_path / "m2.dcm", arr, slope=2.0, intercept=-100)
    _write_dicom(tmp_path / "m1.dcm", arr, photometric="MONOCHROME1", slope=2.0, intercept=-100)
    m2, m1 = read_image(tmp_path / "m2.dcm"), read_image(tmp_path / "m1.dcm")
    assert m2.shape == (10, 100) and m2[0, 0] == 0 and m2[0, -1] == 255
    np.testing.assert_array_equal(m1.astype(int), 255 - m2.astype(int))
    # A window maps exactly [c - w/2, c + w/2] (in rescaled units) to 0..255, clipping outside.
    _write_dicom(tmp_path / "w.dcm", arr, slope=2.0, intercept=-100, window=(3000, 2000))
    w = read_image(tmp_path / "w.dcm")
    values = arr[0].astype(float) * 2 - 100
    assert np.all(w[0][values <= 2000] == 0) and np.all(w[0][values >= 4000] == 255)
    mid = (values > 2100) & (values < 3900)
    assert 0 < w[0][mid].min() and w[0][mid].max() < 255


def test_errors_name_the_file(tmp_path):
    with pytest.raises(MissingImageError, match="nope.jpg"):
        read_image(tmp_path / "nope.jpg")
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match="junk.jpg"):
        read_image(tmp_path / "junk.jpg")
    good = tmp_path / "good.jpg"
    Image.fromarray(np.full((200, 200), 128, np.uint8)).save(good, quality=90)
    (tmp_path / "trunc.jpg").write_bytes(good.read_bytes()[:300])
    with pytest.raises(ImageError, match="trunc.jpg"):
        read_image(tmp_path / "trunc.jpg")
    with pytest.raises(ImageError, match="trunc.jpg"):
        load_for_shard(tmp_path / "trunc.jpg", 32)
    (tmp_path / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x01" * 50)
    with pytest.raises(ImageError, match="bad.dcm"):
        read_image(tmp_path / "bad.dcm")


# --------------------------------------------------------------------------- shard path
def test_minmax_uint8_uses_255():
    out = minmax_uint8(np.array([[10, 20], [30, 110]], np.uint8))
    assert out.tolist() == [[0, 26], [51, 255]]
    assert minmax_uint8(np.full((2, 2), 7, np.uint8)).max() == 0


def test_border_crop(tmp_path):
    img = np.zeros((120, 100), np.uint8)
    img[10:100, 20:90] = np.random.default_rng(0).integers(40, 200, (90, 70))
    assert border_box(img, inset=0) == (10, 100, 20, 90)
    assert border_box(img) == (11, 99, 21, 89)  # one blended edge pixel dropped per cropped side
    assert border_box(np.full((5, 5), 100, np.uint8)) == (0, 5, 0, 5)
    Image.fromarray(img).save(tmp_path / "b.png")
    cropped, orig = load_for_shard(tmp_path / "b.png", 70, crop_border=True)
    assert orig == (120, 100)
    # The border is gone: the first row/column carry content, not zeros.
    assert cropped[0].mean() > 20 and cropped[:, 0].mean() > 20
    full, _ = load_for_shard(tmp_path / "b.png", 70, crop_border=False)
    assert full[0].max() == 0 and full[:, 0].max() == 0
    assert cropped.shape == full.shape == (70, 70) and cropped.min() == 0 and cropped.max() == 255


def _smooth_jpeg(path, size, border=0, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 110 + 70 * np.sin(7 * xx + 1) * np.cos(5 * yy) + rng.normal(0, 4, (size, size))
    img = np.clip(img, 15, 240).astype(np.uint8)
    if border:
        img[:border], img[-border:], img[:, :border], img[:, -border:] = 0, 0, 0, 0
    Image.fromarray(img).save(path, quality=92)


@pytest.fixture
def draft_calls(monkeypatch):
    """Records (decoded size, requested size) of every JPEG ``draft`` call."""
    from PIL import JpegImagePlugin

    calls = []
    orig_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        res = orig_draft(self, mode, size)
        calls.append((self.size, size))
        return res

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return calls


def test_draft_decode_close_to_full_decode(tmp_path, draft_calls):
    path = tmp_path / "big.jpg"
    _smooth_jpeg(path, 1024, border=24)
    fast, orig = load_for_shard(path, 128)
    # 1/8 gives exactly 128 px; the crop leaves ~122, within the upsample tolerance: one decode.
    assert [c[0] for c in draft_calls] == [(128, 128)], "JPEG was not decoded once at 1/8 scale"
    draft_calls.clear()
    nocrop, _ = load_for_shard(path, 128, crop_border=False)
    assert [c[0] for c in draft_calls] == [(128, 128)]
    draft_calls.clear()
    slow, orig2 = load_for_shard(path, 128, draft=False)
    assert not draft_calls
    assert orig == orig2 == (1024, 1024)
    assert fast.shape == slow.shape == nocrop.shape == (128, 128)
    assert np.abs(fast.astype(int) - slow.astype(int)).mean() < 1.2
    # The border really was cropped in the reduced path: no dark frame left at the edges.
    assert fast[0].mean() > 40 and fast[:, 0].mean() > 40 and nocrop[0].max() < 20


def test_draft_redecodes_beyond_upsample_tolerance(tmp_path, draft_calls):
    # A 48 px border leaves ~116 of 128 px at 1/8 (9% short, over the 8% tolerance): decode at 1/4.
    assert UPSAMPLE_TOLERANCE < 1 - 116 / 128
    _smooth_jpeg(tmp_path / "wide.jpg", 1024, border=48, seed=1)
    fast, _ = load_for_shard(tmp_path / "wide.jpg", 128)
    assert [c[0] for c in draft_calls] == [(128, 128), (256, 256)]
    slow, _ = load_for_shard(tmp_path / "wide.jpg", 128, draft=False)
    assert np.abs(fast.astype(int) - slow.astype(int)).mean() < 1.2


def test_draft_redecodes_when_crop_leaves_too_few_pixels(tmp_path, draft_calls):
    # A 1024 image whose content is a 300 px square: 1/8 scale leaves 37 px for a 128 target.
    yy, xx = np.mgrid[0:300, 0:300] / 300
    img = np.zeros((1024, 1024), np.uint8)
    img[362:662, 362:662] = (120 + 80 * np.sin(9 * xx) * np.cos(7 * yy)).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "small.jpg", quality=95)
    fast, _ = load_for_shard(tmp_path / "small.jpg", 128)
    assert [c[0] for c in draft_calls] == [(128, 128), (512, 512)]
    slow, _ = load_for_shard(tmp_path / "small.jpg", 128, draft=False)
    # Min-max sees JPEG ringing at the hard content edge differently at each scale, so compare shape
    # (correlation) rather than absolute grey levels here.
    assert np.corrcoef(fast.ravel(), slow.ravel())[0, 1] > 0.99


def test_reduced_crop_places_edges_like_full_resolution():
    # Full resolution: content from row/col 20 to 1004 (exclusive) in 1024; full-resolution cropping
    # keeps 21..1003, i.e. 2.625..125.375 in 1/8-scale pixels, which the reduced crop must recover.
    full = np.zeros((1024, 1024), np.float64)
    full[20:1004, 20:1004] = 200.0
    reduced = full.reshape(128, 8, 128, 8).mean(axis=(1, 3)).round().astype(np.uint8)  # what 1/8 DCT gives
    core, box = _reduced_crop(reduced, 8)
    # ``core`` starts one replicated line before the first full content line (3), so offset 3 - 1.
    np.testing.assert_allclose(box, (2.625 - 2, 2.625 - 2, 125.375 - 2, 125.375 - 2), atol=0.02)
    assert core.shape == (124, 124) and core.min() == 200
    # Where the content next to the edge is dark (air), the fraction is unknown: half a line.
    dark = reduced.copy()
    dark[3, :] = dark[:, 3] = 5
    assert abs(_reduced_crop(dark, 8)[1][1] - (1 + 1 / 8 - 0.5)) < 1e-9


# --------------------------------------------------------------------------- PNG writer
def _png_rows(data: bytes) -> np.ndarray:
    """The filtered scanlines inside a PNG (concatenated IDAT, inflated), checking each chunk's CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, kinds = 8, b"", []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(kind + body), kind
        kinds.append(kind)
        idat += body if kind == b"IDAT" else b""
        pos += 12 + n
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND"
    w, h = struct.unpack(">II", data[16:24])  # IHDR: width first
    return np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, w + 1)


@pytest.mark.parametrize("shape", [(1, 1), (1, 37), (29, 1), (64, 64), (33, 250)])
def test_encode_png_round_trips(shape):
    rng = np.random.default_rng(sum(shape))
    for a in (rng.integers(0, 256, shape, dtype=np.uint8),  # noise: every residual value occurs
              np.full(shape, 255, np.uint8), np.zeros(shape, np.uint8),
              (np.add.outer(np.arange(shape[0]), 3 * np.arange(shape[1])) % 256).astype(np.uint8)):
        data = encode_png(a)
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "PNG" and im.mode == "L" and im.size == (shape[1], shape[0])
            np.testing.assert_array_equal(np.asarray(im), a)
        _png_rows(data)


def test_encode_png_real_radiographs(realcxr):
    for path in _real_files(realcxr):
        a = load_for_shard(path, 256)[0]
        data = encode_png(a)
        with Image.open(io.BytesIO(data)) as im:
            np.testing.assert_array_equal(np.asarray(im), a, err_msg=path.name)
        # Row filtering pays: well under the unfiltered deflate of the same pixels.
        z = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
        plain = len(z.compress(np.pad(a, ((0, 0), (1, 0))).tobytes()) + z.flush())
        assert len(data) < 0.85 * plain, path.name


def test_png_filters_chosen_per_row():
    # Rows 0-9 ramp left to right (Sub leaves a constant), rows 10-19 repeat one noisy row (Up leaves
    # zeros after the first), rows 20-29 are flat at 0 (None is already zero).
    rng = np.random.default_rng(0)
    a = np.zeros((30, 64), np.uint8)
    a[:10] = (np.arange(64) * 3 + 7).astype(np.uint8)[None, :] + np.arange(10)[:, None].astype(np.uint8) * 50
    a[10:20] = rng.integers(0, 256, 64, dtype=np.uint8)
    rows = png_filter_rows(a)
    assert list(rows[1:10, 0]) == [1] * 9 and list(rows[11:20, 0]) == [2] * 9 and list(rows[21:30, 0]) == [0] * 9
    np.testing.assert_array_equal(rows[11:20, 1:], 0)
    # The written rows are exactly what the encoder stores, and they undo to the image (PNG's rule).
    np.testing.assert_array_equal(_png_rows(encode_png(a)), rows)


def test_encode_png_rejects_bad_arrays():
    for bad in (np.zeros((4, 4), np.uint16), np.zeros((4, 4, 3), np.uint8), np.zeros((0, 4), np.uint8)):
        with pytest.raises(ValueError, match="2-D uint8"):
            encode_png(bad)
