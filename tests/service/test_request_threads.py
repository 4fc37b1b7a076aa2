"""The request threads: each request goes to the thread that went idle last (service.serve.LastIdleFirst)."""

from __future__ import annotations

import threading
import time

import pytest
from waitress.task import ThreadedTaskDispatcher

from service.serve import LastIdleFirst

TIMEOUT = 10.0  # seconds: generous bounds for a busy machine, never a measured duration


class Task:
    """A Waitress task that records the thread serving it and can be held until released."""

    def __init__(self, release: threading.Event | None = None) -> None:
        """Create a task that returns at once, or once `release` is set."""
        self.release = release
        self.started = threading.Event()
        self.done = threading.Event()
        self.cancelled = False
        self.thread = ""

    def service(self) -> None:
        """Record the serving thread, wait for the release if any, then finish."""
        self.thread = threading.current_thread().name
        self.started.set()
        if self.release is not None:
            assert self.release.wait(TIMEOUT)
        self.done.set()

    def cancel(self) -> None:
        """Waitress cancels tasks still queued at shutdown."""
        self.cancelled = True


def wait_until(condition: object, timeout: float = TIMEOUT) -> None:
    """Poll a condition until it holds or fail after timeout."""
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def threads_serving_one_at_a_time(dispatcher: ThreadedTaskDispatcher, tasks: int) -> set[str]:
    """Give a started dispatcher tasks one after another, each once every thread is idle again."""
    names = set()
    for _ in range(tasks):
        wait_until(lambda: dispatcher.active_count == 0)
        task = Task()
        dispatcher.add_task(task)
        assert task.done.wait(TIMEOUT)
        names.add(task.thread)
    return names


def started(dispatcher: ThreadedTaskDispatcher, threads: int) -> ThreadedTaskDispatcher:
    """Start the dispatcher's threads and wait until each waits for work, so none takes a task on its way in."""
    dispatcher.set_thread_count(threads)
    wait_until(lambda: len(dispatcher.threads) == threads and dispatcher.active_count == 0)
    return dispatcher


def hold(dispatcher: ThreadedTaskDispatcher, count: int) -> tuple[threading.Event, list[Task]]:
    """Give the dispatcher `count` tasks that run until the returned event is set; wait until they run."""
    release = threading.Event()
    held = [Task(release) for _ in range(count)]
    for task in held:
        dispatcher.add_task(task)
    assert all(task.started.wait(TIMEOUT) for task in held)
    return release, held


@pytest.fixture
def dispatcher():
    """A LastIdleFirst dispatcher with 4 threads, shut down after the test."""
    dispatcher = started(LastIdleFirst(), 4)
    yield dispatcher
    dispatcher.shutdown(timeout=TIMEOUT)


def test_requests_one_at_a_time_stay_on_one_thread(dispatcher: LastIdleFirst) -> None:
    assert len(threads_serving_one_at_a_time(dispatcher, 12)) == 1


def test_waitress_own_dispatcher_cycles_through_its_threads() -> None:
    # the control: what LastIdleFirst replaces (if Waitress changes this, LastIdleFirst is not needed)
    dispatcher = started(ThreadedTaskDispatcher(), 4)
    try:
        assert len(threads_serving_one_at_a_time(dispatcher, 12)) == 4
    finally:
        dispatcher.shutdown(timeout=TIMEOUT)


def test_concurrent_requests_each_get_a_thread_and_the_rest_wait(dispatcher: LastIdleFirst) -> None:
    release, held = hold(dispatcher, 4)
    assert len({task.thread for task in held}) == 4
    waiting = Task()
    dispatcher.add_task(waiting)  # every thread is busy: it stays queued
    time.sleep(0.05)
    assert not waiting.started.is_set() and len(dispatcher.queue) == 1
    release.set()
    assert waiting.done.wait(TIMEOUT) and all(task.done.wait(TIMEOUT) for task in held)


def test_after_a_burst_one_of_its_threads_serves_alone(dispatcher: LastIdleFirst) -> None:
    release, burst = hold(dispatcher, 3)
    release.set()
    assert all(task.done.wait(TIMEOUT) for task in burst)
    # the fourth thread, idle longest, is the one Waitress' own dispatcher would wake
    served = threads_serving_one_at_a_time(dispatcher, 6)
    assert len(served) == 1 and served <= {task.thread for task in burst}


def test_shutdown_stops_every_thread_and_cancels_what_is_queued() -> None:
    dispatcher = started(LastIdleFirst(), 2)
    release, _ = hold(dispatcher, 2)
    queued = Task()
    dispatcher.add_task(queued)
    threading.Timer(0.1, release.set).start()
    assert dispatcher.shutdown(timeout=TIMEOUT) is True
    assert dispatcher.threads == set() and queued.cancelled and not queued.started.is_set()


def test_fewer_threads_stops_idle_ones_and_the_rest_keep_serving(dispatcher: LastIdleFirst) -> None:
    dispatcher.set_thread_count(1)
    wait_until(lambda: len(dispatcher.threads) == 1)
    release = threading.Event()
    first, second = Task(release), Task()
    dispatcher.add_task(first)
    dispatcher.add_task(second)
    assert first.started.wait(TIMEOUT)
    time.sleep(0.05)
    assert not second.started.is_set()  # one thread left: the second request waits for it
    release.set()
    assert second.done.wait(TIMEOUT) and second.thread == first.thread
