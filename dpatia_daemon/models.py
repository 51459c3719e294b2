"""attrs models of the IA-API payloads, and the converter that parses them.

Inbound JSON is parsed into these classes with :func:`parse`, which turns every
problem into :class:`InvalidInput` naming the offending field (``$.callbackInfo.url``),
so the HTTP layer can answer 400 with a precise body.  Unknown keys are tolerated: the
SPS adds fields between versions, and rejecting them would break a hospital on upgrade.

Shapes and choices follow ``IA-API.md``; where sources disagree, §6 there decides.
"""

from __future__ import annotations

import json
import re
import secrets
from enum import Enum, StrEnum
from typing import Any, Literal

import cattrs
from attrs import field, frozen
from cattrs.preconf.json import make_converter

JSONValue = Any


class InvalidInput(ValueError):
    """A payload does not have the shape the IA-API promises.  ``field`` is a JSON path."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class Action(StrEnum):
    """The ``action`` of a user invocation (``POST {route}``)."""

    CREATE = "create"
    MODIFY = "modify"
    DELETE = "delete"
    CANCEL = "cancel"


class InputType(StrEnum):
    """What the user selects when invoking the app (and what registration announces)."""

    WHOLE_SLIDE = "wholeSlide"
    TAGGED_POLYGON = "taggedPolygon"
    MULTI_AREA = "multiArea"


# --- geometry and results -------------------------------------------------------------


@frozen
class Point:
    """A point normalised by the image *width*: x in [0, 1], y in [0, height/width]."""

    x: float
    y: float


@frozen
class Polygon:
    points: list[Point]


@frozen
class Style:
    strokeStyle: str = "#00FF00"
    fillStyle: str | None = None
    size: int | None = None


@frozen
class Label:
    location: Point
    label: str


@frozen
class PrimitiveItem:
    """One item of a ``primitive`` result: a style and what is drawn with it."""

    style: Style = field(factory=Style)
    polygons: list[Polygon] = field(factory=list)
    polylines: list[Polygon] = field(factory=list)
    labels: list[Label] = field(factory=list)


@frozen
class RawJSON:
    """JSON text already serialised, spliced as it is into a body by :func:`dumps`.

    A large result's content (thousands of shapes, MiB) as the worker wrote it: the
    daemon sends it on without parsing and re-encoding it, which cost it seconds."""

    text: str


@frozen
class ResultPayload:
    """``data.result``: ``type`` is primitive or patchCollection; ``content`` stays JSON.

    Content is kept as JSON because both the list and the single-object primitive forms
    exist in the field (IA-API.md §2.6); :mod:`dpatia_daemon.sps.results` builds it.
    In a result read from a worker's ``result.json`` it is a :class:`RawJSON`.
    """

    type: str
    content: JSONValue = None


@frozen
class ResultData:
    # Some SPS versions send null; dpatia always sends an object (IA-API.md §6).
    context: dict[str, JSONValue] | None = None
    result: ResultPayload | None = None


@frozen
class Result:
    """A result as stored at the SPS (``ResultResponse``); ``id``/``versionId`` once stored."""

    slideId: str
    displayResult: str = ""
    displayProperties: dict[str, str | int | float] = field(factory=dict)
    applicationVersion: str | None = None
    data: ResultData = field(factory=ResultData)
    attachments: list[dict[str, JSONValue]] | None = None
    id: int | None = None
    versionId: str | None = None


# --- inbound calls --------------------------------------------------------------------


@frozen(repr=False)
class CallbackInfo:
    url: str
    token: str

    def __repr__(self) -> str:
        return f"CallbackInfo(url={self.url!r}, token=<redacted>)"


@frozen
class TaggedPolygonContent:
    polygon: Polygon
    tags: list[str] = field(factory=list)
    tagIndex: int | None = None


@frozen
class MultiAreaContent:
    polygons: list[Polygon]


@frozen
class WholeSlideInput:
    type: Literal["wholeSlide"] = "wholeSlide"


@frozen
class TaggedPolygonInput:
    content: TaggedPolygonContent
    type: Literal["taggedPolygon"] = "taggedPolygon"


@frozen
class MultiAreaInput:
    content: MultiAreaContent
    type: Literal["multiArea"] = "multiArea"


AnalysisInput = WholeSlideInput | TaggedPolygonInput | MultiAreaInput

_INPUT_CLASSES: dict[str, type] = {
    InputType.WHOLE_SLIDE.value: WholeSlideInput,
    InputType.TAGGED_POLYGON.value: TaggedPolygonInput,
    InputType.MULTI_AREA.value: MultiAreaInput,
}


@frozen
class Invocation:
    """``POST {route}``: a user's create, modify, delete or cancel.

    ``input`` is an :data:`AnalysisInput` for create, the stored :class:`Result` for
    modify and delete, and ``None`` for cancel; :func:`parse_invocation` checks that.
    """

    action: Action
    applicationId: str
    slideId: str
    callbackInfo: CallbackInfo
    context: dict[str, JSONValue] | None = None
    cancellationToken: str | None = None
    input: JSONValue = None


@frozen
class ImageNotification:
    """``POST {route}/imagenotification``: the SPS imported a new slide."""

    applicationId: str
    slideId: str
    callbackInfo: CallbackInfo
    action: Literal["newImageFiles"] = "newImageFiles"
    context: dict[str, JSONValue] | None = None
    cancellationToken: str | None = None
    input: JSONValue = None
    imageInfo: dict[str, JSONValue] | None = None


@frozen
class InputTemplate:
    type: InputType
    content: dict[str, JSONValue] | None = None


@frozen
class Registration:
    """``GET {route}``: what the SPS config page pre-fills."""

    applicationId: str
    displayName: str
    manufacturer: str
    url: str
    inputTemplate: InputTemplate
    context: dict[str, JSONValue] = field(factory=dict)


@frozen
class VersionInfo:
    """``GET {route}/info`` (and the SPS's own ``GET /info``)."""

    apiVersion: str
    softwareVersion: str


# --- the converter --------------------------------------------------------------------


def _make_converter() -> cattrs.Converter:
    conv = make_converter(forbid_extra_keys=False, omit_if_default=False)

    def strict_str(value: Any, _: type) -> str:
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {type(value).__name__}")
        return value

    def strict_int(value: Any, _: type) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"expected an integer, got {type(value).__name__}")
        return value

    def strict_float(value: Any, _: type) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"expected a number, got {type(value).__name__}")
        return float(value)

    def strict_bool(value: Any, _: type) -> bool:
        if not isinstance(value, bool):
            raise TypeError(f"expected true or false, got {type(value).__name__}")
        return value

    def json_object(value: Any, _: type) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise TypeError(f"expected an object, got {type(value).__name__}")
        return value

    def display_value(value: Any, _: type) -> str | int | float:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise TypeError("expected a string or a number")
        return value

    def strict_enum(value: Any, cls: type[Enum]) -> Enum:
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in cls)  # type: ignore[attr-defined]
            raise ValueError(f"unknown value {value!r}; expected one of {allowed}") from None

    for cls, hook in (
        (str, strict_str),
        (int, strict_int),
        (float, strict_float),
        (bool, strict_bool),
        (str | int | float, display_value),
    ):
        conv.register_structure_hook(cls, hook)
    conv.register_structure_hook_func(lambda t: t == dict[str, JSONValue], json_object)
    # Each str-based enum by its exact class: registered as Enum it would lose to the
    # str hook above (str comes first in its MRO) and let unknown actions through.
    for enum_cls in (Action, InputType):
        conv.register_structure_hook(enum_cls, strict_enum)

    def structure_input(value: Any, _: type) -> AnalysisInput:
        if not isinstance(value, dict):
            raise TypeError("expected an object")
        kind = value.get("type", InputType.WHOLE_SLIDE.value)
        cls = _INPUT_CLASSES.get(kind)
        if cls is None:
            raise ValueError(f"unknown input type {kind!r}")
        return conv.structure(value, cls)  # type: ignore[no-any-return]

    conv.register_structure_hook(AnalysisInput, structure_input)  # type: ignore[arg-type]

    # Results going *to* the SPS never carry null optional keys the SPS may not expect,
    # but data.context is always an object (IA-API.md §6).
    conv.register_unstructure_hook(
        Result,
        lambda r: {
            k: v
            for k, v in conv.unstructure_attrs_asdict(r).items()
            if v is not None or k not in ("applicationVersion", "attachments", "id", "versionId")
        },
    )
    # Content is JSON already (see ResultPayload): walking a stored result of many MiB
    # node by node cost seconds of the reactor's time per modify.
    conv.register_unstructure_hook(ResultPayload, lambda p: {"type": p.type, "content": p.content})
    conv.register_unstructure_hook(
        ResultData,
        lambda d: {
            "context": d.context or {},
            "result": None if d.result is None else conv.unstructure(d.result),
        },
    )
    return conv


