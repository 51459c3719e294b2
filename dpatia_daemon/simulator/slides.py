"""The simulator's slides: synthetic H&E-like whole-slide images with known tissue.

:func:`load_or_generate` makes (once) and then reuses a data directory::

    <data>/manifest.json            what is there, slide metadata and the ground truth
    <data>/<slide id>/<id>.tif      a pyramidal tiled TIFF (JPEG tiles) OpenSlide reads
    <data>/<slide id>/label.jpg     the slide label (not every slide has one)
    <data>/<slide id>/<id>-tissue.png   the tissue mask, downsampled (ground truth)
    <data>/<slide id>/scan.json     scanner sidecar (only the "folder" layout)

Each slide is a few irregular tissue blobs (pink stroma with texture, or an IHC
palette) with haematoxylin nuclei painted inside them (:mod:`.nuclei`; their count is
in the ground truth) on a white background.  The blobs are polygons, so their area is
known exactly: the manifest stores each polygon (level-0 pixels and width-normalised
IA-API coordinates) and its area in mm² (from the rasterised mask, and by shoelace),
so a tissue analysis can be checked against it.

Pyramid levels halve with ceil sizes, exactly like DZI levels (:mod:`dpatia_daemon.pipeline.dzi`),
so each pyramid level *is* a DZI level.  The TIFF carries its resolution (pixels per
centimetre), which OpenSlide reports as ``openslide.mpp-x``.

Everything is seeded: the same specs give the same pixels and the same manifest.  The
manifest's ``fingerprint`` covers the specs and the generator version; a data
directory whose fingerprint or files do not match is generated again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
from attrs import asdict, field, frozen
from PIL import Image, ImageDraw, ImageFont

from ..pipeline.dzi import DZI
from . import large
from .nuclei import Nuclei, colour_of, paint_nuclei, place_nuclei

#: Bump when the generated pixels or manifest change, so old data directories regenerate.
GENERATOR_VERSION = 3
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "dpatia-sps-slides/1"

#: Pyramid levels halve until the longer side is at most this.
SMALLEST_LEVEL = 1024
#: The downsample of the stored ground-truth mask PNG.
MASK_DOWNSAMPLE = 16
TILE_SIZE = 256

Layout = Literal["single", "folder"]
#: How the slide's file is written: the generic TIFF, an Aperio SVS or a DICOM series.
FileFormat = Literal["tiff", "svs", "dicom"]


@frozen
class SlideSpec:
    """What to generate for one slide; every field feeds the fingerprint.

    ``layout`` is how ``slides/{id}/files`` serves it: ``single`` (one .tif as an
    octet-stream) or ``folder`` (the .tif with a label and a sidecar, as multipart).
    ``file_format`` other than ``tiff`` replaces what is served by a scanner format
    (:mod:`.formats`): ``svs`` one file, ``dicom`` one ``.dcm`` per level and the label
    as multipart (``layout`` is then ignored).
    """

    slide_id: str
    width: int
    height: int
    seed: int
    microns_per_pixel: float = 0.5
    stain: str = "H&E"
    layout: Layout = "single"
    label: bool = True
    blobs: int = 3
    accession_number: str = "SIM-0001"
    block: str = "A1"
    anatomy: str = "Colon"
    body_part: str = "COLON"
    exam_code: str = "PAT01"
    description: str = "Biopsy"
    priority: int = 0
    file_format: FileFormat = "tiff"


def default_specs(scale: float = 1.0) -> list[SlideSpec]:
    """The stock slide set; ``scale`` shrinks it (tests use small slides).

    Three slides: a non-tile-aligned landscape H&E served as one file, a tile-aligned
    H&E of the same case served as a multipart folder, and a portrait IHC slide of
    another case with no label whose sizes are odd and not tile-aligned; then the
    :func:`scanner_specs` (an Aperio SVS, a DICOM series).
    """

    def size(n: int, *, aligned: bool) -> int:
        value = max(64, round(n * scale))
        if aligned:
            return max(TILE_SIZE, value - value % TILE_SIZE)
        if value % TILE_SIZE == 0:
            value += 37
        return value | 1

    return [
        SlideSpec(
            slide_id="sim-colon-1",
            width=size(9000, aligned=False),
            height=size(6200, aligned=False),
            seed=101,
            blobs=3,
            accession_number="SIM-2025-0001",
            block="A1",
        ),
        SlideSpec(
            slide_id="sim-colon-2",
            width=size(8192, aligned=True),
            height=size(5120, aligned=True),
            seed=202,
            layout="folder",
            blobs=4,
            accession_number="SIM-2025-0001",
            block="A2",
        ),
        SlideSpec(
            slide_id="sim-breast-1",
            width=size(5001, aligned=False),
            height=size(7003, aligned=False),
            seed=303,
            stain="Ki-67",
            label=False,
            blobs=2,
            accession_number="SIM-2025-0002",
            block="B1",
            anatomy="Breast",
            body_part="BREAST",
            exam_code="PAT02",
            description="Core needle biopsy",
            priority=1,
        ),
        *scanner_specs(scale),
    ]


def scanner_specs(scale: float = 1.0) -> list[SlideSpec]:
    """Two more H&E slides in scanner formats: an Aperio SVS and a DICOM WSI series."""
    side = max(TILE_SIZE, round(8800 * scale))
    return [
        SlideSpec(
            slide_id="sim-svs-1",
            width=side | 1,
            height=round(side * 0.7) | 1,
            seed=404,
            blobs=2,
            file_format="svs",
            accession_number="SIM-2025-0003",
            block="C1",
        ),
        SlideSpec(
            slide_id="sim-dicom-1",
            width=side + 3,
            height=round(side * 0.8) + 5,
            seed=505,
            blobs=2,
            file_format="dicom",
            accession_number="SIM-2025-0003",
            block="C2",
        ),
    ]


@frozen
class GeneratedSlide:
    """One slide on disk, as the manifest describes it (paths relative to the data dir).

    ``files`` is what ``slides/{id}/files`` serves, as ``(file name, path)``; ``info``
    the full ``slides/{id}/info`` (PHI included; the endpoint filters it); ``truth``
    the ground truth (see :func:`load_or_generate`).
    """

    slide_id: str
    layout: Layout
    tiff: str
    files: list[tuple[str, str]]
    label: str | None
    info: dict[str, Any]
    truth: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """The manifest entry."""
        return {
            "id": self.slide_id,
            "layout": self.layout,
            "tiff": self.tiff,
            "files": [{"name": name, "path": path} for name, path in self.files],
            "label": self.label,
            "info": self.info,
            "truth": self.truth,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GeneratedSlide:
        """Read a manifest entry."""
        return cls(
            slide_id=data["id"],
            layout=data["layout"],
            tiff=data["tiff"],
            files=[(f["name"], f["path"]) for f in data["files"]],
            label=data.get("label"),
            info=data["info"],
            truth=data["truth"],
        )


@frozen
class SlideSet:
    """The generated slides in ``directory`` (an absolute path)."""

    directory: Path
    slides: list[GeneratedSlide] = field(factory=list)
    generated: bool = False

    def path(self, relative: str) -> Path:
        """The absolute path of a manifest path."""
        return self.directory / relative

    def get(self, slide_id: str) -> GeneratedSlide:
        """The slide with this id (KeyError if none)."""
        for slide in self.slides:
            if slide.slide_id == slide_id:
                return slide
        raise KeyError(slide_id)


def fingerprint(specs: list[SlideSpec]) -> str:
    """A hash of the specs and the generator version."""
    blob = json.dumps(
        {"generator": GENERATOR_VERSION, "specs": [asdict(s) for s in specs]}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def load_or_generate(directory: str | Path, specs: list[SlideSpec] | None = None) -> SlideSet:
    """Reuse the slides in ``directory`` if its manifest matches ``specs``; else generate.

    Generation writes into a sibling temporary directory and renames it into place, so
    an interrupted run never leaves a half-written set that looks complete.
    """
    specs = default_specs() if specs is None else specs
    target = Path(directory).resolve()
    wanted = fingerprint(specs)
    existing = _load(target, wanted)
    if existing is not None:
        return existing
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        # Pillow and the JPEG codec release the GIL: slides render in parallel threads.
        with ThreadPoolExecutor(max_workers=max(1, min(len(specs), os.cpu_count() or 1))) as pool:
            slides = list(pool.map(lambda spec: generate_slide(spec, scratch), specs))
        manifest = {
            "format": MANIFEST_FORMAT,
            "fingerprint": wanted,
            "slides": [s.to_json() for s in slides],
        }
        (scratch / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return SlideSet(directory=target, slides=slides, generated=True)


def _load(directory: Path, wanted: str) -> SlideSet | None:
    """The slide set in ``directory`` if its manifest has fingerprint ``wanted`` and every
    file it names exists with the recorded size; else ``None``."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("fingerprint") != wanted:
        return None
    try:
        slides = [GeneratedSlide.from_json(entry) for entry in manifest["slides"]]
    except (KeyError, TypeError):
        return None
    for slide in slides:
        for entry in slide.truth.get("fileSizes", []):
            path = directory / entry["path"]
            if not path.is_file() or path.stat().st_size != entry["size"]:
                return None
    return SlideSet(directory=directory, slides=slides)


