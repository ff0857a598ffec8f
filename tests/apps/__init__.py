"""Taskrunner apps that tests run in worker subprocesses."""
