"""Hugging Face Mask2Former weights through the importer reproduce transformers' own outputs.

tests/fixtures/hf_mask2former_tiny.npz was written by `experiments/parity/mask2former.py
--make-fixture` in the peer environment (torch + transformers): the state_dict and config of a
small Mask2FormerForUniversalSegmentation with seeded random weights (ResNet bottleneck
backbone, 2 MSDeformAttn encoder layers, 3 masked-attention decoder layers, 8 queries), two
images and transformers' class and mask logits of all 4 prediction layers. Here the state_dict
goes through instseg_jax.weights.huggingface and our Mask2Former, with no torch installed.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from instseg_jax.weights import huggingface as hf

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "hf_mask2former_tiny.npz"


def fixture():
    data = np.load(FIXTURE)
    sd = {k[3:]: data[k] for k in data.files if k.startswith("sd/")}
    return sd, json.loads(str(data["config"])), data


def test_every_prediction_layer_matches_transformers():
    sd, hf_config, data = fixture()
    params, frozen, fields, num_classes = hf.convert(sd, hf_config)
    assert (fields["decoder_layers"], fields["encoder_layers"], num_classes) == (3, 2, 3)
    classes, masks = hf.predict(params, frozen, fields, num_classes, data["images"])
    assert classes.shape == data["classes"].shape and masks.shape == data["masks"].shape
    for layer in range(classes.shape[0]):
        assert hf.relative_error(classes[layer], data["classes"][layer]) <= 1e-4, layer
        assert hf.relative_error(masks[layer], data["masks"][layer]) <= 1e-4, layer


def test_a_wrong_checkpoint_or_backbone_is_named():
    sd, hf_config, _ = fixture()
    with pytest.raises(hf.HuggingFaceWeightsError, match="queries_features"):
        hf.convert({k: v for k, v in sd.items() if "queries_features" not in k}, hf_config)
    swin = dict(hf_config, backbone_config={"model_type": "swin"})
    with pytest.raises(hf.HuggingFaceWeightsError, match="swin"):
        hf.convert(sd, swin)


def write_safetensors(path: Path, tensors: dict) -> None:
    """The safetensors layout (header length, JSON header, raw little-endian data), written
    here so the test needs neither torch nor the safetensors package."""
    header, chunks, offset = {}, [], 0
    for name, array in tensors.items():
        raw = np.ascontiguousarray(array, np.float32).tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    encoded = json.dumps(header).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + b"".join(chunks))


def test_import_weights_cli_writes_a_workdir_that_reproduces_transformers(tmp_path):
    from instseg_jax import cli
    from instseg_jax import workdir as workdir_lib

    sd, hf_config, data = fixture()
    directory = tmp_path / "hf"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(hf_config))
    write_safetensors(directory / "model.safetensors", sd)
    out = tmp_path / "imported"
    argv = ["import-weights", "huggingface", str(directory), "--out", str(out)]
    assert cli.main([*argv, "--canvas", "128", "128"]) == 0
    config, variables, step = workdir_lib.restore_variables(out)
    assert step == 0 and config.method == "mask2former" and config.model.num_queries == 8
    fields = {k: v for k, v in hf.convert(sd, hf_config)[2].items()}
    classes, masks = hf.predict(variables["params"], variables["frozen"], fields, 3, data["images"])
    assert hf.relative_error(classes[-1], data["classes"][-1]) <= 1e-4
    assert hf.relative_error(masks[-1], data["masks"][-1]) <= 1e-4
    assert cli.main(["import-weights", "huggingface", str(tmp_path), "--out", str(out)]) == 2
