"""Training data: pair sources (manifests, folders, HF datasets), the paired dataset, computed and cached
conditions, frozen-encoder encodings and the batching order."""
