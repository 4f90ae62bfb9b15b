"""Split the prepared nuclei set into three size classes: a small multi-class COCO set for the
fine-tuning figure (a detector trained on one class, fine-tuned to three).

    python data/prepare_nuclei.py                      # first: data/nuclei (make data)
    python data/prepare_nuclei_sizes.py [--src data/nuclei/annotations] [--out data/nuclei_sizes]

Output: OUT/annotations/{train,val}.json, the same images (their file names point at
data/nuclei/images) and instances, each nucleus given the class of its mask area: "small",
"medium" or "large", cut at the terciles of the train split's areas (so the train classes are
balanced and val uses the same cuts). Running it twice gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SRC = REPO / "data" / "nuclei" / "annotations"
DEFAULT_OUT = REPO / "data" / "nuclei_sizes"
SIZE_NAMES = ("small", "medium", "large")


def area_cuts(train: dict) -> tuple[float, float]:
    """The two mask areas that cut the train split's nuclei into thirds."""
    areas = np.array([a["area"] for a in train["annotations"]], np.float64)
    low, high = np.quantile(areas, [1 / 3, 2 / 3])
    return float(low), float(high)


def relabelled(document: dict, cuts: tuple[float, float]) -> dict:
    """document with every annotation's category_id set from its area (1, 2, 3 for small,
    medium, large; an area equal to a cut goes to the smaller class)."""
    categories = [
        {"id": i + 1, "name": name, "supercategory": "nucleus"} for i, name in enumerate(SIZE_NAMES)
    ]
    annotations = []
    for annotation in document["annotations"]:
        size_class = int(np.searchsorted(cuts, annotation["area"], side="left"))
        annotations.append({**annotation, "category_id": size_class + 1})
    return {**document, "categories": categories, "annotations": annotations}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC, help="data/nuclei/annotations")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    sources = {split: args.src / f"{split}.json" for split in ("train", "val")}
    missing = [str(p) for p in sources.values() if not p.is_file()]
    if missing:
        print(f"missing {', '.join(missing)}: run `make data` first", file=sys.stderr)
        return 2
    documents = {split: json.loads(p.read_text()) for split, p in sources.items()}
    cuts = area_cuts(documents["train"])
    (args.out / "annotations").mkdir(parents=True, exist_ok=True)
    for split, document in documents.items():
        out = relabelled(document, cuts)
        path = args.out / "annotations" / f"{split}.json"
        path.write_text(json.dumps(out, sort_keys=True))
        counts = np.bincount([a["category_id"] for a in out["annotations"]], minlength=4)[1:]
        shown = ", ".join(f"{n} {name}" for n, name in zip(counts, SIZE_NAMES, strict=True))
        print(f"{split}: {shown} (area cuts {cuts[0]:.0f}, {cuts[1]:.0f} px) -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