converter = _make_converter()


def register_enum(cls: type[Enum]) -> None:
    """Make ``converter`` parse ``cls`` strictly (used by modules defining str enums)."""

    def strict(value: Any, _: type) -> Enum:
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in cls)
            raise ValueError(f"unknown value {value!r}; expected one of {allowed}") from None

    converter.register_structure_hook(cls, strict)


def _first_error(exc: BaseException, path: str = "$") -> tuple[str, str]:
    """Dig the first leaf error out of a cattrs exception group, with its JSON path."""
    if isinstance(exc, cattrs.BaseValidationError):
        for sub in exc.exceptions:
            note = next(iter(getattr(sub, "__notes__", []) or []), None)
            sub_path = path
            if isinstance(note, cattrs.AttributeValidationNote):
                sub_path = f"{path}.{note.name}"
            elif isinstance(note, cattrs.IterableValidationNote):
                sub_path = f"{path}[{note.index!r}]"
            return _first_error(sub, sub_path)
    if isinstance(exc, KeyError):
        # The attribute note already put the field's name on the path.
        return (f"missing required field {exc.args[0]!r}", path)
    text = str(exc) or type(exc).__name__
    return (text, path)


def parse(cls: type[Any], data: Any) -> Any:
    """Structure ``data`` into ``cls`` or raise :class:`InvalidInput` naming the field."""
    if not isinstance(data, dict):
        raise InvalidInput("the request body must be a JSON object", "$")
    try:
        return converter.structure(data, cls)
    except (cattrs.BaseValidationError, KeyError, TypeError, ValueError) as e:
        message, where = _first_error(e)
        # A missing required attribute surfaces as KeyError inside the group; make the
        # message say which field rather than echo the Python repr.
        raise InvalidInput(message, where) from None