# --- generation -----------------------------------------------------------------------

_PALETTES: dict[str, dict[str, tuple[int, int, int]]] = {
    # Eosin-pink stroma in two shades and darker fibres (nuclei: .nuclei.COLOURS).
    "H&E": {
        "light": (236, 176, 212),
        "dark": (214, 128, 178),
        "fibre": (196, 104, 160),
    },
    # A pale haematoxylin counterstain.
    "IHC": {
        "light": (198, 194, 228),
        "dark": (170, 164, 212),
        "fibre": (150, 144, 198),
    },
}
BACKGROUND = (243, 243, 241)


def _palette(stain: str) -> dict[str, tuple[int, int, int]]:
    return _PALETTES["H&E"] if stain in ("H&E", "HE") else _PALETTES["IHC"]


def _blob_polygons(spec: SlideSpec, rng: np.random.Generator) -> list[list[tuple[float, float]]]:
    """Non-overlapping irregular blobs: a radius that wobbles with a few harmonics."""
    w, h = spec.width, spec.height
    blobs: list[tuple[float, float, float]] = []  # centre and bounding radius
    polygons: list[list[tuple[float, float]]] = []
    short = min(w, h)
    attempts = 0
    while len(polygons) < spec.blobs and attempts < 2000:
        attempts += 1
        radius = short * rng.uniform(0.12, 0.22)
        harmonics = [
            (k, rng.uniform(0.03, 0.14 / k**0.5), rng.uniform(0, 2 * math.pi)) for k in range(2, 6)
        ]
        bound = radius * (1 + sum(a for _, a, _ in harmonics))
        margin = bound + short * 0.03
        if 2 * margin >= w or 2 * margin >= h:
            continue
        cx, cy = rng.uniform(margin, w - margin), rng.uniform(margin, h - margin)
        if any(math.hypot(cx - x, cy - y) < bound + r + short * 0.03 for x, y, r in blobs):
            continue
        blobs.append((cx, cy, bound))
        points = []
        for i in range(160):
            theta = 2 * math.pi * i / 160
            r = radius * (1 + sum(a * math.cos(k * theta + p) for k, a, p in harmonics))
            points.append((cx + r * math.cos(theta), cy + r * math.sin(theta)))
        polygons.append(points)
    if len(polygons) < spec.blobs:
        raise ValueError(f"{spec.slide_id}: cannot place {spec.blobs} blobs in {w}x{h}")
    return polygons


