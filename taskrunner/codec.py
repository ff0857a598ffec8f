"""JSON payloads via pydantic: a task's arguments and its result.

Arguments are bound to the function's signature with defaults applied, validated
by a pydantic model built once per task, and stored as a JSON object keyed by
parameter name. The same model validates them again in the worker and rebuilds
typed values (models, datetimes, UUIDs, enums, Decimals). Results go through a
cached ``TypeAdapter`` of the return annotation. No pickle anywhere.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from typing import Any, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, PydanticUserError, TypeAdapter, create_model

from taskrunner.exceptions import ConfigurationError

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_FIRST = object()
"""Stands for a chain step's first argument (the previous result) while binding."""
_NON_FINITE = ConfigDict(ser_json_inf_nan="constants")
"""NaN and infinities are written as ``NaN``/``Infinity`` (which pydantic and Python's
``json`` read back), not as ``null`` (pydantic's default: ``x: float`` would then fail
in the worker)."""
_MODEL_CONFIG = ConfigDict(
    extra="forbid", populate_by_name=True, arbitrary_types_allowed=False, **_NON_FINITE
)
SAFE_LENGTH = 4300
"""JSON this long or shorter holds no number the decoder refuses: pydantic (like
Python's ``int``) reads at most 4,300 digits."""


def readable(encoded: str) -> bool:
    """Whether ``encoded`` surely reads back as it was written: short, and without a
    ``null`` (a model of the user's own config writes a NaN as ``null``). Anything
    else is read back once where it is written (``ValidationError`` if it cannot be),
    so what a worker or ``job.result()`` could not read fails there."""
    return len(encoded) <= SAFE_LENGTH and "null" not in encoded


