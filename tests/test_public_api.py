"""The public API: ``taskrunner.__all__`` is complete, sorted, and every name exists."""

from __future__ import annotations

import types

import taskrunner


def test_every_name_in_all_exists() -> None:
    for name in taskrunner.__all__:
        assert hasattr(taskrunner, name), name


def test_all_is_sorted_and_unique() -> None:
    assert taskrunner.__all__ == sorted(set(taskrunner.__all__))


def test_every_public_top_level_name_is_in_all() -> None:
    public = {
        name
        for name, value in vars(taskrunner).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public - set(taskrunner.__all__) == set()


def test_exceptions_share_one_root() -> None:
    errors = [
        value
        for value in (getattr(taskrunner, n) for n in taskrunner.__all__)
        if isinstance(value, type) and issubclass(value, BaseException)
    ]
    assert errors
    for error in errors:
        assert issubclass(error, taskrunner.TaskrunnerError), error
    tree = taskrunner.TaskrunnerError.__module__
    doc = __import__(tree, fromlist=["_"]).__doc__ or ""
    for error in errors:
        assert error.__name__ in doc, f"{error.__name__} is missing from the drawn tree"


def test_job_status_is_a_str_enum_with_the_core_values() -> None:
    values = {status.value for status in taskrunner.JobStatus}
    assert {"scheduled", "queued", "running", "succeeded", "failed", "aborted"} <= values
    succeeded: str = "succeeded"
    assert succeeded == taskrunner.JobStatus.SUCCEEDED
    assert isinstance(taskrunner.JobStatus.QUEUED, str)
