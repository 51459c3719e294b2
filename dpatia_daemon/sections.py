"""Declaring a configuration section once: attrs fields that carry their INI parsing.

A section of ``etc/dpatia.ini`` is a frozen attrs class, and each of its keys one field
made with :func:`key`: the default, the checks of a value (attrs validators, so a
section built in code is checked as well as one read from the file) and, only where
the field's type does not say how, how the key's INI text is read (``parse``).  A
cattrs converter knows how text becomes each field type: numbers, ``true``/``false``,
stripped text, enums by value, paths, comma-separated lists, and ``X | None`` (an
empty value is None).  The class is the schema: :func:`keys` lists it,
:func:`parse_key` reads one key's text, :func:`from_strings` a whole mapping of them,
and :func:`to_strings` is the way back, for settings that travel to a worker process
as text.

Whoever uses a section declares it: :mod:`dpatia_daemon.config` the daemon's own,
an analysis its settings (``analyses/tissue/settings.py``), the pipeline what a worker
fetches.  A bad value is a :class:`BadValue`: the key and the problem in the words an
operator acts on (``must be at least 1``), never a traceback.
"""

from __future__ import annotations

import enum
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import attrs
import cattrs
from twisted.python.filepath import FilePath

T = TypeVar("T")

#: An attrs validator: ``check(instance, attribute, value)`` raises :class:`BadValue`.
Check = Callable[[Any, "attrs.Attribute[Any]", Any], None]

_PARSE = "dpatia.parse"
_BLANK_IS_DEFAULT = "dpatia.blank_is_default"


class BadValue(ValueError):
    """``key``'s value is unusable; ``problem`` says why (``[section] key: problem``)."""

    def __init__(self, key: str, problem: str, section: str | None = None):
        self.key = key
        self.problem = problem
        self.section = section
        where = f"[{section}] {key}" if section else key
        super().__init__(f"{where}: {problem}")


def key(
    default: Any = attrs.NOTHING,
    *checks: Check,
    factory: Callable[[], Any] | None = None,
    converter: Callable[[Any], Any] | None = None,
    parse: Callable[[str], Any] | None = None,
    blank_is_default: bool = False,
    repr: bool = True,
) -> Any:
    """One key of a section: its default (or ``factory``), ``checks`` of its value, a
    ``converter`` applied to every value, and ``parse`` where the key's text needs more
    than its type says (a check that reads files, say, which a value built in code
    should not pay).  With ``blank_is_default``, ``key =`` with nothing after it means
    the default instead of an error."""
    metadata = {_PARSE: parse, _BLANK_IS_DEFAULT: blank_is_default}
    return attrs.field(
        default=default if factory is None else attrs.Factory(factory),
        validator=attrs.validators.and_(*checks) if checks else None,
        converter=converter,
        metadata=metadata,
        repr=repr,
    )


# --- checks ---------------------------------------------------------------------------
# Each skips None, so the same check serves a key whose value may be unset.


def at_least(lowest: float, *, finite: bool = False) -> Check:
    """The value is ``lowest`` or more (and, with ``finite``, not infinite)."""

    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is None:
            return
        if not value >= lowest or (finite and not math.isfinite(value)):
            raise BadValue(attribute.name, f"must be at least {lowest:g}")

    return check


def at_most(highest: float) -> Check:
    """The value is ``highest`` or less."""

    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None and not value <= highest:
            raise BadValue(attribute.name, f"must be at most {highest:g}")

    return check


def greater_than(lowest: float) -> Check:
    """The value is more than ``lowest``."""

    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None and not value > lowest:
            raise BadValue(attribute.name, f"must be greater than {lowest:g}")

    return check