def parse_invocation(data: Any) -> tuple[Invocation, AnalysisInput | Result | None]:
    """Parse ``POST {route}`` and the action-specific ``input`` it carries."""
    inv: Invocation = parse(Invocation, data)
    if inv.action is Action.CREATE:
        raw = inv.input if inv.input is not None else {"type": InputType.WHOLE_SLIDE.value}
        try:
            parsed: AnalysisInput = converter.structure(raw, AnalysisInput)  # type: ignore[arg-type]
        except (cattrs.BaseValidationError, KeyError, TypeError, ValueError) as e:
            message, where = _first_error(e, "$.input")
            raise InvalidInput(message, where) from None
        return inv, parsed
    if inv.action in (Action.MODIFY, Action.DELETE):
        if inv.input is None and inv.action is Action.DELETE:
            return inv, None
        try:
            result = parse(Result, inv.input)
        except InvalidInput as e:
            where = "$.input" + (e.field or "$")[1:]
            raise InvalidInput(e.message, where) from None
        return inv, result
    return inv, None


def unstructure(value: Any) -> Any:
    """Turn a model into JSON-ready data (a :class:`RawJSON` in it stays as it is:
    :func:`dumps` encodes it)."""
    return converter.unstructure(value)


def dumps(value: Any) -> bytes:
    """``json.dumps(value)`` in UTF-8, with the text of each :class:`RawJSON` in
    ``value`` spliced in where it stands."""
    raws: list[str] = []
    # A fresh nonce per call: no string of the value can be mistaken for a placeholder.
    # Drawn at the first RawJSON only: most answers have none, and each draw is a
    # getrandom() call (about 1 % of a click's samples).
    nonce = ""

    def placeholder(obj: Any) -> str:
        nonlocal nonce
        if isinstance(obj, RawJSON):
            nonce = nonce or secrets.token_hex(16)
            raws.append(obj.text)
            return f"{nonce}:{len(raws) - 1}"
        raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")

    text = json.dumps(value, default=placeholder)
    if not raws:
        return text.encode("utf-8")
    pieces = re.split(f'"{nonce}:(\\d+)"', text)
    out = [pieces[0]]
    for i in range(1, len(pieces), 2):
        out += [raws[int(pieces[i])], pieces[i + 1]]
    return "".join(out).encode("utf-8")


#: Result keys with a default: a ``null`` the SPS stores for one reads as absent.
_DEFAULTED_RESULT_KEYS = frozenset(
    {"displayResult", "displayProperties", "applicationVersion", "data", "attachments"}
)


def result_from_json(data: Any) -> Result:
    """Parse a result the SPS returned (or the fake stored).

    A little more tolerant than an inbound ``modify``: ``null`` for a field that has a
    default (``displayResult``, ``displayProperties``, ``data``, ...) reads as absent.
    Anything else that is not a result raises :class:`InvalidInput`.
    """
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if v is not None or k not in _DEFAULTED_RESULT_KEYS}
    result: Result = parse(Result, data)
    return result


__all__ = [
    "Action",
    "AnalysisInput",
    "CallbackInfo",
    "ImageNotification",
    "InputTemplate",
    "InputType",
    "InvalidInput",
    "Invocation",
    "Label",
    "MultiAreaInput",
    "Point",
    "Polygon",
    "PrimitiveItem",
    "RawJSON",
    "Registration",
    "Result",
    "ResultData",
    "ResultPayload",
    "Style",
    "TaggedPolygonInput",
    "VersionInfo",
    "WholeSlideInput",
    "converter",
    "dumps",
    "parse",
    "parse_invocation",
    "result_from_json",
    "unstructure",
]
