"""Scanner formats for the simulator's slides: Aperio SVS and a DICOM WSI series.

Each writer takes the slide's generic pyramidal TIFF (:mod:`.slides`) and re-encodes
its levels tile by tile (:class:`~.tiles.PyramidReader`), so the pixels, pyramid and
pixel size match the generic TIFF the tiles are served from.  The SVS writer holds a
few tiles whatever the slide's size, and so does the DICOM writer (its frames are
streamed to the file one by one):

* :func:`write_svs`: one ``.svs`` file as an Aperio scanner writes it: JPEG-tiled
  levels, the first page's ImageDescription starting ``Aperio Image Library`` with
  ``MPP = `` and ``AppMag = `` (OpenSlide's "aperio" vendor), a stripped thumbnail as
  the second page and the label as a stripped page described ``label``;
* :func:`write_dicom`: a DICOM VL Whole Slide Microscopy series, one ``.dcm`` per
  pyramid level (TILED_FULL, JPEG baseline frames) and one for the label, sharing a
  series UID in one folder (OpenSlide's "dicom" vendor opens any of them).

MRXS (3DHISTECH) is not written: it is an index file plus a folder of data files
(``slide.mrxs`` and ``slide/Index.dat``, ``Slidedat.ini``, ``Data0000.dat`` ...), and
the IA-API gives a multipart part only a ``filename`` (IA-API.md §2.4), which every
client known reduces to a base name; serving ``slide/Index.dat`` would rely on a
folder convention no SPS is documented to use.  See the README ("The SPS simulator").
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .tiles import PyramidReader

APERIO = "Aperio Image Library v12.0.15"
JPEG_QUALITY = 88
#: The longer side of the SVS thumbnail page.
THUMBNAIL_SIDE = 768


def _tiles(reader: PyramidReader, level: int) -> Iterator[np.ndarray]:
    """Level ``level``'s tiles, row by row, each a full tile (edges padded)."""
    page: Any = reader.levels[level]
    width, height = reader.sizes[level]
    cols, rows = -(-width // page.tilewidth), -(-height // page.tilelength)
    for index in range(rows * cols):
        yield reader._tile(level, index)


def _thumbnail(reader: PyramidReader, side: int) -> Image.Image:
    """The whole slide, its longer side about ``side``, from the smallest level."""
    level = len(reader.levels) - 1
    width, height = reader.sizes[level]
    image = Image.fromarray(reader.read(level, 0, 0, width, height), "RGB")
    image.thumbnail((side, side), Image.Resampling.BOX)
    return image


def write_svs(tiff: Path, path: Path, microns_per_pixel: float, label: Image.Image | None) -> None:
    """Write the pyramid in ``tiff`` as an Aperio SVS at ``path``."""
    import tifffile

    reader = PyramidReader(tiff, cache_tiles=4)
    try:
        tile = reader.levels[0].tilewidth  # type: ignore[union-attr]
        width, height = reader.sizes[0]
        with tifffile.TiffWriter(path, bigtiff=width * height > 2**31) as tif:
            for level, (w, h) in enumerate(reader.sizes):
                if level == 0:
                    description = (
                        f"{APERIO}\r\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) "
                        f"JPEG/RGB Q={JPEG_QUALITY}|AppMag = {round(10 / microns_per_pixel)}"
                        f"|MPP = {microns_per_pixel:.4f}|ScanScope ID = DPATIA-SIM"
                    )
                else:
                    description = (
                        f"{APERIO}\r\n{width}x{height} -> {w}x{h} - ({tile}x{tile}) "
                        f"JPEG/RGB Q={JPEG_QUALITY}"
                    )
                tif.write(
                    _tiles(reader, level),
                    shape=(h, w, 3),
                    dtype=np.uint8,
                    tile=(tile, tile),
                    compression="jpeg",
                    compressionargs={"level": JPEG_QUALITY},
                    photometric="rgb",
                    subfiletype=0,
                    description=description,
                    metadata=None,
                    maxworkers=2,
                    buffersize=16 * 2**20,
                )
                if level == 0:
                    thumbnail = _thumbnail(reader, THUMBNAIL_SIDE)
                    tw, th = thumbnail.size
                    tif.write(
                        np.asarray(thumbnail),
                        photometric="rgb",
                        compression="jpeg",
                        rowsperstrip=16,
                        subfiletype=1,
                        description=f"{APERIO}\r\n{width}x{height} -> {tw}x{th} - thumbnail",
                        metadata=None,
                    )
            if label is not None:
                lw, lh = label.size
                tif.write(
                    np.asarray(label.convert("RGB")),
                    photometric="rgb",
                    compression="lzw",
                    rowsperstrip=16,
                    subfiletype=1,
                    description=f"{APERIO}\r\nlabel {lw}x{lh}",
                    metadata=None,
                )
    finally:
        reader.close()


#: DICOM's VL Whole Slide Microscopy Image Storage SOP class.
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"


def _jpeg(tile: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(tile, "RGB").save(out, "JPEG", quality=JPEG_QUALITY, subsampling=1)
    return out.getvalue()


def _dicom_dataset(
    uid: Any,
    series_uid: str,
    study_uid: str,
    instance: int,
    image_type: str,
    size: tuple[int, int],
    tile: tuple[int, int],
    frames: int,
    microns_per_pixel: float,
    total: tuple[int, int],
) -> Any:
    """One VL WSI instance's attributes (pixel data added by the caller)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import UID, JPEGBaseline8Bit

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(WSI_SOP_CLASS)
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = UID(WSI_SOP_CLASS)
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = series_uid + ".1"
    ds.Modality = "SM"
    ds.Manufacturer = "dpatia"
    ds.ManufacturerModelName = "SPS simulator"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance
    ds.PatientName = "Simulated^Patient"
    ds.PatientID = "SIM"
    ds.ContainerIdentifier = "SIM"
    ds.ImageType = ["ORIGINAL", "PRIMARY", image_type, "NONE"]
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.Columns, ds.Rows = tile
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = size
    ds.NumberOfFrames = frames
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.TotalPixelMatrixFocalPlanes = 1
    ds.NumberOfOpticalPaths = 1
    path = Dataset()
    path.OpticalPathIdentifier = "1"
    illumination = Dataset()
    illumination.CodeValue = "111744"
    illumination.CodingSchemeDesignator = "DCM"
    illumination.CodeMeaning = "Brightfield illumination"
    path.IlluminationTypeCodeSequence = Sequence([illumination])
    colour = Dataset()
    colour.CodeValue = "414298005"
    colour.CodingSchemeDesignator = "SCT"
    colour.CodeMeaning = "Full Spectrum"
    path.IlluminationColorCodeSequence = Sequence([colour])
    ds.OpticalPathSequence = Sequence([path])
    spacing = microns_per_pixel * total[0] / size[0] / 1000  # mm per pixel
    measures = Dataset()
    measures.PixelSpacing = [f"{spacing:.8g}", f"{spacing:.8g}"]
    measures.SliceThickness = "0.004"
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.ImagedVolumeWidth = total[0] * microns_per_pixel / 1000
    ds.ImagedVolumeHeight = total[1] * microns_per_pixel / 1000
    ds.ImagedVolumeDepth = 0.004
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem = "0"
    origin.YOffsetInSlideCoordinateSystem = "0"
    ds.TotalPixelMatrixOriginSequence = Sequence([origin])
    ds.ImageOrientationSlide = ["0", "-1", "0", "-1", "0", "0"]
    ds.SpecimenLabelInImage = "YES" if image_type == "LABEL" else "NO"
    ds.BurnedInAnnotation = "YES" if image_type == "LABEL" else "NO"
    ds.FocusMethod = "AUTO"
    ds.ExtendedDepthOfField = "NO"
    ds.VolumetricProperties = "VOLUME"
    ds.LossyImageCompression = "01"
    return ds


#: Encapsulated Pixel Data (PS3.5 A.4), written by hand so frames stream to the file:
#: the element with undefined length, an empty Basic Offset Table item, one item per
#: frame, the sequence delimiter.  (Readers build the frame index from the items.)
_PIXEL_DATA = b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff"
_ITEM = b"\xfe\xff\x00\xe0"
_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def _save_streaming(ds: Any, path: Path, frames: Iterator[bytes]) -> None:
    """Write ``ds`` and then its encapsulated frames one at a time (never all held)."""
    import struct

    with open(path, "wb") as f:
        ds.save_as(f, enforce_file_format=True)
        f.write(_PIXEL_DATA + _ITEM + struct.pack("<I", 0))
        for frame in frames:
            if len(frame) % 2:
                frame += b"\x00"
            f.write(_ITEM + struct.pack("<I", len(frame)) + frame)
        f.write(_END)


def write_dicom(
    tiff: Path,
    folder: Path,
    name: str,
    microns_per_pixel: float,
    label: Image.Image | None,
    uids: tuple[str, str],
) -> list[Path]:
    """Write the pyramid in ``tiff`` as a DICOM WSI series in ``folder`` (``name``-level-0.dcm,
    ... and ``name``-label.dcm); ``uids`` is (study, series); return the files written."""
    from pydicom.uid import generate_uid

    study_uid, series_uid = uids
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    reader = PyramidReader(tiff, cache_tiles=4)
    try:
        page: Any = reader.levels[0]
        tile = (int(page.tilewidth), int(page.tilelength))
        total = reader.sizes[0]
        for level, (w, h) in enumerate(reader.sizes):
            cols, rows = -(-w // tile[0]), -(-h // tile[1])
            ds = _dicom_dataset(
                generate_uid(entropy_srcs=[series_uid, str(level)]),
                series_uid,
                study_uid,
                level + 1,
                "VOLUME",
                (w, h),
                tile,
                cols * rows,
                microns_per_pixel,
                total,
            )
            path = folder / f"{name}-level-{level}.dcm"
            _save_streaming(ds, path, (_jpeg(t) for t in _tiles(reader, level)))
            written.append(path)
        if label is not None:
            rgb = np.asarray(label.convert("RGB"))
            lh, lw = rgb.shape[:2]
            ds = _dicom_dataset(
                generate_uid(entropy_srcs=[series_uid, "label"]),
                series_uid,
                study_uid,
                len(reader.sizes) + 1,
                "LABEL",
                (lw, lh),
                (lw, lh),
                1,
                microns_per_pixel,
                total,
            )
            path = folder / f"{name}-label.dcm"
            _save_streaming(ds, path, iter([_jpeg(rgb)]))
            written.append(path)
    finally:
        reader.close()
    return written


__all__ = ["write_dicom", "write_svs"]
