"""How far a model load has got, for GET /models while a model loads.

A load is a list of steps ("converting", "loading weights", "calibrating", "quantizing");
the fraction done is (steps finished + the current step's own fraction) / steps. Within a
step, the fraction comes from transformers' own progress bars (the tensors loaded, the
shards written), read through its tqdm hook for the thread that runs the load.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..threads import native_ident, native_lock

LOADING_WEIGHTS = "loading weights"


class LoadProgress:
    """Written by the loading thread, read by requests (plain attribute reads)."""

    def __init__(self) -> None:
        self.steps = [LOADING_WEIGHTS]
        self._index = 0
        self._within = 0.0

    def plan(self, steps: list[str]) -> None:
        self.steps, self._index, self._within = list(steps), 0, 0.0

    def begin(self, step: str) -> None:
        self._index, self._within = self.steps.index(step), 0.0

    def advance(self, fraction: float) -> None:
        """The current step is `fraction` done (never moves back)."""
        self._within = max(self._within, min(1.0, fraction))

    @property
    def stage(self) -> str:
        return self.steps[self._index]

    @property
    def fraction(self) -> float:
        return (self._index + self._within) / len(self.steps)


_reporters: dict[int, LoadProgress] = {}
_lock = native_lock()
_hook_installed = False


@contextmanager
def reporting(progress: LoadProgress) -> Iterator[LoadProgress]:
    """While the block runs, transformers' progress bars on this thread advance `progress`."""
    _install_hook()
    ident = native_ident()
    with _lock:
        _reporters[ident] = progress
    try:
        yield progress
    finally:
        with _lock:
            _reporters.pop(ident, None)


def _install_hook() -> None:
    global _hook_installed
    with _lock:
        if _hook_installed:
            return
        from transformers.utils import logging as hf_logging

        hf_logging.set_tqdm_hook(_hook)
        _hook_installed = True


def _hook(factory: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    bar = factory(*args, **kwargs)
    progress = _reporters.get(native_ident())
    return bar if progress is None else _ReportingBar(bar, progress)


class _ReportingBar:
    """A tqdm bar that also reports n / total to a LoadProgress."""

    def __init__(self, bar: Any, progress: LoadProgress):
        self._bar, self._progress = bar, progress
        self._done = 0

    def _report(self, n: int) -> None:
        self._done += n
        total = getattr(self._bar, "total", None)
        if total:
            self._progress.advance(self._done / total)

    def __iter__(self) -> Iterator[Any]:
        for item in self._bar:
            yield item
            self._report(1)

    def update(self, n: int = 1) -> Any:
        self._report(n)
        return self._bar.update(n)

    def __enter__(self) -> _ReportingBar:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._bar.__exit__(*exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bar, name)
