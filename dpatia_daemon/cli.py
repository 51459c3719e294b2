"""The ``dpatia`` command: tools beside the daemon, one subcommand each.

::

    dpatia analyses [--json]                 the analyses [app] analysis can name
    dpatia analyse SLIDE_FILE [options]      run an analysis on a local slide file
    dpatia status|jobs|show|retry|cancel|purge|check-config   the operator's commands
                                             (:mod:`dpatia_daemon.admin`)

``dpatia analyse`` is the vendor's short loop: no SPS, no daemon, no simulator.  It
builds the same :class:`~dpatia_daemon.analyses.AnalysisJob` a worker gives the
analysis (metadata from the file, a thumbnail, the label where the file has one,
``open_slide()``, progress, cancellation with Ctrl-C, a region with ``--region``), runs
the configured analysis (or ``--analysis SPEC``) in a thread as a worker does, prints
progress as it goes and the result at the end, writes the result JSON exactly as the
daemon would store it at the SPS and a PNG of the result drawn on the slide, and
reports the time of each step.  Exit status: 0 done, 1 the analysis failed (its
message on stderr), 2 bad usage or a slide/analysis that cannot be loaded, 130
cancelled.

A separate program (like the demo), so it may draw with the simulator's overlay code;
nothing in the daemon imports it.  New subcommands go in :func:`parser`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import attrs
from attrs import define, field, frozen

from ._version import __version__
from .admin import add_commands as add_admin_commands
from .analyses import AnalysisCancelled, AnalysisJob, as_result
from .analyses.loader import AnalysisLoadError, installed_analyses, load_analysis
from .config import Config, ConfigError, load_config
from .jobs import job_key
from .models import InputType, unstructure
from .sps.writer import final_result
from .workers.workfolder import LABEL_STEM, RESULT_FILE, THUMBNAIL_FILE

#: Exit statuses.
OK, FAILED, USAGE, CANCELLED = 0, 1, 2, 130

#: The longest side of the thumbnail ``dpatia analyse`` makes when the file has no
#: resolution (with one: ``[pipeline] thumbnail_mpp``, as the workers fetch it).
THUMBNAIL_SIDE = 2048
#: The longest side of the picture the overlay PNG is drawn on.
PREVIEW_SIDE = 1024


class CommandError(Exception):
    """A problem the user must fix (exit status 2); the message is one line."""


# --- dpatia analyses ------------------------------------------------------------------


def _analyses(options: argparse.Namespace, out: TextIO) -> int:
    """List the built-in and installed analyses (metadata only: nothing is imported)."""
    found = installed_analyses()
    if options.json:
        out.write(json.dumps([attrs.asdict(a) for a in found], indent=2) + "\n")
        return OK
    rows = [("NAME", "TARGET", "FROM")] + [
        (a.name, a.target, a.source + (" (shadowed by the built-in)" if a.shadowed else ""))
        for a in found
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    for name, target, source in rows:
        out.write(f"{name:<{widths[0]}}  {target:<{widths[1]}}  {source}\n")
    return OK


# --- dpatia analyse -------------------------------------------------------------------


@define
class Timings:
    """How long each step took, in order."""

    steps: list[tuple[str, float]] = field(factory=list)

    def run(self, name: str, step: Callable[[], Any]) -> Any:
        """Run ``step`` and record its time under ``name``."""
        started = time.monotonic()
        try:
            return step()
        finally:
            self.steps.append((name, time.monotonic() - started))

    def line(self) -> str:
        return ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self.steps)


@frozen
class LocalSlide:
    """A slide file opened for ``dpatia analyse``: what the pipeline would have fetched."""

    slide_id: str
    path: str
    slide_info: dict[str, Any]
    thumbnail_path: str
    label_path: str | None
    #: A larger picture of the slide, for the overlay PNG.
    preview_path: str


def _open(path: str) -> Any:
    import openslide

    if not os.path.isfile(path):
        raise CommandError(f"{path}: no such file")
    try:
        if openslide.OpenSlide.detect_format(path) is None:
            raise CommandError(f"{path}: not a slide file OpenSlide reads")
        return openslide.OpenSlide(path)
    except openslide.OpenSlideError as e:
        raise CommandError(f"{path}: OpenSlide cannot read it ({e})") from None


def _mpp(slide: Any) -> float | None:
    try:
        mpp = float(slide.properties["openslide.mpp-x"])
    except (KeyError, ValueError):
        return None
    return mpp if mpp > 0 else None


def slide_info_of(slide: Any, slide_id: str) -> dict[str, Any]:
    """``slides/{id}/info`` as far as the file tells: size, resolution, vendor."""
    width, height = slide.dimensions
    info: dict[str, Any] = {"id": slide_id, "imageSize": {"width": width, "height": height}}
    mpp = _mpp(slide)
    if mpp is not None:
        info["micronsPerPixel"] = mpp
    vendor = slide.properties.get("openslide.vendor")
    if vendor:
        info["fileFormat"] = {"vendor": vendor}
    return info


def prepare_local(
    path: str,
    work_dir: Path,
    thumbnail_mpp: float,
    timings: Timings,
    label: str | None = None,
) -> LocalSlide:
    """Metadata, thumbnail and label of a local slide file, into ``work_dir``; the
    ``label`` image file is used when the slide file has none."""
    slide_id = Path(path).name.split(".")[0] or "slide"
    slide = timings.run("open", lambda: _open(path))
    try:
        info = slide_info_of(slide, slide_id)
        width, height = slide.dimensions
        mpp = _mpp(slide)
        scale = (mpp / thumbnail_mpp) if mpp is not None else THUMBNAIL_SIDE / max(width, height)
        side = max(1, min(THUMBNAIL_SIDE * 2, round(max(width, height) * min(scale, 1.0))))
        thumbnail = work_dir / THUMBNAIL_FILE
        timings.run("thumbnail", lambda: slide.get_thumbnail((side, side)).save(thumbnail))
        # The overlay is drawn on a picture big enough to read, whatever the thumbnail.
        preview = work_dir / "preview.png"
        preview_side = min(PREVIEW_SIDE, max(width, height))
        timings.run(
            "preview", lambda: slide.get_thumbnail((preview_side, preview_side)).save(preview)
        )
        label_path: str | None = None
        if "label" in slide.associated_images:
            label_file = work_dir / f"{LABEL_STEM}.png"
            timings.run("label", lambda: slide.associated_images["label"].save(label_file))
            label_path = str(label_file)
        elif label is not None:
            if not os.path.isfile(label):
                raise CommandError(f"--label {label}: no such file")
            label_path = os.path.abspath(label)
    finally:
        slide.close()
    return LocalSlide(
        slide_id, os.path.abspath(path), info, str(thumbnail), label_path, str(preview)
    )


def region_input(text: str, config: Config, image_size: tuple[int, int]) -> dict[str, Any]:
    """The IA-API input for ``--region``: ``x,y,w,h`` (width-normalised) or the path of
    a JSON polygon file (see :func:`polygons_of`); a taggedPolygon, or a multiArea when
    ``[app] input_type`` says so."""
    if os.path.isfile(text):
        polygons = polygons_of(text)
    else:
        try:
            x, y, w, h = (float(v) for v in text.split(","))
        except ValueError:
            raise CommandError(
                f"--region {text!r}: expected x,y,w,h (four numbers) or a polygon file"
            ) from None
        if w <= 0 or h <= 0:
            raise CommandError(f"--region {text!r}: width and height must be positive")
        polygons = [[(x, y), (x + w, y), (x + w, y + h), (x, y + h), (x, y)]]
    max_y = image_size[1] / image_size[0]
    for polygon in polygons:
        if any(px < 0 or py < 0 or px > 1 + 1e-9 or py > max_y + 1e-9 for px, py in polygon):
            raise CommandError(
                f"--region {text!r}: must lie inside the slide (x <= 1, y <= "
                f"{max_y:.4f}: coordinates are fractions of the width)"
            )
    shapes = [{"points": [{"x": px, "y": py} for px, py in polygon]} for polygon in polygons]
    if config.app.input_type is InputType.MULTI_AREA:
        return {"type": "multiArea", "content": {"polygons": shapes}}
    if len(shapes) != 1:
        raise CommandError(f"--region {text!r}: a taggedPolygon app takes one polygon")
    content: dict[str, Any] = {"polygon": shapes[0], "tags": list(config.app.tags)}
    if config.app.tags:
        content["tagIndex"] = 0
    return {"type": "taggedPolygon", "content": content}


def polygons_of(path: str) -> list[list[tuple[float, float]]]:
    """The polygons of a ``--region`` file, JSON in the IA-API's width-normalised frame:
    a list of ``[x, y]`` pairs or of ``{"x", "y"}`` points, ``{"points": [...]}``,
    ``{"polygons": [...]}`` (several, for multiArea apps), or a whole IA-API input as the
    SPS sends it (``{"type": "taggedPolygon", "content": {"polygon": ...}}``)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise CommandError(f"--region {path}: not a readable JSON polygon file ({e})") from None

    def points(value: Any) -> list[tuple[float, float]]:
        if isinstance(value, dict) and "points" in value:
            value = value["points"]
        if not isinstance(value, list) or len(value) < 3:
            raise ValueError("a polygon needs at least three points")
        out = []
        for point in value:
            x, y = (point["x"], point["y"]) if isinstance(point, dict) else point
            if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (x, y)):
                raise ValueError(f"not a point: {point!r}")
            out.append((float(x), float(y)))
        return out

    try:
        if isinstance(data, dict) and isinstance(data.get("content"), dict):
            data = data["content"]  # a whole IA-API input
        if isinstance(data, dict) and "polygon" in data:
            return [points(data["polygon"])]
        if isinstance(data, dict) and "polygons" in data:
            return [points(p) for p in data["polygons"]]
        return [points(data)]
    except (ValueError, TypeError, KeyError) as e:
        raise CommandError(f"--region {path}: {e}") from None


