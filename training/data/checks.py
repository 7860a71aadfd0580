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
        pairs: from `load_pairs`.
        conditions_computed: a preprocessor will compute missing maps, so a pair without one is fine.
        workers: processes decoding images (1: in this process); results keep the input order either way.
        progress: show a progress bar on stderr (for `PROGRESS_MIN_PAIRS` pairs or more).
    """
    checks = _check_all(pairs, conditions_computed, workers, progress=progress)
    bad = [(pair.key, check.problems) for pair, check in zip(pairs, checks) if check.problems]
    warned = [(pair.key, check.warnings) for pair, check in zip(pairs, checks) if check.warnings]
    counts = Counter(problem_category(problem) for _, found in bad for problem in found)
    return CheckReport(pairs=len(pairs), bad=bad, warned=warned, counts=dict(counts))


def _check_all(pairs: Sequence[Pair], computed: bool, workers: int, *, progress: bool) -> list[PairCheck]:
    """`check_pair` over every pair, in order, in `workers` processes."""
    from functools import partial

    from training.data.dataset import check_pair

    check = partial(check_pair, conditions_computed=computed)
    if workers <= 1 or len(pairs) <= 1:
        results: Any = map(check, pairs)
        executor = None
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: a parent that has started torch or OpenCV threads cannot be forked safely
        executor = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        results = executor.map(check, pairs, chunksize=max(1, min(64, len(pairs) // (4 * workers))))
    if progress:
        from tqdm import tqdm

        results = tqdm(results, total=len(pairs), unit="pair", file=sys.stderr,
                       disable=len(pairs) < PROGRESS_MIN_PAIRS)
    try:
        return list(results)
    finally:
        if executor is not None:
            executor.shutdown()
