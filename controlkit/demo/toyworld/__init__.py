"""The procedural toy world: seeded ray-cast scenes of coloured solids and capsule figures with exact depth,
normals, masks, OpenPose keypoints and captions (world.py), and the resumable dataset writer (dataset.py)."""
