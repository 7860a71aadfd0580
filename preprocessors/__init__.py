"""Preprocessors: images in, ControlNet condition maps out.

    >>> from preprocessors import get_preprocessor
    >>> edges = get_preprocessor("canny")("photo.png")   # PIL RGB, white edges on black, same size

The table of entries is `PREPROCESSORS` (see `preprocessors/registry.py`); every entry keeps the contract in
`preprocessors/base.py`.
"""

from preprocessors.base import Preprocessor
from preprocessors.registry import PREPROCESSORS, PreprocessorSpec, get_preprocessor, get_spec

__all__ = ["PREPROCESSORS", "Preprocessor", "PreprocessorSpec", "get_preprocessor", "get_spec"]
