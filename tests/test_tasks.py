"""Declaring tasks: ``@tr.task`` bare and with options, refusals at declaration."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from taskrunner import (
    ConfigurationError,
    Middleware,
    Task,
    TaskOptions,
    TaskRunner,
    UnknownOptionError,
)
from taskrunner.middleware.retry import RetryOptions
from taskrunner.middleware.timeout import TimeoutOptions

MakeRunner = Callable[..., TaskRunner]


def test_bare_decorator_makes_a_task_with_runner_defaults() -> None:
    tr = TaskRunner("redis://127.0.0.1:1/0", queue="main")

    @tr.task
    async def add(x: int, y: int) -> int:
        return x + y

    assert isinstance(add, Task)
    assert add.name == add.__wrapped__.__qualname__
    assert add.name.endswith("add")
    assert add.queue == "main"
    assert tr.registry[add.name].fn is add.fn
    assert add.definition.options_for(RetryOptions) == RetryOptions()
    assert tr.queues() == ["main"]


def test_decorator_with_options_stores_typed_options() -> None:
    tr = TaskRunner("redis://127.0.0.1:1/0")

    @tr.task(name="mail.send", queue="emails", timeout=timedelta(seconds=30), max_retries=5)
    async def send(to: str) -> str:
        return to

    assert send.name == "mail.send"
    assert send.queue == "emails"
    definition = tr.registry["mail.send"]
    assert definition.options_for(TimeoutOptions).timeout == 30.0
    assert definition.options_for(RetryOptions).max_retries == 5
    assert definition.options_for(RetryOptions).retry_delay is None
    assert tr.queues() == ["default", "emails"]


def test_unknown_option_is_refused_at_declaration_naming_it() -> None:
    tr = TaskRunner("redis://127.0.0.1:1/0")
    misspelt: dict[str, Any] = {"retires": 3}  # as a keyword, a static error
    with pytest.raises(UnknownOptionError, match="'retires'"):

        @tr.task(**misspelt)
        async def oops() -> None:
            return None

    assert tr.registry == {}
    assert issubclass(UnknownOptionError, ConfigurationError)


def test_invalid_option_value_is_refused_at_declaration() -> None:
    tr = TaskRunner("redis://127.0.0.1:1/0")
    with pytest.raises(ConfigurationError, match="max_retries"):

        @tr.task(max_retries=-1)
        async def oops() -> None:
            return None

    with pytest.raises(ConfigurationError, match="timeout"):

        @tr.task(timeout=0)
        async def oops2() -> None:
            return None


def test_middleware_owned_option_is_accepted_and_typed() -> None:
    class TagOptions(TaskOptions):
        tag: str = "none"

    class Tagging(Middleware):
        Options = TagOptions

    tr = TaskRunner("redis://127.0.0.1:1/0", middleware=[Tagging()])

    @tr.task(options={"tag": "blue"})
    async def tagged() -> None:
        return None

    assert tr.registry[tagged.name].options_for(TagOptions).tag == "blue"
    with pytest.raises(ConfigurationError):

        @tr.task(options={"tag": 3})
        async def badly_tagged() -> None:
            return None


def test_two_middleware_claiming_one_option_are_refused() -> None:
    class Clash(TaskOptions):
        timeout: float | None = None

    class Clashing(Middleware):
        Options = Clash

    with pytest.raises(ConfigurationError, match="timeout"):
        TaskRunner("redis://127.0.0.1:1/0", middleware=[Clashing()])


def test_a_type_defined_after_the_task_is_refused_saying_to_define_it_first() -> None:
    # under `from __future__ import annotations` the annotations are text until the task
    # resolves them, at its declaration: a model further down the module is not there yet
    tr = TaskRunner("redis://127.0.0.1:1/0")
    with pytest.raises(ConfigurationError, match=r"before @tr\.task") as refused:

        @tr.task
        async def make(spec: LaterSpec) -> None:  # type: ignore[name-defined]  # noqa: F821
            return None

    assert "name 'LaterSpec' is not defined" in str(refused.value)


def test_sync_function_is_refused() -> None:
    tr = TaskRunner("redis://127.0.0.1:1/0")
    with pytest.raises(ConfigurationError, match="async"):

        @tr.task  # type: ignore[arg-type]
        def sync(x: int) -> int:
            return x

    with pytest.raises(ConfigurationError, match="async"):

        @tr.task(max_retries=1)  # type: ignore[arg-type]
        def sync2(x: int) -> int:
            return x

    assert tr.registry == {}


def test_duplicate_task_name_is_refused() -> None:
    tr = TaskRunner("redis://127.0.0.1:1/0")

    @tr.task(name="same")
    async def one() -> None:
        return None

    with pytest.raises(ConfigurationError, match="same"):

        @tr.task(name="same")
        async def two() -> None:
            return None


async def test_plain_call_still_runs_the_coroutine_without_redis() -> None:
    tr = TaskRunner("redis://127.0.0.1:1/0")  # nothing listens there: no Redis involved
    calls: list[tuple[int, int]] = []

    @tr.task(max_retries=1)
    async def add(x: int, y: int) -> int:
        calls.append((x, y))
        return x + y

    assert await add(1, 2) == 3
    assert await add(x="a", y="b") == "ab"  # type: ignore[arg-type,comparison-overlap]  # no validation: a plain call
    assert calls == [(1, 2), ("a", "b")]


async def test_enqueue_before_connecting_says_how_to_connect(make_runner: MakeRunner) -> None:
    tr = make_runner()

    @tr.task
    async def noop() -> None:
        return None

    with pytest.raises(Exception, match="async with"):
        await noop.enqueue()


def test_repr_names_the_task() -> None:
    tr = TaskRunner("redis://127.0.0.1:1/0")

    @tr.task(name="r", queue="q")
    async def r() -> None:
        return None

    assert repr(r) == "Task('r', queue='q')"