def not_negative(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """The value is 0 or more (NaN is not)."""
    if value is not None and not value >= 0:
        raise BadValue(attribute.name, "must not be negative")


def nonempty(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """The text is not empty."""
    if value is not None and not value:
        raise BadValue(attribute.name, "must not be empty")


def matches(pattern: str, problem: str) -> Check:
    """The whole text matches the regular expression ``pattern``; else ``problem``."""
    compiled = re.compile(pattern)

    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None and not compiled.fullmatch(value):
            raise BadValue(attribute.name, problem)

    return check


# --- text to values (cattrs) ----------------------------------------------------------


def _number(kind: type[int] | type[float]) -> Callable[[Any, Any], Any]:
    def structure(value: Any, _: Any) -> Any:
        try:
            return kind(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError):
            raise ValueError(f"{str(value).strip()!r} is not a number") from None

    return structure


def _bool(value: Any, _: Any) -> bool:
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in ("1", "yes", "true", "on"):
        return True
    if lowered in ("0", "no", "false", "off"):
        return False
    raise ValueError("must be true or false")


def _text(value: Any, _: Any) -> str:
    return str(value).strip()


def _path(value: Any, _: Any) -> FilePath[str]:
    if isinstance(value, FilePath):
        return value
    text = str(value).strip()
    if not text:
        raise ValueError("must not be empty")
    return FilePath(text)


def _comma_list(value: Any, kind: Any) -> Any:
    items = value.split(",") if isinstance(value, str) else value
    return typing.get_origin(kind)(t.strip() for t in items if t.strip())


def _enum(value: Any, kind: type[enum.Enum]) -> Any:
    try:
        return kind(value.strip() if isinstance(value, str) else value)
    except ValueError:
        raise ValueError("must be one of " + ", ".join(e.value for e in kind)) from None


def _is_optional(kind: Any) -> bool:
    return typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in (
        typing.get_args(kind)
    )


def _optional(kind: Any) -> Callable[[Any, Any], Any]:
    (inner,) = (t for t in typing.get_args(kind) if t is not type(None))

    def structure(value: Any, _: Any) -> Any:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        return _TEXT.structure(value, inner)

    return structure


def _is_text_list(kind: Any) -> bool:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    return (origin is tuple and args == (str, ...)) or (origin is frozenset and args == (str,))


_TEXT = cattrs.Converter()
_TEXT.register_structure_hook(int, _number(int))
_TEXT.register_structure_hook(float, _number(float))
_TEXT.register_structure_hook(bool, _bool)
_TEXT.register_structure_hook(str, _text)
_TEXT.register_structure_hook(FilePath, _path)
_TEXT.register_structure_hook_func(_is_text_list, _comma_list)
# StrEnum too: its class dispatch would otherwise find str before Enum.
_TEXT.register_structure_hook(enum.Enum, _enum)
_TEXT.register_structure_hook(enum.StrEnum, _enum)
_TEXT.register_structure_hook_factory(_is_optional, _optional)


# --- sections -------------------------------------------------------------------------


def _fields(section: type) -> dict[str, attrs.Attribute[Any]]:
    # resolve_types: with postponed annotations a field's type is a string until then.
    return attrs.fields_dict(attrs.resolve_types(section))


def keys(section: type) -> tuple[str, ...]:
    """The keys of ``section``, in declaration order."""
    return tuple(_fields(section))


def parse_key(section: type, name: str, text: str, *extra: Check) -> Any:
    """The value of key ``name`` of ``section`` from its INI ``text``, checked (also by
    the ``extra`` checks); :data:`attrs.NOTHING` for a blank that means the default.

    Raises :class:`BadValue` naming the key (not yet the section).
    """
    attribute = _fields(section)[name]
    if attribute.metadata.get(_BLANK_IS_DEFAULT) and isinstance(text, str) and not text.strip():
        return attrs.NOTHING
    parse = attribute.metadata.get(_PARSE)
    try:
        value = parse(text) if parse is not None else _TEXT.structure(text, attribute.type)  # type: ignore[arg-type]
        if attribute.converter is not None:
            value = attribute.converter(value)  # type: ignore[operator]
        if attribute.validator is not None:
            attribute.validator(None, attribute, value)
        for check in extra:
            check(None, attribute, value)
    except BadValue as e:
        raise BadValue(name, e.problem) from None
    except ValueError as e:
        raise BadValue(name, str(e)) from None
    return value


def build(section: type[T], values: Mapping[str, Any], *, name: str | None = None) -> T:
    """``section`` from parsed ``values`` (the rest default); checks that span keys
    raise :class:`BadValue` naming the section ``name`` when given."""
    try:
        return section(**{k: v for k, v in values.items() if v is not attrs.NOTHING})
    except BadValue as e:
        raise BadValue(e.key, e.problem, name) from None


def from_strings(section: type[T], strings: Mapping[str, Any] | None, *, name: str) -> T:
    """``section`` from a mapping of key to text (or to a value), as a worker gets it.

    Keys ``section`` does not know are ignored (the mapping may come from another
    version); a bad value raises :class:`BadValue` naming ``[name] key``.
    """
    known = _fields(section)
    values = {}
    for key_name, text in (strings or {}).items():
        if key_name in known:
            try:
                values[key_name] = parse_key(section, key_name, text)
            except BadValue as e:
                raise BadValue(e.key, e.problem, name) from None
    return build(section, values, name=name)


def to_text(value: Any) -> str:
    """A value as the INI text :func:`parse_key` reads back to it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, FilePath):
        return value.path
    if isinstance(value, tuple | frozenset):
        return ", ".join(sorted(value) if isinstance(value, frozenset) else value)
    if value is None:
        return ""
    # repr: a float's shortest text that reads back exactly (":g" keeps 6 digits).
    return repr(value) if isinstance(value, float) else str(value)


def to_strings(instance: Any) -> dict[str, str]:
    """Every key of a section instance as text (what a worker's ``--setting`` carries)."""
    return {f.name: to_text(getattr(instance, f.name)) for f in attrs.fields(type(instance))}


__all__ = [
    "BadValue",
    "Check",
    "at_least",
    "at_most",
    "build",
    "from_strings",
    "greater_than",
    "key",
    "keys",
    "matches",
    "nonempty",
    "not_negative",
    "parse_key",
    "to_strings",
    "to_text",
]
