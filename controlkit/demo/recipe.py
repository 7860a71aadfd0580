"""How the embedded demo's models are made, step by step (docs/demo.md lists the same commands).

    python -m controlkit.demo.recipe data               # toy-world datasets under runs/demo/data
    python -m controlkit.demo.recipe init               # the demo architecture with random weights: runs/demo/init
    controlkit train training/configs/demo_vae.toml   # then demo_base.toml, demo_canny.toml ... demo_normal.toml
    python -m controlkit.demo.recipe geometry           # the depth/normal/pose estimator that measures those three
    python -m controlkit.demo.recipe pack               # runs/demo -> controlkit/demo (float16 safetensors)
    python -m controlkit.demo.recipe all                # every step above, in order
    python -m controlkit.demo.recipe unpack             # the shipped base -> runs/demo/base/model (float32), to
                                                        # train one ControlNet again without the base's 40 min

Every step is seeded; the trainings run with the shipped configs (training/configs/demo_*.toml), whose paths
are relative to the repository root (run from there).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from controlkit.errors import ControlkitError

DATA_ROOT = Path("runs/demo/data")
RUNS_ROOT = Path("runs/demo")
PACKAGE_ROOT = Path(__file__).resolve().parent / "weights"
#: The shipped training configs (training/configs/demo_*.toml).
CONFIGS = Path(importlib.util.find_spec("training").origin).parent / "configs"
#: Folder under DATA_ROOT -> (toy-world kind, condition written, samples). Every folder uses seed 0, so the
#: scene folders hold the same scenes with different condition maps.
DATASETS = {
    "scenes": ("scene", "none", 8000),
    "scenes_depth": ("scene", "depth", 4000),
    "scenes_normal": ("scene", "normal", 4000),
    "figures": ("figure", "pose", 4000),
    "figures_anywhere": ("figure_anywhere", "pose", 4000),
    "circles": ("circles", "outline", 1000),
}
#: Folders whose images (with captions) train the VAE and the base model: manifest DATA_ROOT / "base.jsonl".
BASE_FOLDERS = ("scenes", "figures", "circles")
CONDITIONS = ("canny", "lineart", "softedge", "pose", "depth", "normal", "scribble", "tile", "shuffle", "inpaint")
TRAININGS = ("vae", "base") + CONDITIONS


def write_data(root: Path = DATA_ROOT) -> Path:
    """Render every dataset (resumable) and the base manifest; returns the manifest's path."""
    from controlkit.demo.toyworld.dataset import write_dataset

    records = []
    for name, (kind, condition, count) in DATASETS.items():
        start = time.perf_counter()
        manifest = write_dataset(root / name, count, kind=kind, condition=condition, size=64, seed=0)
        print(f"{name}: {count} {kind} samples ({condition}) in {time.perf_counter() - start:.0f} s")
        if name in BASE_FOLDERS:
            for line in manifest.read_text(encoding="utf-8").splitlines():
                record = json.loads(line)
                records.append({"image": f"{name}/{record['image']}", "prompt": record["prompt"]})
    path = root / "base.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def write_init(output: Path = RUNS_ROOT / "init") -> Path:
    """The demo architecture (controlkit.tiny.DEMO_CONFIG) with seeded random weights, as a diffusers folder."""
    from controlkit.tiny import DEMO_CONFIG, build_components, save_components

    return save_components(build_components(DEMO_CONFIG, seed=0), output)


def unpack(package: Path = PACKAGE_ROOT, runs: Path = RUNS_ROOT) -> Path:
    """The shipped base as the trainings' `model.base` (runs/demo/base/model, float32): the ControlNet configs
    then run from a fresh clone without training the base first. Its weights are the shipped float16 ones."""
    import torch

    from controlkit.pipeline import load_base

    target = runs / "base" / "model"
    load_base(package / "base", torch_dtype=torch.float32).save_pretrained(target, safe_serialization=True)
    return target


def run_training(name: str) -> None:
    """`controlkit train training/configs/demo_<name>.toml`, in this process."""
    from training.config import load_config
    from training.engine.trainer import train

    start = time.perf_counter()
    result = train(load_config(CONFIGS / f"demo_{name}.toml"))
    if result.output is None:
        raise ControlkitError(f"training {name} stopped at step {result.step} (signal {result.stopped_by})")
    print(f"{name}: {result.step} steps in {time.perf_counter() - start:.0f} s -> {result.output}")


def pack(runs: Path = RUNS_ROOT, package: Path = PACKAGE_ROOT, controlnets: Sequence[str] | None = None) -> None:
    """Copy the trained models into the package in float16: base/, controlnets/<condition>/, geometry/; with
    `controlnets`, only those ControlNets (one retrained on the unpacked base)."""
    import shutil

    import torch
    from diffusers import UNet2DModel

    from controlkit.checkpoint import load_controlnet, save_controlnet
    from controlkit.demo.showcase import DEMO_GUIDANCE, DEMO_STEPS
    from controlkit.pipeline import load_base
    from controlkit.sd_pipelines import write_recorded_settings

    if controlnets is None:
        base = load_base(runs / "base" / "model", torch_dtype=torch.float16)
        shutil.rmtree(package / "base", ignore_errors=True)
        base.save_pretrained(package / "base", safe_serialization=True)
        # the settings the demo base generates with (steps, guidance), read back by load_base
        write_recorded_settings(package / "base", steps=DEMO_STEPS, guidance_scale=DEMO_GUIDANCE)
    for condition in CONDITIONS if controlnets is None else controlnets:
        controlnet, metadata = load_controlnet(runs / condition / "controlnet", torch_dtype=torch.float16)
        shutil.rmtree(package / "controlnets" / condition, ignore_errors=True)
        save_controlnet(controlnet, package / "controlnets" / condition, metadata)
    if controlnets is None:
        geometry = UNet2DModel.from_pretrained(runs / "geometry", torch_dtype=torch.float16)
        shutil.rmtree(package / "geometry", ignore_errors=True)
        geometry.save_pretrained(package / "geometry", safe_serialization=True)
    total = sum(path.stat().st_size for path in package.rglob("*") if path.is_file())
    print(f"packed {package}: {total / 2**20:.1f} MiB")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m controlkit.demo.recipe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("data", "init", "geometry", "pack", "all", "unpack", *TRAININGS),
                        help="the step to run (a training name runs training/configs/demo_<name>.toml)")
    parser.add_argument("--controlnets", help="pack: only these ControlNets (comma-separated), not the base")
    args = parser.parse_args(argv)
    step = args.step
    only = None if args.controlnets is None else [name.strip() for name in args.controlnets.split(",")]
    unknown = [name for name in only or () if name not in CONDITIONS]
    if unknown:
        parser.error(f"--controlnets: unknown {', '.join(unknown)}; choose from {', '.join(CONDITIONS)}")
    try:
        if step in ("data", "all"):
            write_data()
        if step in ("init", "all"):
            print(f"init: {write_init()}")
        for name in TRAININGS:
            if step in (name, "all"):
                run_training(name)
        if step in ("geometry", "all"):
            from controlkit.demo.estimator import train_geometry

            train_geometry()
        if step in ("pack", "all"):
            pack(controlnets=only)
        if step == "unpack":
            print(f"unpack: {unpack()}")
    except ControlkitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
