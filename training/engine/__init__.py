"""The training engine: run setup, one loop, the recipes of ControlNet, base and VAE runs, the step math,
checkpoints and export."""