def _noise(size: tuple[int, int], cell: int, rng: np.random.Generator) -> Image.Image:
    """Smooth noise in [0, 255]: random values on a coarse grid, upsampled bicubically."""
    w, h = size
    coarse = rng.integers(0, 256, (max(2, h // cell + 2), max(2, w // cell + 2)), dtype=np.uint8)
    return (
        Image.fromarray(coarse, "L")
        .resize(((w // cell + 2) * cell, (h // cell + 2) * cell), Image.Resampling.BICUBIC)
        .crop((0, 0, w, h))
    )


def _shoelace(points: list[tuple[float, float]]) -> float:
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1], strict=True):
        area += x0 * y1 - x1 * y0
    return abs(area) / 2


def render_slide(
    spec: SlideSpec,
) -> tuple[Image.Image, Image.Image, list[list[tuple[float, float]]], Nuclei]:
    """Level 0 of a slide, its tissue mask (L, 255 = tissue), the blob polygons and the
    painted nuclei."""
    rng = np.random.default_rng(spec.seed)
    size = (spec.width, spec.height)
    colours = _palette(spec.stain)
    polygons = _blob_polygons(spec, rng)
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    for points in polygons:
        draw.polygon(points, fill=255)

    # Stroma: two shades blended by smooth noise, then finer fibre texture.  Colours
    # are pasted through masks in place: full-size copies dominate the cost otherwise.
    cell = max(8, round(40 / spec.microns_per_pixel))
    tissue = Image.new("RGB", size, colours["dark"])
    tissue.paste(colours["light"], mask=_noise(size, cell, rng))
    fibres = _noise(size, max(3, cell // 8), rng).point(lambda v: 255 if v > 170 else v // 3)
    tissue.paste(colours["fibre"], mask=fibres)
    del fibres

    image = Image.new("RGB", size, BACKGROUND)
    image.paste(tissue, mask=mask)
    del tissue
    # Nuclei last, whole and on top: each lies inside the tissue (see .nuclei).
    nuclei = place_nuclei(np.asarray(mask) > 0, 1, spec.microns_per_pixel, rng)
    paint_nuclei(image, (0, 0), nuclei, colour_of(spec.stain))
    return image, mask, polygons, nuclei


def _label_image(spec: SlideSpec) -> Image.Image:
    """A slide label: barcode-ish bars from the accession number, then readable text."""
    label = Image.new("RGB", (600, 400), (250, 250, 246))
    draw = ImageDraw.Draw(label)
    bits = "".join(f"{b:08b}" for b in hashlib.sha256(spec.accession_number.encode()).digest()[:12])
    x = 40
    for bit in bits:
        width = 5 if bit == "1" else 2
        draw.rectangle((x, 30, x + width - 1, 150), fill=(10, 10, 10))
        x += width + 2
        if x > 560:
            break
    font = ImageFont.load_default(size=34)
    small = ImageFont.load_default(size=26)
    draw.text((40, 175), spec.accession_number, fill=(0, 0, 0), font=font)
    draw.text((40, 230), f"{spec.block}  {spec.stain}", fill=(0, 0, 0), font=font)
    draw.text((40, 300), f"{spec.anatomy} — dpatia SPS simulator", fill=(60, 60, 60), font=small)
    return label


def _uid(spec: SlideSpec, what: str) -> str:
    """A deterministic DICOM UID (the 2.25 UUID-derived form)."""
    return "2.25." + str(uuid.uuid5(uuid.NAMESPACE_URL, f"dpatia-sim/{spec.slide_id}/{what}").int)


def slide_info(spec: SlideSpec) -> dict[str, Any]:
    """The full ``slides/{id}/info`` of a spec (extended and PHI fields included)."""
    return {
        "id": spec.slide_id,
        "isStreamable": True,
        "imageSize": {"width": spec.width, "height": spec.height},
        "tileSize": {"width": TILE_SIZE, "height": TILE_SIZE},
        "micronsPerPixel": spec.microns_per_pixel,
        "focalPlanes": [{"id": "0", "offsetUm": 0.0}],
        "opticalPaths": [{"id": "0", "description": "Brightfield"}],
        "storedTileFormat": {"mimeType": "image/jpeg", "extension": "jpg"},
        "availableTileFormats": [
            {"mimeType": "image/jpeg", "extension": "jpg"},
            {"mimeType": "image/png", "extension": "png"},
        ],
        "fileFormat": {"mimeType": "image/tiff"},
        "staining": {"displayName": spec.stain},
        "block": {"displayName": spec.block},
        "specimen": {"anatomy": spec.anatomy, "description": spec.description},
        "bodyPart": spec.body_part,
        "examCode": spec.exam_code,
        "examDescription": "Histopathology",
        "stationName": "DPATIA-SIM-SCANNER",
        "priority": spec.priority,
        "qualityControl": {
            "status": "NotSet",
            "versionId": str(uuid.uuid5(uuid.NAMESPACE_URL, spec.slide_id)),
        },
        "seriesInstanceUid": _uid(spec, "series"),
        "lisSlideId": f"{spec.accession_number}-{spec.block}-1",
        "accessionNumberIssuer": "SIMLIS",
        "accessionNumber": spec.accession_number,
        "studyInstanceUid": _uid(spec, f"study/{spec.accession_number}"),
        "examId": f"EX-{spec.accession_number}",
        "examDateTime": "2025-03-14T09:26:53",
        "examFreeFields": [{"Referrer": "Dr. Simulated"}],
    }


def _write_pyramid(image: Image.Image, path: Path, spec: SlideSpec) -> list[tuple[int, int]]:
    """Write ``image`` and its ceil-halved levels as a tiled JPEG TIFF; return the sizes."""
    import tifffile

    sizes: list[tuple[int, int]] = []
    level = image
    downsample = 1
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        while True:
            sizes.append(level.size)
            pixels_per_cm = 1e4 / (spec.microns_per_pixel * downsample)
            tif.write(
                np.asarray(level),
                tile=(TILE_SIZE, TILE_SIZE),
                compression="jpeg",
                compressionargs={"level": 88},
                photometric="rgb",
                resolution=(pixels_per_cm, pixels_per_cm),
                resolutionunit="CENTIMETER",
                subfiletype=0 if downsample == 1 else 1,
                description=(
                    f"dpatia SPS simulator slide {spec.slide_id}" if downsample == 1 else None
                ),
                software="dpatia",
                metadata=None,
            )
            if max(level.size) <= SMALLEST_LEVEL:
                break
            level = level.reduce(2)  # ceil sizes, like DZI
            downsample *= 2
    return sizes


def generate_slide(
    spec: SlideSpec, directory: Path, *, by_strips: bool | None = None
) -> GeneratedSlide:
    """Generate one slide's files under ``directory/<slide id>/``; return its entry.

    A slide of more than 64 Mpx (or any, with ``by_strips``) is rendered strip by strip
    from a scene (:mod:`.large`) in bounded memory; a smaller one whole.
    """
    folder = directory / spec.slide_id
    folder.mkdir(parents=True, exist_ok=True)
    rel = spec.slide_id
    tiff_name = f"{spec.slide_id}.tif"
    mm2_per_px = (spec.microns_per_pixel / 1000) ** 2
    mask_name = f"{spec.slide_id}-tissue.png"
    if by_strips if by_strips is not None else large.is_large(spec):
        rng = np.random.default_rng(spec.seed)
        polygons = _blob_polygons(spec, rng)
        scene = large.build_scene(spec, polygons, rng, _palette(spec.stain))
        sizes = large.write_large_pyramid(scene, folder / tiff_name, SMALLEST_LEVEL)
        nuclei = scene.nuclei
        tissue_px, _ = large.tissue_truth(scene)
        Image.fromarray(scene.mask).convert("L").point(lambda v: 255 if v else 0).save(
            folder / mask_name
        )
        scale, size = 1 / large.SCENE_MASK_DOWNSAMPLE, scene.mask.shape[::-1]
    else:
        image, mask, polygons, nuclei = render_slide(spec)
        sizes = _write_pyramid(image, folder / tiff_name, spec)
        del image
        tissue_px = int(np.count_nonzero(np.asarray(mask)))
        mask.reduce(MASK_DOWNSAMPLE).point(lambda v: 255 if v >= 128 else 0).save(
            folder / mask_name
        )
        scale, size = 1.0, mask.size
    regions = []
    for points in polygons:
        one = Image.new("L", size, 0)
        ImageDraw.Draw(one).polygon([(x * scale, y * scale) for x, y in points], fill=255)
        pixels = int(np.count_nonzero(np.asarray(one))) / scale**2
        regions.append(
            {
                "areaMm2": pixels * mm2_per_px,
                "polygonAreaMm2": _shoelace(points) * mm2_per_px,
                "pixels": [[round(x, 2), round(y, 2)] for x, y in points],
                "points": [
                    {"x": round(x / spec.width, 6), "y": round(y / spec.width, 6)}
                    for x, y in points
                ],
            }
        )

    label_path = None
    if spec.label:
        _label_image(spec).save(folder / "label.jpg", quality=90)
        label_path = f"{rel}/label.jpg"

    files = [(tiff_name, f"{rel}/{tiff_name}")]
    if spec.layout == "folder":
        sidecar = {
            "scanner": "dpatia SPS simulator",
            "objective": round(10 / spec.microns_per_pixel),
            "micronsPerPixel": spec.microns_per_pixel,
            "levels": [{"width": w, "height": h} for w, h in sizes],
        }
        (folder / "scan.json").write_text(json.dumps(sidecar, indent=2) + "\n")
        files.append(("scan.json", f"{rel}/scan.json"))
        if label_path is not None:
            files.append(("label.jpg", label_path))

    layout: Layout = spec.layout
    info = slide_info(spec)
    if spec.file_format != "tiff":
        files = _scanner_files(spec, folder, folder / "label.jpg" if label_path else None)
        layout = "single" if len(files) == 1 else "folder"
        if spec.file_format == "dicom":
            info["fileFormat"] = {"mimeType": "application/dicom"}
    dzi = DZI(spec.width, spec.height, TILE_SIZE, microns_per_pixel=spec.microns_per_pixel)
    truth = {
        "imageSize": {"width": spec.width, "height": spec.height},
        "micronsPerPixel": spec.microns_per_pixel,
        "tissuePixels": tissue_px,
        "tissueAreaMm2": tissue_px * mm2_per_px,
        "tissueFraction": tissue_px / (spec.width * spec.height),
        "nuclei": nuclei.count,
        "nucleiPerMm2": nuclei.count / (tissue_px * mm2_per_px) if tissue_px else 0.0,
        "mask": {"path": f"{rel}/{mask_name}", "downsample": MASK_DOWNSAMPLE},
        "pyramid": [
            {"width": w, "height": h, "dziLevel": dzi.max_level - i}
            for i, (w, h) in enumerate(sizes)
        ],
        "regions": regions,
        "fileSizes": [
            {"path": path, "size": (directory / path).stat().st_size}
            for path in sorted(
                {p for _, p in files}
                | {f"{rel}/{mask_name}"}
                | ({label_path} if label_path else set())
            )
        ],
    }
    return GeneratedSlide(
        slide_id=spec.slide_id,
        layout=layout,
        tiff=f"{rel}/{tiff_name}",
        files=files,
        label=label_path,
        info=info,
        truth=truth,
    )


def _scanner_files(
    spec: SlideSpec, folder: Path, label: Path | None
) -> list[tuple[str, str]]:
    """Write the slide's generic TIFF again in ``spec.file_format``; the files served."""
    from .formats import write_dicom, write_svs

    tiff = folder / f"{spec.slide_id}.tif"
    label_image = Image.open(label) if label is not None else None
    rel = spec.slide_id
    if spec.file_format == "svs":
        write_svs(tiff, folder / f"{spec.slide_id}.svs", spec.microns_per_pixel, label_image)
        return [(f"{spec.slide_id}.svs", f"{rel}/{spec.slide_id}.svs")]
    uids = (_uid(spec, f"study/{spec.accession_number}"), _uid(spec, "series"))
    written = write_dicom(
        tiff, folder / "dicom", spec.slide_id, spec.microns_per_pixel, label_image, uids
    )
    return [(path.name, f"{rel}/dicom/{path.name}") for path in written]


__all__ = [
    "GENERATOR_VERSION",
    "MANIFEST",
    "GeneratedSlide",
    "SlideSet",
    "SlideSpec",
    "default_specs",
    "fingerprint",
    "generate_slide",
    "load_or_generate",
    "render_slide",
    "scanner_specs",
    "slide_info",
]
