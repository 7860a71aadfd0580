"""Sample photos that ship offline inside installed packages (scikit-image's data set), for demos and tests."""

from __future__ import annotations

import numpy as np

#: name -> what it shows; all are in scikit-image's bundled data (no download).
SAMPLES = {
    "astronaut": "a person, upper body (512x512)",
    "coffee": "a cup of coffee on a table (400x600)",
    "chelsea": "a cat (300x451)",
    "rocket": "a rocket on its launch pad (427x640)",
    "camera": "a person with a camera, grey (512x512)",
}


def sample_photo(name: str = "astronaut") -> np.ndarray:
    """A bundled photo as RGB uint8 (H, W, 3).

    Raises:
        ValueError: unknown name (the message lists the available ones).
    """
    if name not in SAMPLES:
        raise ValueError(f"Unknown sample '{name}'. Available: {', '.join(sorted(SAMPLES))}.")
    from skimage import data

    from controlkit.image import load_image

    return load_image(getattr(data, name)())