@define
class _Progress:
    """Prints progress reports from the analysis thread, with the time since start."""

    out: TextIO
    started: float
    last: tuple[int, str] | None = None
    lock: threading.Lock = field(factory=threading.Lock)

    def __call__(self, percent: Any, text: Any) -> None:
        try:
            value = max(0, min(100, int(percent)))
        except (TypeError, ValueError, OverflowError):
            value = 0
        report = (value, " ".join(str(text).split()))
        with self.lock:
            if report == self.last:
                return
            self.last = report
            elapsed = time.monotonic() - self.started
            self.out.write(f"[{elapsed:6.1f}s] {value:3d} %  {report[1]}\n")
            self.out.flush()


def _run_in_thread(
    analysis: Callable[[AnalysisJob], Any], job: AnalysisJob, cancel: threading.Event, out: TextIO
) -> Any:
    """Run the analysis in a thread, as a worker does; Ctrl-C asks it to stop."""
    outcome: dict[str, Any] = {}

    def main() -> None:
        try:
            outcome["answer"] = analysis(job)
        except BaseException as e:  # noqa: B036 - the analysis is foreign code: report all
            outcome["error"] = e

    thread = threading.Thread(target=main, name=f"analysis {job.job_id}", daemon=True)
    thread.start()
    while thread.is_alive():
        try:
            thread.join(0.2)
        except KeyboardInterrupt:
            if cancel.is_set():
                raise
            cancel.set()
            out.write("cancelling (Ctrl-C again to stop at once)\n")
            out.flush()
    if "error" in outcome:
        raise outcome["error"]
    if cancel.is_set():
        raise AnalysisCancelled(job.job_id)
    return outcome["answer"]


