"""DESIGN "Only gradients cross chips": a method's training step on the 8-device "data" mesh of
the tests holds no all-gather, all-to-all or collective-permute, and its all-reduces carry the
gradients and a few scalars (global normalisers, metrics), nothing of an activation's size.

Every step is compiled (never run) in one subprocess with 8 fake CPU devices
(tests/collectives_driver.py), the HLO read by instseg_jax.hlo_collectives. Mask R-CNN (the
RoIAlign, proposal and mask-target paths every two-stage method shares) is checked in the fast
suite by tests/test_train_devices.py::test_eight_devices_equal_one, from XLA's dump of the step
that test trains (no second compile), and every other method's loss and gradients by its smoke
test on two devices (tests/methods/smoke.py, on the program the smoke test runs). The whole
training steps, optimizer included, of every method are checked in the slow suite on eight,
in one process: 15-30 minutes cold, about 3 warm.

On CPU a weight shared by several pyramid levels (the RPN head, the FCOS-family towers) has its
gradient all-reduced once per level: XLA's CPU pipeline does not reassociate the sum of the
levels' all-reduces (a v5e compile of the FCOS smoke step does: 3.17 MB for 3.18 MB of
parameters; 3.80 MB here). XLA:TPU did not for bfloat16 gradients either (the FCOS COCO
recipe's v5e:2x2 step all-reduced 51 copies of its 19 [3, 3, 256, 256] kernels); with float32
gradients (ops/mixed_precision.py) it does (RDSNet's: 27 copies of its 27). Such duplicates
are allowed here; anything all-reduced that is not of a parameter's size counts against
SCALAR_BYTES. (An activation-sized all-reduce that only XLA:TPU makes, the batch-summed
cotangent of an anchor head's bias, is guarded by tests/ops/test_mixed_precision.py's TPU
test.)
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from instseg_jax import hlo_collectives
from instseg_jax.methods import METHODS

REPO = Path(__file__).resolve().parent.parent
DRIVER = str(REPO / "tests" / "collectives_driver.py")

# Each method's smoke experiment (the one its smoke test trains).
SMOKE = {
    "blendmask": "experiments/blendmask_nuclei.py:smoke",
    "condinst": "experiments/condinst_nuclei.py:smoke",
    "deepmask": "experiments/deepmask_nuclei.py:smoke",
    "fcis": "experiments/fcis_nuclei.py:smoke",
    "fcos": "experiments/fcos_nuclei.py:smoke",
    "instancefcn": "experiments/instancefcn_nuclei.py:smoke",
    "keypoint_rcnn": "experiments/keypoint_rcnn_synthetic.py:smoke",
    "mask2former": "experiments/mask2former_nuclei.py:smoke",
    "mask_rcnn": "experiments/maskrcnn_nuclei.py:smoke",
    "ms_rcnn": "experiments/ms_rcnn_nuclei.py:smoke",
    "panet": "experiments/panet_nuclei.py:smoke",
    "panoptic_fpn": "experiments/panoptic_fpn_synthetic.py:smoke",
    "pointrend": "experiments/pointrend_nuclei.py:smoke",
    "polarmask": "experiments/polarmask_nuclei.py:smoke",
    "rdsnet": "experiments/rdsnet_nuclei.py:smoke",
    "solo": "experiments/solo_nuclei.py:smoke",
    # A variant, not a method of its own: Decoupled SOLO's X/Y branches are another program.
    "solo_decoupled": "experiments/solo_nuclei.py:smoke --config.model.mask_branch=decoupled",
    "solov2": "experiments/solov2_nuclei.py:smoke",
    "yolact": "experiments/yolact_nuclei.py:smoke",
    "yolact_plus": "experiments/yolact_plus_nuclei.py:smoke",
}
# Bytes an all-reduce may carry besides gradients: the global-batch normalisers and metrics.
SCALAR_BYTES = 1024


def compiled_reports(methods, timeout: int) -> dict:
    """{method: the driver's report} of the methods' smoke training steps compiled on 8 fake
    CPU devices, all in one process (one JAX start-up, one persistent compilation cache)."""
    process = subprocess.run(
        [sys.executable, DRIVER, *(SMOKE[m] for m in methods)],
        cwd=REPO,
        env={
            **os.environ,
            "XLA_FLAGS": (
                f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
            ),
        },
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert process.returncode == 0, process.stderr[-4000:]
    reports = [json.loads(line) for line in process.stdout.splitlines() if line.startswith("{")]
    by_spec = {r["experiment"]: r for r in reports}
    return {m: by_spec[SMOKE[m]] for m in methods}


def params_bytes(arrays) -> int:
    """Bytes of a name -> array mapping (an npz of parameters)."""
    return sum(arrays[k].nbytes for k in arrays.files)


def crossings(report: dict) -> list[str]:
    """What crosses chips in a compiled step beyond gradients and scalars, one line each."""
    lines = [
        f"{c['kind']} of {c['bytes']} bytes from {c['op_name']} at {c['source']}"
        for c in report["activation"]
    ]
    budget = report["all_reduce"]
    if budget["other_bytes"] > SCALAR_BYTES:
        lines += [
            f"all-reduce of {o['shape']} (no parameter's size) from {o['op_name']} at {o['source']}"
            for o in budget["other"]
        ]
    if budget["gradient_bytes"] > report["param_bytes"]:
        lines.append(f"gradients {budget['gradient_bytes']} > {report['param_bytes']} bytes")
    return lines


def assert_only_gradients_cross(reports: dict) -> None:
    found = {m: crossings(r) for m, r in reports.items()}
    assert not any(found.values()), json.dumps({m: v for m, v in found.items() if v}, indent=1)


def test_every_method_has_a_smoke_experiment_here():
    assert set(METHODS) <= set(SMOKE), "add the new method's smoke experiment to SMOKE"
    assert set(SMOKE) - set(METHODS) == {"solo_decoupled"}, "a variant or a removed method?"


# The fast tier checks the programs it compiles anyway: Mask R-CNN's step in
# test_train_devices.py's test_eight_devices_equal_one, every other method's loss and gradients
# in its smoke test (tests/methods/smoke.py).
@pytest.mark.slow
def test_every_method_step_only_all_reduces_gradients():
    assert_only_gradients_cross(compiled_reports(sorted(SMOKE), timeout=3600))


# ----------------------------------------------------------------------------- the HLO reader

# Excerpts of compiled HLO text in the forms XLA prints: a combined all-reduce, an asynchronous
# all-gather pair, a collective-permute without metadata, and the source tables.
HLO = """HloModule jit_step_fn, is_scheduled=true

FileNames
1 "/repo/instseg_jax/ops/roi_align.py"

FunctionNames
1 "_gather_from_levels"

FileLocations
1 {file_name_id=1 function_name_id=1 line=140 end_line=140 column=4 end_column=9}

StackFrames
1 {file_location_id=1 parent_frame_id=1}

%region_0.1 (x: f32[], y: f32[]) -> f32[] {
  ROOT %add = f32[] add(f32[] %x, f32[] %y)
}

ENTRY %main.2 (p0: f32[8,16], p1: bf16[4]) -> f32[8,16] {
""" + "\n".join(
    [
        "  %all-reduce.3 = (f32[3,3,32,64]{3,2,1,0}, f32[64]{0}) all-reduce(%a, %b), "
        "channel_id=1, replica_groups=[1,8]<=[8], to_apply=%region_0.1, "
        'metadata={op_name="jit(step_fn)/transpose(jvp(M))/conv" stack_frame_id=1}',
        "  %all-gather-start = (bf16[4]{0}, bf16[32]{0}) all-gather-start(bf16[4]{0} %p1), "
        'channel_id=2, dimensions={0}, metadata={op_name="jit(step_fn)/jvp(M)/pool/reshape"}',
        "  %all-gather-done = bf16[32]{0} all-gather-done((bf16[4]{0}, bf16[32]{0}) "
        "%all-gather-start)",
        "  %collective-permute.1 = f32[8,16]{1,0} collective-permute(f32[8,16]{1,0} %p0), "
        "channel_id=3, source_target_pairs={{0,1},{1,0}}",
        "  ROOT %r = f32[8,16]{1,0} add(%collective-permute.1, %collective-permute.1)",
        "}",
    ]
)


def test_collectives_reads_kind_bytes_shapes_and_origin():
    found = hlo_collectives.collectives(HLO, details=True)
    assert [c["kind"] for c in found] == ["all-reduce", "all-gather", "collective-permute"]
    reduce, gather, permute = found
    assert reduce["bytes"] == (3 * 3 * 32 * 64 + 64) * 4
    assert reduce["shapes"] == ["f32[3,3,32,64]", "f32[64]"]
    assert reduce["op_name"] == "jit(step_fn)/transpose(jvp(M))/conv"
    assert reduce["source"] == "/repo/instseg_jax/ops/roi_align.py:140 (_gather_from_levels)"
    # The asynchronous pair counts once, with the gathered size and the start's op_name.
    assert gather["bytes"] == 32 * 2 and gather["op_name"] == "jit(step_fn)/jvp(M)/pool/reshape"
    assert permute == {
        "kind": "collective-permute",
        "bytes": 8 * 16 * 4,
        "shapes": ["f32[8,16]"],
        "op_name": "",
        "source": "",
    }
    # Without details, the three keys the compile tool reports.
    assert hlo_collectives.collectives(HLO)[2] == {
        "kind": "collective-permute",
        "bytes": 8 * 16 * 4,
        "op_name": "",
    }
    summary = hlo_collectives.summary(found)
    assert summary["all-gather"] == {"count": 1, "bytes": 64}
    assert summary["all-to-all"] == {"count": 0, "bytes": 0}
    assert len(hlo_collectives.activation_collectives(found)) == 2


def test_all_reduce_budget_tells_gradients_from_duplicates_and_activations():
    found = hlo_collectives.collectives(HLO, details=True)
    kernel, bias = 3 * 3 * 32 * 64, 64
    budget = hlo_collectives.all_reduce_budget(found, [kernel, bias])
    assert budget == {
        "gradient_bytes": (kernel + bias) * 4,
        "duplicate_bytes": 0,
        "other_bytes": 0,
        "other": [],
    }
    # The kernel's gradient all-reduced a second time (a weight shared by two levels), and an
    # all-reduce of no parameter's size.
    twice = found[:1] * 2 + [dict(found[0], shapes=["f32[8,100]"])]
    budget = hlo_collectives.all_reduce_budget(twice, [kernel, bias])
    assert budget["duplicate_bytes"] == (kernel + bias) * 4
    assert budget["other_bytes"] == 8 * 100 * 4
    assert budget["other"][0]["shape"] == "f32[8,100]"


def test_bytes_by_element_type_splits_what_each_precision_carries():
    found = hlo_collectives.collectives(HLO, details=True)
    assert hlo_collectives.bytes_by_element_type(found) == {"f32": (3 * 3 * 32 * 64 + 64) * 4}
    mixed = found + [dict(found[0], shapes=["bf16[3,3,32,64]"])]
    assert hlo_collectives.bytes_by_element_type(mixed) == {
        "bf16": 3 * 3 * 32 * 64 * 2,
        "f32": (3 * 3 * 32 * 64 + 64) * 4,
    }
    assert hlo_collectives.bytes_by_element_type(found, "all-gather") == {"bf16": 32 * 2}


# ------------------------------------------------------- the smoke steps' check can fail


def test_smoke_check_fails_on_a_loss_that_mixes_images():
    """tests/methods/smoke.py's two-device check on a toy loss: a per-image loss passes (its
    only collective is the gradient and loss all-reduce); the same loss against the batch
    rolled by one image (each image meets its neighbour's features, as the RoIAlign flat table
    once did) is refused, naming the collective."""
    import jax
    import jax.numpy as jnp

    from tests.methods.smoke import loss_and_gradients_over_images

    params = {"w": jnp.ones((16, 8))}
    batch = {"x": jnp.arange(2 * 4 * 16, dtype=jnp.float32).reshape(2, 4, 16) / 100}

    def per_image(p, b):
        total = jnp.mean(jnp.tanh(b["x"] @ p["w"]) ** 2)
        return total, {"total": total}

    def mixed(p, b):
        features = jnp.tanh(b["x"] @ p["w"])
        total = jnp.mean(features * jnp.roll(features, 1, axis=0))
        return total, {"total": total}

    (total, _), grads = loss_and_gradients_over_images(per_image, params, batch)
    assert jnp.isfinite(total) and jax.tree.leaves(grads)[0].shape == (16, 8)
    with pytest.raises(AssertionError, match=r"collective-permute|all-gather|all-to-all"):
        loss_and_gradients_over_images(mixed, params, batch)
