"""``@tr.task`` options: the typed keywords agree with the middleware models, values are
strict, and every configuration error is one sentence naming the task and the option."""

from __future__ import annotations

import typing
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypedDict, get_type_hints

import pydantic
import pytest

from taskrunner import ConfigurationError, Middleware, TaskOptions, TaskRunner, UnknownOptionError
from taskrunner.typed_options import TaskOptionsDict

PROBES: list[object] = [
    None,
    0,
    3,
    0.5,
    -1,
    True,
    "3",
    "until_executing",
    "while_executing",
    "until_executed",
    "reject",
    "raise",
    "reschedule",
    "forever",
    "100/m",
    "0/m",
    ["account_id"],
    timedelta(seconds=2),
    len,
    [1],
]


FORMATTED = {"rate_limit"}
"""Options typed ``str`` whose model accepts only some strings."""


def builtin_models() -> dict[str, type[TaskOptions]]:
    """Option name -> the Options model of the built-in middleware that owns it."""
    owners: dict[str, type[TaskOptions]] = {}
    for mw in TaskRunner("redis://127.0.0.1:1/0").middleware:
        if mw.Options is not None:
            owners.update(dict.fromkeys(mw.Options.model_fields, mw.Options))
    return owners


def test_the_typed_keywords_are_exactly_the_builtin_middleware_options() -> None:
    assert set(TaskOptionsDict.__annotations__) == set(builtin_models())
    assert not TaskOptionsDict.__required_keys__


@pytest.mark.parametrize("option", sorted(builtin_models()))
def test_the_typed_keyword_accepts_what_its_model_accepts(option: str) -> None:
    """For every probe value: the TypedDict's type (strictly) and the model agree."""
    model = builtin_models()[option]
    keyword = pydantic.TypeAdapter(get_type_hints(TaskOptionsDict)[option])
    for value in PROBES:
        try:
            model.model_validate({option: value}, strict=True)
            by_model = True
        except pydantic.ValidationError as exc:
            # A refused combination (on_conflict without lock) is not a refused type.
            by_model = all(not error["loc"] for error in exc.errors())
        try:
            keyword.validate_python(value, strict=True)
            by_keyword = True
        except pydantic.ValidationError:
            by_keyword = False
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        if by_keyword and not by_model and numeric and value in (-1, 0):
            continue  # a range the model checks (gt=0, ge=0) and a type cannot express
        if by_keyword and not by_model and isinstance(value, str) and option in FORMATTED:
            continue  # a format the model checks ('100/m') and a type cannot express
        assert by_model == by_keyword, (option, value, by_model, by_keyword)


async def send_invoice(order: int) -> None: ...


def sync_job() -> None: ...


def declare(tr: TaskRunner, **options: Any) -> None:
    tr.task(**options)(send_invoice)


def error_of(tr: TaskRunner, **options: Any) -> str:
    with pytest.raises(ConfigurationError) as caught:
        declare(tr, **options)
    message = str(caught.value)
    assert "\n" not in message
    assert "pydantic" not in message
    assert "errors.pydantic.dev" not in message
    assert message.startswith("task 'send_invoice': "), message
    return message


@pytest.fixture
def tr() -> TaskRunner:
    return TaskRunner("redis://127.0.0.1:1/0")


def test_a_misspelt_option_names_the_function_and_suggests_the_nearest(tr: TaskRunner) -> None:
    with pytest.raises(UnknownOptionError) as caught:
        declare(tr, timout=3)
    message = str(caught.value)
    assert message.startswith("task 'send_invoice': unknown option 'timout'")
    assert "did you mean 'timeout'?" in message
    assert "known options: name, queue, " in message
    assert tr.registry == {}


def test_an_option_with_nothing_near_lists_the_known_ones(tr: TaskRunner) -> None:
    with pytest.raises(UnknownOptionError) as caught:
        declare(tr, colour="red")
    assert "did you mean" not in str(caught.value)
    assert "max_retries" in str(caught.value)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"max_retries": "3"}, "invalid option max_retries='3': it must be a whole number"),
        ({"max_retries": True}, "invalid option max_retries=True"),
        ({"max_retries": 2.0}, "invalid option max_retries=2.0"),
        ({"timeout": "3"}, "invalid option timeout='3'"),
        ({"max_retries": -1}, "max_retries=-1: it must be 0 or more"),
        ({"lock": "forever"}, "invalid option lock='forever': input should be 'until_executing'"),
        (
            {"lock": "until_executed", "on_conflict": "reschedule"},
            "on_conflict='reschedule' cannot be used with lock='until_executed'",
        ),
        ({"on_conflict": "raise"}, "on_conflict only apply to unique jobs: also set lock="),
        ({"lock": "until_executed", "lock_ttl": 0}, "lock_ttl=0: it must be more than 0"),
        ({"lock": "until_executed", "unique_args": 3}, "unique_args=3: input should be callable"),
    ],
)
def test_a_bad_value_is_one_sentence_naming_task_and_option(
    tr: TaskRunner, options: dict[str, Any], expected: str
) -> None:
    assert expected in error_of(tr, **options)


def test_options_are_not_coerced_but_seconds_take_ints_and_timedeltas(tr: TaskRunner) -> None:
    declare(tr, timeout=3, retry_delay=timedelta(seconds=2), max_retries=None)
    [definition] = tr.registry.values()
    values = {type(v).__name__: v for v in definition.options.values()}
    assert values["TimeoutOptions"].timeout == 3.0  # type: ignore[attr-defined]
    assert values["RetryOptions"].retry_delay == 2.0  # type: ignore[attr-defined]


class AuditOptions(TaskOptions):
    audited: bool = False
    level: int = 0


class AuditTaskOptions(TypedDict, total=False):
    audited: bool
    level: int


class Audit(Middleware):
    Options = AuditOptions


def test_user_middleware_options_go_through_options_mapping() -> None:
    tr = TaskRunner("redis://127.0.0.1:1/0", middleware=[Audit()])

    @tr.task(timeout=5, options=AuditTaskOptions(audited=True, level=2))
    async def audited() -> None: ...

    assert audited.definition.options_for(AuditOptions) == AuditOptions(audited=True, level=2)
    with pytest.raises(ConfigurationError, match=r"^task 'f': invalid option level='2'"):

        @tr.task(name="f", options={"level": "2"})
        async def f() -> None: ...

    with pytest.raises(UnknownOptionError, match=r"^task 'g': unknown option 'levle'.*'level'"):

        @tr.task(name="g", options={"levle": 2})
        async def g() -> None: ...


def test_an_option_given_twice_or_name_in_options_is_refused(tr: TaskRunner) -> None:
    message = error_of(tr, timeout=1, options={"timeout": 2})
    assert "option 'timeout' is given twice" in message
    assert "name= is a keyword of @tr.task" in error_of(tr, options={"name": "x"})
    assert "options= must be a mapping" in error_of(tr, options=[("timeout", 1)])


def test_a_bad_queue_or_a_sync_function_names_the_task(tr: TaskRunner) -> None:
    assert "invalid queue name 'bad{q}'" in error_of(tr, queue="bad{q}")
    with pytest.raises(ConfigurationError, match=r"^task 'sync_job': @tr.task needs an async"):
        tr.task(typing.cast(Callable[[], typing.Awaitable[None]], sync_job))