def _draw(thumbnail: str, stored: dict[str, Any], path: Path, width: int, title: str) -> None:
    from PIL import Image

    from .simulator.overlay import render_result_png

    with Image.open(thumbnail) as image:
        render_result_png(image.convert("RGB"), stored, path, image_width=width, title=title)


def _config(options: argparse.Namespace) -> Config:
    if options.config is None:
        return Config()
    try:
        return load_config(options.config)
    except ConfigError as e:
        raise CommandError(f"configuration error: {e}") from None


def _analyse(options: argparse.Namespace, out: TextIO) -> int:
    """``dpatia analyse``: see the module docstring."""
    config = _config(options)
    spec = options.analysis or config.app.analysis
    # The settings of a built-in are its section of the config, as the workers get them.
    settings = attrs.evolve(config, app=attrs.evolve(config.app, analysis=spec)).analysis_settings()
    timings = Timings()
    try:
        analysis = timings.run("load analysis", lambda: load_analysis(spec))
    except AnalysisLoadError as e:
        raise CommandError(str(e)) from None
    name = Path(options.slide).name.split(".")[0] or "slide"
    out_dir = Path(options.out)
    work_dir = out_dir / f"{name}.work"
    work_dir.mkdir(parents=True, exist_ok=True)
    local = prepare_local(
        options.slide, work_dir, config.pipeline.thumbnail_mpp, timings, options.label
    )
    size = local.slide_info["imageSize"]
    image_size = (int(size["width"]), int(size["height"]))
    job_input = (
        {"type": "wholeSlide"}
        if options.region is None
        else region_input(options.region, config, image_size)
    )
    cancel = threading.Event()
    started = time.monotonic()
    job = AnalysisJob(
        job_id=f"local-{local.slide_id}",
        slide_id=local.slide_id,
        input=job_input,
        work_dir=str(work_dir),
        slide_info=local.slide_info,
        settings=settings,
        progress=_Progress(out, started),
        cancelled=cancel.is_set,
        wait=cancel.wait,
        thumbnail_path=local.thumbnail_path,
        label_path=local.label_path,
        files=(local.path,),
    )
    out.write(
        f"dpatia {__version__}: analysis {spec!r} on {options.slide} "
        f"({image_size[0]} x {image_size[1]} px"
        + (
            f", {local.slide_info['micronsPerPixel']:g} µm/px"
            if "micronsPerPixel" in local.slide_info
            else ""
        )
        + ")\n"
    )
    try:
        answer = timings.run("analysis", lambda: _run_in_thread(analysis, job, cancel, out))
        result, verdict = as_result(answer, local.slide_id)
    except AnalysisCancelled:
        out.write(f"cancelled\ntime: {timings.line()}\n")
        return CANCELLED
    except BaseException as e:  # noqa: B036 - foreign code: report whatever it raised
        if isinstance(e, KeyboardInterrupt | SystemExit) and not cancel.is_set():
            raise
        sys.stderr.write(f"dpatia analyse: the analysis failed: {type(e).__name__}: {e}\n")
        out.write(f"time: {timings.line()}\n")
        return CANCELLED if isinstance(e, KeyboardInterrupt) else FAILED
    key = job_key(config.app.application_id, local.slide_id, job_input)
    stored = unstructure(final_result(result, job.job_id, local.slide_id, key=key))
    result_path = out_dir / f"{name}.{RESULT_FILE}"
    overlay_path = out_dir / f"{name}.overlay.png"
    result_path.write_text(json.dumps(stored, indent=2, allow_nan=False) + "\n")
    timings.run(
        "overlay",
        lambda: _draw(local.preview_path, stored, overlay_path, image_size[0], f"{name}: {spec}"),
    )
    out.write(f"result: {result.displayResult}\n")
    for key, value in (result.displayProperties or {}).items():
        out.write(f"    {key}: {value}\n")
    if verdict is not None:
        out.write(f"quality control: {verdict}\n")
    out.write(f"wrote {result_path} and {overlay_path}\n")
    out.write(f"time: {timings.line()}\n")
    return OK


