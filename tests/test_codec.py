"""The JSON codec: arguments bound to the signature, validated, and rebuilt; results
rebuilt into the annotated return type. No Redis needed: this is the pure layer."""

from __future__ import annotations

import enum
import inspect
import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pydantic
import pytest
from pydantic import BaseModel

from taskrunner.codec import ArgsCodec, ResultCodec, canonical_json
from taskrunner.exceptions import ConfigurationError


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Address(BaseModel):
    street: str
    number: int


class Person(BaseModel):
    name: str
    born: datetime
    addresses: list[Address]


async def rich(
    person: Person,
    when: datetime,
    ident: uuid.UUID,
    color: Color,
    level: Level,
    amount: Decimal,
    nested: dict[str, list[dict[str, int]]],
) -> Person:
    return person


async def shapes(
    a: int, /, b: str, *args: float, c: bool, d: int = 7, **kwargs: Decimal
) -> dict[str, Any]:
    return {}


def round_trip(fn: Any, *args: Any, **kwargs: Any) -> tuple[list[Any], dict[str, Any]]:
    codec = ArgsCodec(fn, fn.__name__)
    payload = codec.encode(args, kwargs)
    json.loads(payload)  # it is plain JSON
    return codec.decode(payload)


def test_rich_types_round_trip_to_equal_typed_values() -> None:
    when = datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=timezone(timedelta(hours=2)))
    person = Person(
        name="Ada",
        born=datetime(1815, 12, 10, tzinfo=UTC),
        addresses=[Address(street="x", number=1)],
    )
    ident = uuid.uuid4()
    nested = {"a": [{"x": 1}, {"y": 2}], "b": []}
    args, kwargs = round_trip(
        rich, person, when, ident, Color.BLUE, Level.HIGH, Decimal("1.10"), nested
    )
    assert kwargs == {}
    assert args == [person, when, ident, Color.BLUE, Level.HIGH, Decimal("1.10"), nested]
    assert isinstance(args[0], Person)
    assert isinstance(args[0].addresses[0], Address)
    assert args[1].utcoffset() == timedelta(hours=2)
    assert isinstance(args[2], uuid.UUID)
    assert args[3] is Color.BLUE
    assert args[4] is Level.HIGH
    assert isinstance(args[5], Decimal)
    assert str(args[5]) == "1.10"  # Decimal precision kept, not a float


def test_parameter_kinds_and_defaults_rebuild_the_same_call() -> None:
    args, kwargs = round_trip(shapes, 1, "b", 1.5, 2.5, c=True, e=Decimal("3.3"))
    assert args == [1, "b", 1.5, 2.5]
    assert kwargs == {"c": True, "d": 7, "e": Decimal("3.3")}


def test_keyword_arguments_given_positionally_and_by_name_agree() -> None:
    async def f(x: int, y: int = 2) -> int:
        return x + y

    assert round_trip(f, 1, 3) == round_trip(f, x=1, y=3) == ([1, 3], {})
    assert round_trip(f, 1) == ([1, 2], {})


def test_binding_every_parameter_positionally_matches_signature_bind() -> None:
    async def f(x: int, y: str = "d", /, z: float = 1.0) -> None:
        return None

    async def none() -> None:
        return None

    codec = ArgsCodec(f, "f")
    for args, kwargs in [((1, "a", 2.0), {}), ((1,), {}), ((1, "a"), {"z": 3.0})]:
        expected = inspect.signature(f).bind(*args, **kwargs)
        expected.apply_defaults()
        assert codec.bind(args, kwargs) == dict(expected.arguments)
    assert codec.encode((1, "a", 2), {}) == '{"x":1,"y":"a","z":2.0}'
    assert ArgsCodec(none, "none").encode((), {}) == "{}"
    with pytest.raises(TypeError):
        ArgsCodec(none, "none").encode((1,), {})


def test_strings_are_coerced_like_pydantic_validation() -> None:
    async def f(when: datetime, n: int) -> None:
        return None

    args, _ = round_trip(f, "2024-01-02T03:04:05+00:00", "5")
    assert args == [datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), 5]


def test_wrong_type_raises_validation_error_naming_the_parameter() -> None:
    codec = ArgsCodec(shapes, "shapes")
    with pytest.raises(pydantic.ValidationError) as info:
        codec.encode((1, "b"), {"c": "not-a-bool"})
    assert "c" in str(info.value)


def test_wrong_arity_raises_type_error() -> None:
    codec = ArgsCodec(shapes, "shapes")
    with pytest.raises(TypeError):
        codec.encode((), {})

    async def two(x: int, /, y: int, *, z: int = 0) -> None:
        return None

    strict = ArgsCodec(two, "two")
    with pytest.raises(TypeError):
        strict.encode((1, 2, 3), {})
    with pytest.raises(TypeError):
        strict.encode((), {"x": 1, "y": 2})  # positional-only given by name
    with pytest.raises(TypeError):
        strict.encode((1, 2), {"nope": 3})


def test_payload_with_unknown_field_is_refused_by_the_worker_side() -> None:
    async def f(x: int) -> None:
        return None

    codec = ArgsCodec(f, "f")
    with pytest.raises(pydantic.ValidationError):
        codec.decode('{"x": 1, "surprise": 2}')
    with pytest.raises(pydantic.ValidationError):
        codec.decode('{"x": "nope"}')


def test_unannotated_parameters_accept_any_json() -> None:
    async def f(x, y=None):  # type: ignore[no-untyped-def]
        return x

    assert round_trip(f, {"a": [1, 2]}) == ([{"a": [1, 2]}, None], {})


def test_unresolvable_annotation_is_a_configuration_error() -> None:
    async def f(x: NoSuchType) -> None:  # type: ignore[name-defined]  # noqa: F821
        return None

    with pytest.raises(ConfigurationError, match="cannot resolve"):
        ArgsCodec(f, "f")


def test_result_rebuilt_into_annotated_type() -> None:
    codec = ArgsCodec(rich, "rich").result
    person = Person(name="Ada", born=datetime(2000, 1, 1, tzinfo=UTC), addresses=[])
    decoded = codec.decode(codec.encode(person))
    assert isinstance(decoded, Person)
    assert decoded == person

    as_dict = ResultCodec(dict[str, Decimal])
    assert as_dict.decode(as_dict.encode({"a": Decimal("0.1")})) == {"a": Decimal("0.1")}
    untyped = ResultCodec(Any)
    assert untyped.decode(untyped.encode([1, "x", None])) == [1, "x", None]


def test_canonical_json_is_stable() -> None:
    assert canonical_json({"b": 1, "a": [1, 2]}) == '{"a":[1,2],"b":1}'
