"""The package imports without TensorFlow or torch, and exports the ops by their contract names."""

import inspect
import subprocess
import sys
import textwrap

from instseg_jax import ops

BLOCKER = textwrap.dedent(
    """
    import importlib.util, pkgutil, sys

    # The test environment has neither (the `dev` extra does not pull them in); importing every
    # module of the package must not need them.
    for name in ("tensorflow", "torch"):
        assert importlib.util.find_spec(name) is None, f"{name} is installed in the test env"
    import instseg_jax
    for module in pkgutil.walk_packages(instseg_jax.__path__, "instseg_jax."):
        __import__(module.name)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "torch"))
    assert not loaded, loaded
    print("ok")
    """
)


def test_import_without_tensorflow_or_torch():
    result = subprocess.run(
        [sys.executable, "-c", BLOCKER], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


CONTRACT = {
    "box_area": ["boxes"],
    "box_iou": ["a", "b"],
    "box_ioa": ["a", "b"],
    "generalized_box_iou": ["a", "b"],
    "encode_boxes": ["targets", "sources", "weights"],
    "decode_boxes": ["deltas", "sources", "weights", "clamp"],
    "clip_boxes": ["boxes", "hw"],
    "grid_anchors": ["feature_hw", "stride", "sizes", "aspect_ratios", "offset"],
    "roi_align": [
        "features",
        "boxes",
        "output_size",
        "spatial_scale",
        "sampling_ratio",
        "aligned",
        "method",
    ],
    "fpn_level": ["boxes", "min_level", "max_level", "canonical_size", "canonical_level"],
    "multilevel_roi_align": ["features_by_level", "boxes", "output_size"],
    "nms": ["boxes", "scores", "iou_threshold", "max_output"],
    "batched_nms": ["boxes", "scores", "classes", "iou_threshold", "max_output"],
    "matrix_nms": ["masks", "classes", "scores", "kernel", "sigma"],
    "fast_nms": [],
    "paste_masks": ["masks", "boxes", "image_hw", "threshold"],
    "crop_and_resize_masks": ["masks", "boxes", "size"],
    "masks_to_boxes": ["masks"],
    "match": ["iou", "thresholds", "labels", "allow_low_quality_matches"],
    "sample_balanced": ["labels", "num_samples", "positive_fraction", "key"],
    "sigmoid_focal_loss": [],
    "smooth_l1_loss": [],
    "giou_loss": [],
    "binary_cross_entropy_with_logits": [],
    "dice_loss": [],
    "xyxy_to_xywh": [],
    "xywh_to_xyxy": [],
    "xyxy_to_cxcywh": [],
    "cxcywh_to_xyxy": [],
}


def test_ops_export_the_contract_names_and_leading_parameters():
    for name, leading in CONTRACT.items():
        fn = getattr(ops, name)
        params = list(inspect.signature(fn).parameters)
        assert params[: len(leading)] == leading, (name, params)
    defaults = inspect.signature(ops.roi_align).parameters
    assert defaults["sampling_ratio"].default == 2 and defaults["aligned"].default is True
    assert defaults["method"].default == "gather"
    assert inspect.signature(ops.matrix_nms).parameters["kernel"].default == "gaussian"


def test_ops_showcase_runs(tmp_path):
    from instseg_jax import ops_showcase

    ops_showcase.main(["--out", str(tmp_path)])
    assert (tmp_path / "ops_demo.png").stat().st_size > 0


def test_demo_pipeline_runs_end_to_end_on_a_smoke_budget(tmp_path, capsys):
    """make demo's code path (train, restore, evaluate, overlays) on synthetic scenes."""
    from instseg_jax import demo

    assert demo.main(["--smoke", "--out", str(tmp_path), "--overlays", "2"]) == 0
    printed = capsys.readouterr().out
    assert "Average Precision" in printed and "segm AP" in printed
    assert len(list(tmp_path.glob("*.png"))) == 2
    assert (tmp_path / "run" / "eval_4.json").exists()