class ArgsCodec:
    """Binds, validates and (de)serialises one task's arguments."""

    def __init__(self, fn: Callable[..., Any], name: str) -> None:
        self.signature = inspect.signature(fn)
        try:
            # an object whose __call__ is the task: its method's annotations
            hints = get_type_hints(fn if inspect.isroutine(fn) else type(fn).__call__)
        except NameError as exc:  # a type defined further down, or only for type checkers
            raise ConfigurationError(
                f"task {name}: cannot resolve annotations: {exc}: a task's types are "
                "resolved when it is declared, so define or import them before @tr.task "
                "(not only under `if TYPE_CHECKING:`)"
            ) from exc
        except TypeError as exc:
            raise ConfigurationError(f"task {name}: cannot resolve annotations: {exc}") from exc
        fields: dict[str, Any] = {}
        for index, param in enumerate(self.signature.parameters.values()):
            annotation: Any = hints.get(param.name, Any)
            if param.kind is inspect.Parameter.VAR_POSITIONAL:
                annotation = tuple.__class_getitem__((annotation, ...))
            elif param.kind is inspect.Parameter.VAR_KEYWORD:
                annotation = dict.__class_getitem__((str, annotation))
            default = ... if param.default is inspect.Parameter.empty else param.default
            fields[f"p{index}"] = (annotation, Field(default, alias=param.name))
        try:
            self.model: type[BaseModel] = create_model(
                f"{name}.args", __config__=_MODEL_CONFIG, **fields
            )
        except Exception as exc:
            raise ConfigurationError(f"task {name}: unsupported signature: {exc}") from exc
        self.result = ResultCodec(hints.get("return", Any))
        self._name = name
        self._fields = fields
        self._rest: type[BaseModel] | None = None
        self._positional = _plain_positional(self.signature)
        self._validate: Callable[[Any], BaseModel] | None = None
        self._to_json: Callable[..., bytes] | None = None
        self._decode_plan: list[tuple[str, str, Any]] | None = None

    def first_parameter(self) -> str:
        """The name of the first parameter, if a positional argument can fill it (a
        chain step's previous result goes there); TypeError otherwise."""
        params = list(self.signature.parameters.values())
        if not params or params[0].kind not in _POSITIONAL:
            raise TypeError(
                f"task {self._name} cannot follow another in a chain: its first parameter "
                "must take a positional argument (the previous result)"
            )
        return params[0].name

    def encode_rest(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, str]:
        """A call without its first argument (a chain step): ``(first parameter's name,
        the other arguments' JSON)``, validated like ``encode`` (TypeError if they do
        not fit, ValidationError if bad)."""
        first = self.first_parameter()
        bound = self.signature.bind(_FIRST, *args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        del values[first]
        if self._rest is None:
            rest = {k: v for k, v in self._fields.items() if k != "p0"}
            self._rest = create_model(f"{self._name}.rest", __config__=_MODEL_CONFIG, **rest)
        rest_model = self._rest
        encoded = rest_model.model_validate(values).model_dump_json(by_alias=True)
        if not readable(encoded):
            rest_model.model_validate_json(encoded)
        return first, encoded

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's arguments by name, defaults applied (TypeError if they don't fit)."""
        names = self._positional
        if names is not None and not kwargs and len(args) == len(names):
            # Every parameter filled positionally: what Signature.bind gives, without it.
            return dict(zip(names, args, strict=True))
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)

    def encode(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        """Validate a call against the signature and return its JSON (ValidationError if bad)."""
        # model_validate + model_dump_json(by_alias=True), minus their wrappers (taken
        # at first use, as those would: a model may complete after declaration).
        if self._validate is None or self._to_json is None:
            self._validate = self.model.__pydantic_validator__.validate_python
            self._to_json = self.model.__pydantic_serializer__.to_json
        model = self._validate(self.bind(args, kwargs))
        encoded = self._to_json(model, by_alias=True).decode()
        if not readable(encoded):
            self.model.model_validate_json(encoded)
        return encoded

    def decode(self, payload: str) -> tuple[list[Any], dict[str, Any]]:
        """Validate a stored payload and return positional and keyword arguments for the call."""
        model = self.model.model_validate_json(payload)
        positional: list[Any] = []
        keyword: dict[str, Any] = {}
        for field, name, kind in self._parameters():
            value = getattr(model, field)
            if kind in _POSITIONAL:
                positional.append(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                positional.extend(value)
            elif kind is inspect.Parameter.VAR_KEYWORD:
                keyword.update(value)
            else:
                keyword[name] = value
        return positional, keyword

    def _parameters(self) -> list[tuple[str, str, Any]]:
        """``(model field, parameter name, parameter kind)`` per parameter, in order
        (worked out once: ``decode`` runs for every job)."""
        if self._decode_plan is None:
            self._decode_plan = [
                (f"p{index}", param.name, param.kind)
                for index, param in enumerate(self.signature.parameters.values())
            ]
        return self._decode_plan


def _plain_positional(signature: inspect.Signature) -> tuple[str, ...] | None:
    """The parameter names when every parameter can be passed positionally and none
    is variadic (a call passing one positional argument per parameter binds by zip);
    None otherwise."""
    params = tuple(signature.parameters.values())
    if all(p.kind in _POSITIONAL for p in params):
        return tuple(p.name for p in params)
    return None


class ResultCodec:
    """Serialises a task's return value and rebuilds it into the annotated type."""

    def __init__(self, annotation: Any) -> None:
        try:
            self.adapter: TypeAdapter[Any] = TypeAdapter(annotation, config=_NON_FINITE)
        except PydanticUserError:  # a model or dataclass: its own config applies
            self.adapter = TypeAdapter(annotation)
        self._returns_none = annotation is None or annotation is type(None)
        """``-> None``: a None result is ``null`` without a trip through pydantic."""

    def encode(self, value: Any) -> str:
        """The value as stored. It is validated against the annotation first (pydantic
        would otherwise store ``"x"`` for ``-> int`` with only a warning, and
        ``job.result()`` could not rebuild it): ``ValidationError`` if it does not fit,
        ``PydanticSerializationError`` if it cannot be serialised."""
        if value is None and self._returns_none:
            return "null"
        encoded = self.adapter.dump_json(self.adapter.validate_python(value)).decode()
        if not readable(encoded):
            self.adapter.validate_json(encoded)
        return encoded

    def decode(self, payload: str) -> Any:
        return self.adapter.validate_json(payload)


def canonical_json(value: Any) -> str:
    """Stable JSON for hashing (sorted keys, no spaces); values must already be JSON-able."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