# --- the command line -----------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    """The ``dpatia`` command line: one subparser per subcommand."""
    top = argparse.ArgumentParser(prog="dpatia", description="dpatia's command-line tools.")
    top.add_argument("--version", action="version", version=f"dpatia {__version__}")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    listing = commands.add_parser(
        "analyses", help="list the analyses [app] analysis can name (built-in and installed)"
    )
    listing.add_argument("--json", action="store_true", help="JSON instead of a table")
    listing.set_defaults(run=_analyses)

    run = commands.add_parser(
        "analyse",
        help="run an analysis on a local slide file (no SPS, no daemon)",
        description="Run an analysis on a local slide file as a worker would, and write "
        "its result JSON (as stored at the SPS) and an overlay PNG.",
    )
    run.add_argument("slide", metavar="SLIDE_FILE", help="a whole-slide image OpenSlide reads")
    run.add_argument(
        "--analysis",
        metavar="SPEC",
        help="built-in or plugin name, or module:callable "
        "(default: [app] analysis of --config, else tissue)",
    )
    run.add_argument(
        "--config", metavar="PATH", help="a dpatia.ini: [app] analysis, its settings, [pipeline]"
    )
    run.add_argument(
        "--region", metavar="X,Y,W,H|FILE", help="analyse this rectangle (fractions of the "
        "slide width, as the IA-API's coordinates), or the polygon(s) of a JSON file, as a "
        "taggedPolygon/multiArea selection"
    )
    run.add_argument(
        "--label", metavar="IMAGE", help="the slide's label image, if the file has none"
    )
    run.add_argument(
        "--out", metavar="DIR", default="dpatia-out", help="where to write (default: dpatia-out)"
    )
    run.set_defaults(run=_analyse)
    add_admin_commands(commands)
    return top


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run one ``dpatia`` subcommand; return its exit status."""
    options = parser().parse_args(argv)
    try:
        status: int = options.run(options, out or sys.stdout)
    except CommandError as e:
        sys.stderr.write(f"dpatia {options.command}: {e}\n")
        return USAGE
    return status


__all__ = ["CommandError", "main", "parser", "polygons_of", "prepare_local", "region_input", "slide_info_of"]


if __name__ == "__main__":
    sys.exit(main())
