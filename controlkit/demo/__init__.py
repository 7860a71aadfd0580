"""The embedded demo: the engine `controlkit demo` runs (showcase), the shipped weights (weights/), the toy
world they were trained on (toyworld/), the estimator that measures them and the recipe that rebuilds them."""
