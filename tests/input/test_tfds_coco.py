"""The TFDS builder on the real nuclei val split reads back exactly what CocoSource gives."""

import subprocess
import sys
import textwrap

import numpy as np

from instseg_jax.input.coco import CocoSource


def test_tfds_source_reads_back_the_coco_source(nuclei_dir, tmp_path):
    from instseg_jax.input.tfds_coco import TfdsCocoSource

    annotations = nuclei_dir / "annotations" / "val.json"
    coco = CocoSource(annotations, nuclei_dir / "images")
    tfds_source = TfdsCocoSource.build(
        "nuclei", {"val": (annotations, nuclei_dir / "images")}, data_dir=tmp_path
    )
    assert len(tfds_source) == len(coco) == 79
    assert tfds_source.class_names == coco.class_names == ["nucleus"]
    by_id = {tfds_source.load(i)["image_id"]: i for i in range(len(tfds_source))}
    for index in range(len(coco)):
        want = coco.load(index)
        got = tfds_source.load(by_id[want["image_id"]])
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{key} of {index}")
    # Repeat-factor sampling's categories, read without decoding an image, agree too.
    categories = tfds_source.image_categories()
    for index, want in enumerate(coco.image_categories()):
        got = categories[by_id[coco[index]["image_id"]]]
        np.testing.assert_array_equal(got, want)
    shards = list((tmp_path / "coco_instances" / "nuclei" / "1.0.0").glob("*array_record*"))
    assert shards, "array_record shards written"

    # Reading back in a fresh process where TensorFlow cannot be imported.
    code = textwrap.dedent(f"""
        import importlib.util, sys
        assert importlib.util.find_spec("tensorflow") is None, "TensorFlow must not be installed"
        from instseg_jax.input.tfds_coco import TfdsCocoSource
        source = TfdsCocoSource("nuclei", "val", {str(tmp_path)!r})
        example = source.load(0)
        assert "tensorflow" not in sys.modules
        print(len(source), example["masks"].shape[1:] == example["image"].shape[:2])
    """)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["79", "True"]
