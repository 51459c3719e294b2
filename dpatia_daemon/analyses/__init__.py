"""The analysis interface: what an analysis is given, and what it returns.

An analysis is a callable ``analyse(job: AnalysisJob) -> AnalysisResult`` (or a
:class:`~dpatia_daemon.models.Result`, for full control).  It runs in a worker process,
in a thread of its own, so it may block, use numpy, call C code or sleep; it must not
touch the Twisted reactor.  ``[app] analysis`` names it: a built-in short name
(``demo``, ``tissue``) or ``package.module:callable`` (see :mod:`.loader`).

What it gets, :class:`AnalysisJob`, is read-only: ids, the input geometry, slide
metadata (``slides/{id}/info``), local paths of the slide's thumbnail, label and
downloaded WSI files (``open_slide()`` opens the WSI with OpenSlide), the job's work
folder (scratch space), its settings (the ``[<name>]`` section of the config, for
built-ins), tile access (``read_region(x, y, w, h, resolution)`` and ``tiles(resolution)``
over the SPS's DZI tiles, no download needed), the case's slides (``case_images()``),
and three callables:

* ``progress(percent, text)`` reports progress; the daemon shows it on the slide,
  throttled, so call it as often as is convenient;
* ``cancelled()`` says whether the job was cancelled;
* ``wait(seconds)`` waits up to ``seconds`` and returns True at once if the job is
  cancelled meanwhile — use it (or :meth:`AnalysisJob.sleep`) instead of
  ``time.sleep`` so cancellation is prompt.

To stop on cancellation, raise :class:`AnalysisCancelled` (``job.check_cancelled()``
and ``job.sleep()`` do).  Any other exception fails the attempt; its type and message
(cut to a few KB) become the error the pathologist sees once attempts run out.

What it returns, :class:`AnalysisResult`: the text shown in the annotation list, the
key/value table shown when it is selected, and primitive items (polygons, polylines,
labels) in width-normalised coordinates (x in [0, 1], y in [0, height/width]).  The
daemon adds ``applicationVersion`` (unless the result names the model's own) and its
own bookkeeping and stores it at the SPS,
replacing the job's progress frame.

Beside the interface, for any analysis: :mod:`.images` gives the slide as an image at
about N µm/px, from the downloaded WSI or, when there is no file, the thumbnail
(``get_image(job, SlideResolution(target_mpp=4))``); :mod:`.shapes` builds what is drawn
(:func:`rectangle`, :func:`label`, :func:`item`, re-exported here).  The built-ins:
:mod:`.demo`, and the :mod:`.tissue` package.
"""

from __future__ import annotations

import os
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from attrs import field, frozen

from ..models import Polygon, PrimitiveItem, Result, ResultData, ResultPayload, unstructure
from ..sps.results import image_size_of
from .shapes import item, label, rectangle


class NoSlideFile(Exception):
    """:meth:`AnalysisJob.open_slide` found no whole-slide image file to open."""


class NoPixels(Exception):
    """:meth:`AnalysisJob.read_region` / :meth:`AnalysisJob.tiles` could not get tiles."""


class PixelSource(typing.Protocol):
    """Where :meth:`AnalysisJob.read_region` reads (the worker's
    :class:`~dpatia_daemon.pipeline.regions.RegionReader`)."""

    def read_region(
        self,
        x: int,
        y: int,
        width: int,
        height: int,
        resolution: float | None = None,
        *,
        focal_plane: str | None = None,
        optical_path: str | None = None,
    ) -> Any:
        """A region's RGB pixels."""
        ...

    def tiles(
        self,
        resolution: float | None = None,
        *,
        focal_plane: str | None = None,
        optical_path: str | None = None,
    ) -> Iterator[Any]:
        """Every tile of a level."""
        ...


class AnalysisCancelled(Exception):
    """Raised by an analysis (or :meth:`AnalysisJob.sleep`) to stop a cancelled job."""


def _never_cancelled() -> bool:
    return False


def _no_wait(seconds: float) -> bool:
    return False


def _no_progress(percent: int, text: str) -> None:
    return None


