"""Checking paired data before training: every pair decoded fully, each problem named and counted.

    >>> from training.data.checks import check_pairs
    >>> from training.data.dataset import load_pairs
    >>> report = check_pairs(load_pairs("fill50k/prompt.json"), workers=4)
    >>> report.ok, report.pairs, report.summary()
    (False, 50000, [('missing file', 2), ('corrupt image', 1)])

One pair is checked by `training.data.dataset.check_pair` (what training would do with it, without training);
this module runs it over a dataset, in worker processes when asked, and sorts the problems into categories.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from training.data.dataset import PairCheck
    from training.data.sources import Pair

#: A problem that no other category's marker matches: an image or map that cannot be decoded.
CORRUPT = "corrupt image"
#: Problem categories in the order reports list them: (name, the text in a problem that marks it).
CATEGORIES: tuple[tuple[str, str | None], ...] = (
    ("missing file", "no such file"),
    (CORRUPT, None),
    ("size mismatch", "size mismatch"),
    ("empty caption", "empty caption"),
    ("no condition", "no condition map"),
)
#: Below this many pairs a check is quick and shows no progress bar.
PROGRESS_MIN_PAIRS = 100


@dataclass(frozen=True)
class CheckReport:
    """What `check_pairs` found.

    Attributes:
        pairs: how many pairs were checked.
        bad: (key, problems) of each unusable pair, in input order.
        warned: (key, warnings) of each pair worth a look (e.g. a blank condition map), in input order.
        counts: category -> number of problems, in the order the categories were first found.
    """

    pairs: int
    bad: list[tuple[str, list[str]]]
    warned: list[tuple[str, list[str]]]
    counts: dict[str, int]

    @property
    def ok(self) -> bool:
        """No unusable pair (warnings allowed)."""
        return not self.bad

    def summary(self) -> list[tuple[str, int]]:
        """(category, count) of the categories found, in `CATEGORIES` order."""
        return [(name, self.counts[name]) for name, _ in CATEGORIES if self.counts.get(name)]


def problem_category(problem: str) -> str:
    """The `CATEGORIES` name of one problem line from `check_pair`."""
    for name, marker in CATEGORIES:
        if marker is not None and marker in problem:
            return name
    return CORRUPT


def check_pairs(
    pairs: Sequence[Pair], *, conditions_computed: bool = False, workers: int = 1, progress: bool = False
) -> CheckReport:
    """Check every pair by decoding its files (`check_pair`), and report every bad one.

    Args:
        pairs: from `load_pairs` (a list, or shards read as they stream: each pair is read once, and at most
            `WINDOW` per worker are held at a time).
        conditions_computed: a preprocessor will compute missing maps, so a pair without one is fine.
        workers: processes decoding images (1: in this process); results keep the input order either way.
        progress: show a progress bar on stderr (for `PROGRESS_MIN_PAIRS` pairs or more).
    """
    checked = _check_all(pairs, conditions_computed, workers, progress=progress)
    bad = [(key, check.problems) for key, check in checked if check.problems]
    warned = [(key, check.warnings) for key, check in checked if check.warnings]
    counts = Counter(problem_category(problem) for _, found in bad for problem in found)
    return CheckReport(pairs=len(checked), bad=bad, warned=warned, counts=dict(counts))


#: Pairs per worker handed out at a time (a stream of shards is never read into memory whole).
WINDOW = 64


def _check_all(pairs: Sequence[Pair], computed: bool, workers: int, *, progress: bool,
               ) -> list[tuple[str, PairCheck]]:
    """(key, `check_pair`) of every pair, in order, in `workers` processes."""
    import itertools
    from functools import partial

    from training.data.dataset import check_pair

    check = partial(check_pair, conditions_computed=computed)
    executor = None
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: a parent that has started torch or OpenCV threads cannot be forked safely
        executor = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    total = getattr(pairs, "known_length", None) if not isinstance(pairs, list) else len(pairs)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="pair", file=sys.stderr, disable=total is not None and total < PROGRESS_MIN_PAIRS)
    results: list[tuple[str, PairCheck]] = []
    stream = iter(pairs)
    try:
        while window := list(itertools.islice(stream, WINDOW * max(1, workers))):
            checks = executor.map(check, window, chunksize=max(1, len(window) // (4 * workers))) if executor \
                else map(check, window)
            for pair, found in zip(window, checks):
                results.append((pair.key, found))
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if executor is not None:
            executor.shutdown()
    return results
