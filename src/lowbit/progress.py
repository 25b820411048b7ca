"""Progress bars (tqdm on stderr), off with ``enabled=False`` (the CLI's --quiet)."""

from __future__ import annotations

from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], *, total: int | None = None, desc: str = "", enabled: bool = True,
             unit: str = "it") -> Iterator[T]:
    if not enabled:
        yield from items
        return
    from tqdm.auto import tqdm

    yield from tqdm(items, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
