"""JSON records: the files a run writes and reads back (``results.json``, ``state.json``, a stage checkpoint's
``trainer_state.json``) as huggingface_hub strict dataclasses, the mechanism transformers' configs use.

A record is ``@strict @dataclass(kw_only=True) class X(JsonRecord)``: the field annotations are the schema (a wrong
type is refused when the record is built, in Python or from a file), a field without a default is required, a
field typed as a record (or ``tuple[record, ...]``) is read as one. ``to_json()`` writes the fields in their order,
leaving out those whose value and default are ``None``; ``from_json()`` / ``read()`` refuse a missing field, an
unknown one (unless the record names an ``EXTRA_FIELD`` that keeps them) or a wrong type with a ``ValueError``
naming the file and the field; ``write()`` is an atomic write of strict JSON (:mod:`stpp_hf.file_io`).

A module that defines records must not use ``from __future__ import annotations``: the strict checks need the
annotations as types (a string annotation would check nothing, so it is refused).
"""

import dataclasses
import json
import os
import types
import typing
from typing import Any, ClassVar, Literal, Union

from .file_io import atomic_write_json, parse_json

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true / false", dict: "an object",
               list: "a list", tuple: "a list", type(None): "null"}  # fmt: skip


def expected_value(annotation: Any, nullable: bool = True) -> str:
    """How an error message says what a field of type ``annotation`` holds ("a number or null", ...)."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = [arg for arg in typing.get_args(annotation) if nullable or arg is not type(None)]
        if float in options:  # a JSON number may be written without a fraction
            options = [arg for arg in options if arg is not int]
        return " or ".join(dict.fromkeys(expected_value(arg) for arg in options))
    if origin is Literal:
        return f"one of {list(typing.get_args(annotation))}"
    if isinstance(annotation, type) and issubclass(annotation, JsonRecord):
        return "an object"
    return _TYPE_NAMES.get(origin or annotation, str(annotation))


def _json_value(value: Any) -> Any:
    """``value`` with its records written as JSON objects and tuples as lists."""
    if isinstance(value, JsonRecord):
        return value.to_json()
    if isinstance(value, (list, tuple)):
        return [_json_value(item) for item in value]
    if isinstance(value, dict):
        return {key: _json_value(item) for key, item in value.items()}
    return value


def _records_in(annotation: Any) -> list[type]:
    """The record classes a field of type ``annotation`` may hold directly (``X`` or ``X | None``)."""
    options = (
        typing.get_args(annotation) if typing.get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    )
    return [option for option in options if isinstance(option, type) and issubclass(option, JsonRecord)]


class JsonRecord:
    """The base of a JSON record (see the module docstring); subclasses are strict ``kw_only`` dataclasses.

    Field metadata: ``"expected"`` words the expected value in error messages when its type does not say enough;
    ``"schema"``: a record class the (JSON) value is checked against and kept as it is; ``"json": False``: not
    part of the file (filled in by the reader).
    """

    RECORD_NAME: ClassVar[str] = "record"  # how error messages name the whole record
    EXTRA_FIELD: ClassVar[str | None] = None  # a dict field that keeps the file's unknown fields, in their place
    # {an earlier version's name: today's} of fields that were renamed: an older file reads in today's names
    EARLIER_NAMES: ClassVar[dict[str, str]] = {}
    # fields an earlier version wrote that this one neither reads nor writes: an older file's are skipped
    DROPPED_FIELDS: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        strings = [
            name for name, annotation in vars(cls).get("__annotations__", {}).items() if isinstance(annotation, str)
        ]
        if strings:
            raise TypeError(f"{cls.__name__}: the fields {strings} are annotated with strings, which strict checks "
                            "ignore: define records without `from __future__ import annotations`")  # fmt: skip

    @classmethod
    def required_fields(cls, data: dict) -> tuple[str, ...]:
        """The fields the JSON object ``data`` must have, none of them null (by default: those without a default)."""
        return tuple(
            item.name
            for item in dataclasses.fields(cls)
            if item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING
        )

    @classmethod
    def from_json(cls, data: Any, source: str | os.PathLike = "JSON", where: str | None = None):
        """The record of the parsed JSON ``data``; errors name ``source`` (the file) and ``where`` in it (the field
        path of this record, ``RECORD_NAME`` by default)."""
        prefix = "" if where is None else f"{where}."  # a nested record's fields are named from the top
        where = where or cls.RECORD_NAME
        if not isinstance(data, dict):
            raise ValueError(f"{source}: {where} must be an object, got {type(data).__name__}")
        data = {name: value for name, value in cls._in_todays_names(data).items() if name not in cls.DROPPED_FIELDS}
        required = cls.required_fields(data)
        missing = [name for name in required if name not in data]
        if missing:
            raise ValueError(f"{source}: {where} lacks the field(s) {missing}")
        known = {item.name: item for item in dataclasses.fields(cls) if item.metadata.get("json", True)}
        known.pop(cls.EXTRA_FIELD, None)
        values, extra = {}, {}
        for name, value in data.items():
            if name in known:
                values[name] = cls._field_from_json(known[name], value, name in required, source, where, prefix)
            elif cls.EXTRA_FIELD is not None:
                extra[name] = value
            else:
                raise ValueError(f"{source}: {where} has the unknown field {name!r} (known: {sorted(known)})")
        if cls.EXTRA_FIELD is not None:
            values[cls.EXTRA_FIELD] = extra
        return cls(**values)

    @classmethod
    def _in_todays_names(cls, data: dict) -> dict:
        """``data`` with the fields of :attr:`EARLIER_NAMES` renamed in place, unless today's name is there too."""
        renamed = {old: new for old, new in cls.EARLIER_NAMES.items() if old in data and new not in data}
        return {renamed.get(name, name): value for name, value in data.items()} if renamed else data

    @classmethod
    def _field_from_json(
        cls, item: dataclasses.Field, value: Any, required: bool, source, where: str, prefix: str
    ) -> Any:
        path = prefix + item.name
        records = _records_in(item.type)
        if records and isinstance(value, dict):
            return records[0].from_json(value, source, path)
        if typing.get_origin(item.type) is tuple and isinstance(value, list):
            (element,) = _records_in(typing.get_args(item.type)[0]) or (None,)
            if element is not None:
                return tuple(element.from_json(entry, source, f"{path}[{i}]") for i, entry in enumerate(value))
        schema = item.metadata.get("schema")
        if schema is not None and value is not None:
            schema.from_json(value, source, path)
        # a required field is never null; then the field's strict validators (its type's first), as construction
        try:
            if value is None and required:
                raise TypeError(f"{item.name} is null")
            for validator in cls.__validators__[item.name]:
                validator(value)
        except (TypeError, ValueError) as error:
            expected = item.metadata.get("expected") or expected_value(item.type, nullable=not required)
            detail = "" if isinstance(error, TypeError) else f" ({error})"
            raise ValueError(
                f"{source}: field {where}.{item.name} must be {expected}, got {value!r}{detail}"
            ) from None
        return value

    def to_json(self) -> dict:
        """The record as a JSON object: its fields in order, the extra ones in ``EXTRA_FIELD``'s place, without the
        fields whose value and default are ``None`` (an optional field not given)."""
        payload = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if item.name == self.EXTRA_FIELD:
                payload.update(_json_value(value))
            elif item.metadata.get("json", True) and not (value is None and item.default is None):
                payload[item.name] = _json_value(value)
        return payload

    @classmethod
    def read(cls, path: str | os.PathLike, advice: str = ""):
        """The record in the JSON file ``path``; a damaged file is a ``ValueError`` naming it, ending in ``advice``
        (what to do about it) when given."""
        try:
            with open(path, encoding="utf-8") as stream:
                return cls.from_json(parse_json(stream.read(), path), path)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not valid JSON ({error}){'; ' * bool(advice)}{advice}") from error
        except ValueError as error:  # a field, or parse_json's refusal of NaN
            if not advice:
                raise
            raise ValueError(f"{error}; {advice}") from error

    def write(self, path: str | os.PathLike) -> None:
        """Write the record to ``path`` atomically, as strict JSON (a NaN is refused, naming the field)."""
        atomic_write_json(path, self.to_json())


__all__ = ["JsonRecord", "expected_value"]