@frozen
class AnalysisJob:
    """One job as an analysis sees it: read-only data and three callables.

    ``input`` is the IA-API input (``{"type": "wholeSlide"}``, or a taggedPolygon /
    multiArea selection with its geometry); ``slide_info`` the slide metadata known so
    far (``imageSize``, ``micronsPerPixel``, …) or None; ``context`` the app-private
    context of the request; ``work_dir`` the job's private folder.
    """

    job_id: str
    slide_id: str
    input: Mapping[str, Any]
    work_dir: str
    slide_info: Mapping[str, Any] | None = None
    context: Mapping[str, Any] = field(factory=dict)
    settings: Mapping[str, str] = field(factory=dict)
    progress: Callable[[int, str], None] = field(default=_no_progress, repr=False)
    cancelled: Callable[[], bool] = field(default=_never_cancelled, repr=False)
    wait: Callable[[float], bool] = field(default=_no_wait, repr=False)
    thumbnail_path: str | None = None
    label_path: str | None = None
    files: tuple[str, ...] = ()
    #: The slide's pixels over the SPS's DZI tiles (None: not available, e.g. a job
    #: run without the worker pipeline); see :meth:`read_region` and :meth:`tiles`.
    pixels: PixelSource | None = field(default=None, repr=False)
    #: The other slides of the case, as the SPS listed them (IA-API 1.9); None: not
    #: known (an older SPS, or the listing failed).
    case: tuple[Mapping[str, Any], ...] | None = None

    def read_region(
        self,
        x: int,
        y: int,
        width: int,
        height: int,
        resolution: float | None = None,
        *,
        focal_plane: str | None = None,
        optical_path: str | None = None,
    ) -> Any:
        """The RGB pixels (a ``numpy`` array ``(height, width, 3)``) of a region, read
        from the SPS's DZI tiles: no WSI download needed.

        ``(x, y)``: top-left in full-resolution pixels; ``(width, height)``: the size of
        the answer at ``resolution`` µm/px (None: the scan's own).  Blocking, up to 16
        tiles fetched at once; raises :class:`AnalysisCancelled` once cancelled and
        :class:`NoPixels` when the tiles cannot be had.
        """
        return self._pixel_call(
            "read_region",
            x,
            y,
            width,
            height,
            resolution,
            focal_plane=focal_plane,
            optical_path=optical_path,
        )

    def tiles(
        self,
        resolution: float | None = None,
        *,
        focal_plane: str | None = None,
        optical_path: str | None = None,
    ) -> Iterator[Any]:
        """Every DZI tile of the level for ``resolution`` µm/px, decoded, in the order
        they arrive (each a :class:`~dpatia_daemon.pipeline.regions.Tile`: ``level``,
        ``rect``, ``full`` — the full-resolution pixels it covers — and ``image``)."""
        source = self._pixels()
        try:
            yield from source.tiles(resolution, focal_plane=focal_plane, optical_path=optical_path)
        except Exception as e:
            raise self._pixel_error(e) from e

    def case_images(self) -> list[dict[str, Any]]:
        """The slides of this slide's case (``id``, ``staining``, ``block``, …; PHI
        identifiers only with ``[app] include_phi``), this one included; ``[]`` when
        the SPS does not list cases (before IA-API 1.9)."""
        return [dict(item) for item in self.case or ()]

    def _pixels(self) -> PixelSource:
        if self.pixels is None:
            raise NoPixels("no tile access for this job (no slide info or no SPS client)")
        return self.pixels

    def _pixel_call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        source = self._pixels()
        try:
            return getattr(source, name)(*args, **kwargs)
        except Exception as e:
            raise self._pixel_error(e) from e

    def _pixel_error(self, error: Exception) -> Exception:
        if type(error).__name__ == "RegionCancelled" or self.cancelled():
            return AnalysisCancelled(self.job_id)
        if isinstance(error, ValueError | NoPixels):
            return error
        return NoPixels(str(error))

    def open_slide(self) -> Any:
        """The whole-slide image opened with OpenSlide: the first downloaded file it reads.

        Raises :class:`NoSlideFile` when there is none (``[pipeline] download_wsi`` off,
        or a format OpenSlide does not know); close the slide when done (``with``).
        """
        import openslide

        for path in self.files:
            if openslide.OpenSlide.detect_format(path):
                return openslide.OpenSlide(path)
        names = ", ".join(os.path.basename(p) for p in self.files) or "none"
        raise NoSlideFile(f"no downloaded file OpenSlide can read (files: {names})")

    @property
    def image_size(self) -> tuple[int, int] | None:
        """``(width, height)`` in pixels from the slide info, if known."""
        return image_size_of(dict(self.slide_info) if self.slide_info is not None else None)

    def check_cancelled(self) -> None:
        """Raise :class:`AnalysisCancelled` if the job was cancelled."""
        if self.cancelled():
            raise AnalysisCancelled(self.job_id)

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds``, or raise :class:`AnalysisCancelled` as soon as cancelled."""
        if self.wait(seconds) or self.cancelled():
            raise AnalysisCancelled(self.job_id)


@frozen
class AnalysisResult:
    """An analysis's answer: list text, properties table, and what is drawn.

    ``items`` are primitive items (polygons, polylines, labels); ``patches`` a
    patchCollection instead (a gallery of patches the user can re-tag) — one or the
    other.  ``application_version`` (the model's version) becomes the stored
    ``applicationVersion``; unset, dpatia's version.  ``quality_control``, if set (``"QualityOk"``, ``"Rejected"`` or
    ``"NotSet"``), is stored as the slide's QC verdict (IA-API 1.10, DPAT 4.2).
    """

    display_result: str
    display_properties: Mapping[str, str | int | float] = field(factory=dict)
    items: Sequence[PrimitiveItem] = ()
    context: Mapping[str, Any] = field(factory=dict)
    patches: PatchCollection | None = None
    quality_control: str | None = None
    #: The model's version, stored as the result's ``applicationVersion`` (for
    #: traceability); None: dpatia's own version.
    application_version: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.application_version is not None and (
            not isinstance(self.application_version, str) or not self.application_version.strip()
        ):
            raise ValueError("application_version must be a non-empty string or None")
        if self.patches is not None and self.items:
            raise ValueError("an AnalysisResult has primitive items or patches, not both")
        if self.quality_control not in (None, *QC_VERDICTS):
            raise ValueError(
                f"quality_control must be one of {', '.join(QC_VERDICTS)}, "
                f"not {self.quality_control!r}"
            )

    def to_result(self, slide_id: str) -> Result:
        """The SPS result for ``slide_id`` (the daemon adds version and bookkeeping)."""
        if self.patches is not None:
            payload = ResultPayload(type="patchCollection", content=self.patches.content())
        else:
            payload = ResultPayload(
                type="primitive", content=[unstructure(item) for item in self.items]
            )
        return Result(
            slideId=slide_id,
            displayResult=self.display_result,
            displayProperties=dict(self.display_properties),
            applicationVersion=self.application_version,
            data=ResultData(context=dict(self.context), result=payload),
        )


#: The slide quality-control verdicts an analysis may return (IA-API.md §2.7).
QC_VERDICTS = ("QualityOk", "Rejected", "NotSet")


@frozen
class Patch:
    """One patch of a patchCollection: its centre (width-normalised), its tag (an index
    into the collection's ``tags``) and the value the viewer sorts patches by."""

    x: float
    y: float
    tag: int = 0
    sort_key: float = 0.0


@frozen
class PatchCollection:
    """A patchCollection result (IA-API.md §2.6): patches of ``patch_size`` pixels
    taken at ``magnification``, each with a tag from ``tags`` the user can change; the
    analysed area as ``polygons``; optional buttons (``actions``: ``{id, name,
    tooltip}``; a press arrives as a ``modify``)."""

    tags: Sequence[str]
    patches: Sequence[Patch]
    patch_size: int = 256
    magnification: float = 20.0
    description: str = ""
    polygons: Sequence[Polygon] = ()
    allow_verify: bool = True
    actions: Sequence[Mapping[str, str]] = ()

    def __attrs_post_init__(self) -> None:
        for patch in self.patches:
            if not 0 <= patch.tag < len(self.tags):
                raise ValueError(f"patch tag {patch.tag} is not an index into tags")

    def content(self) -> dict[str, Any]:
        """The ``data.result.content`` of the patchCollection."""
        return {
            "description": self.description,
            "polygons": [unstructure(p) for p in self.polygons],
            "patches": [
                {"tag": p.tag, "position": {"x": p.x, "y": p.y}, "sortKeyValue": p.sort_key}
                for p in self.patches
            ],
            "tags": list(self.tags),
            "patchSize": self.patch_size,
            "magnification": self.magnification,
            "statuses": {"allowVerify": {"value": self.allow_verify, "message": ""}},
            "actions": [
                {
                    "id": str(a.get("id", "")),
                    "state": 0,
                    "name": str(a.get("name", "")),
                    "tooltip": str(a.get("tooltip", "")),
                }
                for a in self.actions
            ],
        }


#: The type of an analysis callable.
Analysis = Callable[[AnalysisJob], AnalysisResult | Result]


def as_result(answer: object, slide_id: str) -> tuple[Result, str | None]:
    """What an analysis returned, as the SPS result for ``slide_id`` and its
    quality-control verdict; TypeError for anything but an AnalysisResult or Result."""
    if isinstance(answer, AnalysisResult):
        return answer.to_result(slide_id), answer.quality_control
    if isinstance(answer, Result):
        return answer, None
    raise TypeError(
        f"the analysis returned {type(answer).__name__}, not an AnalysisResult or Result"
    )


__all__ = [
    "Analysis",
    "AnalysisCancelled",
    "AnalysisJob",
    "AnalysisResult",
    "NoPixels",
    "NoSlideFile",
    "PixelSource",
    "Patch",
    "PatchCollection",
    "QC_VERDICTS",
    "as_result",
    "item",
    "label",
    "rectangle",
]
