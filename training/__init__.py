"""Training a ControlNet (and the demo base model) on paired data."""
