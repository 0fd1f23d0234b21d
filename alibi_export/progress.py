"""Progress bars for the long steps (validation lengths, perplexity sweeps, export, engine builds, training).

One tool for the whole package: tqdm, on stderr, with ``disable=None``, which switches a bar off when
stderr is not a terminal. A person at a terminal sees each step move; logs, pipes, CI and captured test
output get nothing from here, and stdout (tables, generated text) is never touched. Bars are cleared
when they finish (``leave=False``), so the terminal keeps only the results.
"""
from __future__ import annotations

import re
import sys

from tqdm import tqdm

__all__ = ["progress", "Steps", "on_terminal", "runner_label"]


def on_terminal() -> bool:
    """Whether bars are shown: stderr is a terminal."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def runner_label(runner) -> str:
    """A Polygraphy runner's name without the counter and time Polygraphy appends to a default name."""
    return re.sub(r"-N\d+-\S+$", "", runner.name)


def progress(iterable=None, *, desc: str, total: int | None = None, unit: str = "it",
             position: int | None = None) -> tqdm:
    """A bar over ``iterable`` (or ``total`` manual updates), shown only on a terminal."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, position=position, leave=False, disable=None,
                file=sys.stderr, dynamic_ncols=True)


class Steps:
    """A bar over the named stages of one long job, naming the stage that is running.

    ``next()`` marks the running stage done and shows the next one; ``close()`` (or leaving a
    ``with`` block) removes the bar."""

    def __init__(self, desc: str, names: tuple[str, ...]):
        self.names = names
        self.bar = progress(desc=desc, total=len(names), unit="step")
        self._show()

    def _show(self) -> None:
        if self.bar.n < len(self.names):
            self.bar.set_postfix_str(self.names[self.bar.n])

    def next(self) -> None:
        self.bar.update(1)
        self._show()

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "Steps":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
