"""Native OS threads and a thread-safe handoff from them to a waiting greenlet or thread.

Under gevent's monkey patching, ``threading.Thread`` makes greenlets and ``queue.Queue``
is gevent's; model compute must not run on the hub and native threads must not touch
gevent primitives. So: threads come from the unpatched ``_thread`` module, the worker's
inbox is the C ``_queue.SimpleQueue`` (native locks), and events go to a greenlet through
``hub.loop.run_callback_threadsafe``, which wakes the hub from any thread.
"""

from __future__ import annotations

import collections
import importlib
import os
import sys
from _queue import Empty, SimpleQueue
from collections.abc import Callable
from typing import Any

__all__ = [
    "Channel",
    "Empty",
    "SimpleQueue",
    "gevent_active",
    "native_ident",
    "native_lock",
    "native_sleep",
    "off_hub",
    "start_native_thread",
]


def _original(module: str, name: str) -> Any:
    """`module.name` as it was before gevent's patching. Nothing is patched unless gevent's
    monkey module was imported (the gevent worker does that first), so gevent is never
    imported here only to ask: the engine runs without it (tests, benchmarks, the CLI)."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None:
        return monkey.get_original(module, name)
    return getattr(importlib.import_module(module), name)


def gevent_active() -> bool:
    """True when gevent has patched threading (we run inside a gevent worker)."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and monkey.is_module_patched("threading")


def start_native_thread(target: Callable[..., None], *args: Any) -> int:
    """Run `target(*args)` on a new OS thread, whatever gevent has patched."""
    return _original("_thread", "start_new_thread")(target, args)


class Channel:
    """One-way, unbounded event channel: any thread puts, one consumer gets.

    The consumer is the greenlet that created the channel when gevent is active
    (it waits on a gevent Event set from the hub thread), otherwise a thread
    (it waits on a native SimpleQueue).
    """

    def __init__(self) -> None:
        if gevent_active():
            from gevent import get_hub
            from gevent.event import Event

            self._hub = get_hub()
            self._event = Event()
            self._items: collections.deque = collections.deque()
        else:
            self._hub = None
            self._queue = SimpleQueue()

    def put(self, item: Any) -> None:
        """Thread-safe, never blocks."""
        if self._hub is None:
            self._queue.put(item)
            return
        self._items.append(item)
        self._hub.loop.run_callback_threadsafe(self._event.set)

    def get(self, timeout: float | None = None) -> Any:
        """Next item; raises Empty after `timeout` seconds without one."""
        if self._hub is None:
            return self._queue.get(timeout=timeout)
        while True:
            if self._items:
                return self._items.popleft()
            self._event.clear()
            if self._items:  # put() raced with clear(); its wakeup may be spurious later
                continue
            if not self._event.wait(timeout):
                raise Empty


def native_sleep(seconds: float) -> None:
    """Sleep this OS thread (under gevent, time.sleep would run a hub on it)."""
    _original("time", "sleep")(seconds)


def off_hub(function: Callable[..., Any], *args: Any) -> Any:
    """Call `function(*args)` where it cannot block the gevent hub: in the hub's thread pool
    when a greenlet calls it under gevent, else right here (no gevent, or a thread that has
    no hub: a thread of that pool, a model's engine thread). Its exception is raised here.

    At most OFF_HUB_CALLS run at once; more greenlets wait their turn (on the hub, which
    costs nothing). Each call is CPU work (parsing, tokenizing): as many at once as there
    are cores would leave none to the hub and the engine thread, and the other tasks of the
    pool (gevent resolves host names there) would wait behind them.

    Asking for the current thread's hub would make one in a thread that has none, and a
    native thread must not build gevent objects; so only a hub that exists is asked. An
    exception comes back as a value: one raised in the pool, the hub prints with its
    traceback (a refused request body is no server error, and would fill the log)."""
    if gevent_active():
        from gevent._hub_local import get_hub_if_exists

        hub = get_hub_if_exists()
        if hub is not None:
            with _calls(hub):
                done, value = hub.threadpool.apply(_outcome, (function, args))
            if not done:
                raise value
            return value
    return function(*args)


# One core for the hub and the engine thread; a core's share at least for off_hub's calls.
OFF_HUB_CALLS = max(1, len(os.sched_getaffinity(0)) - 1)
_slots: dict[Any, Any] = {}  # hub -> the gevent semaphore of its off_hub calls


def _calls(hub: Any) -> Any:
    """The semaphore of off_hub's calls on `hub`, made on its thread at the first call."""
    slots = _slots.get(hub)
    if slots is None:
        from gevent.lock import BoundedSemaphore

        slots = _slots[hub] = BoundedSemaphore(OFF_HUB_CALLS)
    return slots


def _outcome(function: Callable[..., Any], args: tuple) -> tuple[bool, Any]:
    """(True, the result) or (False, the exception) of `function(*args)`."""
    try:
        return True, function(*args)
    except Exception as exc:
        return False, exc


def native_ident() -> int:
    """The OS thread's id (under gevent, threading.get_ident names the greenlet)."""
    return _original("_thread", "get_ident")()


def native_lock() -> Any:
    """A lock that works across OS threads under gevent; hold it only for short, non-blocking
    work."""
    return _original("_thread", "allocate_lock")()
