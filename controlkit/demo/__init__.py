"""The embedded demo: the engine `controlkit demo` runs (showcase), the shipped weights (weights/), the toy
world they were trained on (toyworld/), the estimator that measures them, the recipe that rebuilds them, and the
plumbing the example scripts share (examples)."""
