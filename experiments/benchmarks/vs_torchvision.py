"""Mask R-CNN R50-FPN speed, ours against torchvision, side by side (`make peer` environment).

    .venv-peer/bin/python experiments/benchmarks/vs_torchvision.py [--record]

Same architecture and settings on both sides: torchvision's maskrcnn_resnet50_fpn with seeded
random weights (experiments/parity/torchvision.py's), and ours with those weights converted
under the torchvision preset, on square synthetic scenes at 512x512 and 800x800 (torchvision's
min_size = max_size = the side, so neither side resizes). Every row times both sides in the
same process, interleaved over --rounds rounds (at least 5, after one warm-up call each), and
reports the medians. Its "input transform timed" column says whether both sides' input
transforms are inside the timing ("both sides") or outside it ("neither side"); no row times
one side's transform and not the other's:

- inference of 1 image, end to end (both sides): torchvision's model(images) (its transform,
  RPN, heads, masks pasted at the image size) against our test-time transform, our inference
  as evaluate and predict run it (the method's make_inference: boxes, then the mask head on 16
  or all 100 slots, picked on the host) and the host paste of the valid detections' masks;
  with 1, 10 and 100 detections (score thresholds read off each side's own score list, so
  both sides keep the same number of detections);
- of which the backbone+FPN forward alone (neither side: torchvision's input is the batch its
  transform made, ours the transformed canvas; our network's own pixel normalisation, a part
  of the model here and of the transform there, is inside our timing);
- a training step at batch 2 (both sides: SGD momentum; ours the training transform of both
  images and one jitted step with the gradient, update and non-finite guard; torchvision's
  forward, backward and optimizer.step(), its transform included), ours with the default mask
  budget (model.mask_fg_per_image = 0: chosen from the training data by the rule of
  methods/mask_rcnn.mask_budget_from_data, here from 64 scenes of the same generator) and with
  128 slots (detectron2's maximum); of which the loss alone without its gradient (both sides);
- with --backbone-grad only: backbone+FPN forward, and forward+backward (neither side).

FLOPs count the same things on both sides: the multiply-adds of convolutions and matrix
products, torch.utils.flop_counter's count of one torchvision call and `conv_matmul_flops`'
count of our programs' jaxprs by the same rules; achieved GFLOP/s divide those counts by the
median times, against the machine's measured 3x3-convolution throughput (the fastest of XLA
default, XLA with the CPU compile option and torch on a ResNet-sized convolution). XLA's own
count of our compiled programs (every op, elementwise included) is in a column of its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.extend import core as jax_core  # noqa: E402

from instseg_jax import builders, compilation, detections, inference, sharding  # noqa: E402
from instseg_jax import train as train_lib  # noqa: E402
from instseg_jax.input import report  # noqa: E402
from instseg_jax.input.pipeline import stack_examples  # noqa: E402
from instseg_jax.input.synthetic import SyntheticSource  # noqa: E402
from instseg_jax.input.transforms import transform  # noqa: E402
from instseg_jax.methods.mask_rcnn import MaskRCNN  # noqa: E402
from instseg_jax.methods.mask_rcnn import loss_fn as mask_rcnn_loss  # noqa: E402
from instseg_jax.weights import torchvision as tv  # noqa: E402

# Whether a row's timing holds both sides' input transforms or neither's.
BOTH_TRANSFORMS = "both sides"
NO_TRANSFORM = "neither side"
MIN_ROUNDS = 5

COLUMNS = [
    "case",
    "input transform timed",
    "ours (s)",
    "torchvision (s)",
    "ours / torchvision time",
    "ours ÷ torchvision images/s",
    "GFLOP ours / torchvision (convolutions + matmuls, both)",
    "ours GFLOP/s (% conv peak)",
    "torchvision GFLOP/s (% conv peak)",
    "ours GFLOP, XLA's count (all ops)",
]


@dataclasses.dataclass
class Bench:
    """What every row needs: both models, the machine's convolution peak and the rounds."""

    torch: object
    torchvision: object
    model: object  # torchvision's Mask R-CNN
    variables: dict  # ours, converted from `model`
    arch: dict
    best_conv: float  # FLOP/s of the fastest measured 3x3 convolution
    rounds: int


@dataclasses.dataclass
class Work:
    """FLOPs of our side of a row: conv + matmul (as torch counts) and XLA's count."""

    conv_matmul: float
    xla: float


def torch_side():
    """experiments/parity/torchvision.py as a module (its file name shadows the package)."""
    spec = importlib.util.spec_from_file_location(
        "tv_parity", ROOT / "experiments" / "parity" / "torchvision.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def freeze_as_pretrained(torch, model) -> None:
    """torchvision's maskrcnn_resnet50_fpn built without weights (the seeded model) trains
    every layer and normalises with batch statistics; built on pretrained weights, which is
    what our torchvision preset mirrors (model.freeze_at = 2, frozen_bn), it freezes the stem
    and layer1 and uses FrozenBatchNorm2d. Put the seeded model in that state, so that both
    sides' training steps compute the same gradients (the same as in eval mode, where
    BatchNorm2d already uses its running statistics)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    batch_norms = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, torch.nn.BatchNorm2d)
    ]
    for parent, name, norm in batch_norms:
        frozen = FrozenBatchNorm2d(norm.num_features, eps=norm.eps)
        for key in ("weight", "bias", "running_mean", "running_var"):
            getattr(frozen, key).copy_(getattr(norm, key).detach())
        setattr(parent, name, frozen)
    model.backbone.body.conv1.requires_grad_(False)
    model.backbone.body.layer1.requires_grad_(False)


def scenes(side: int, count: int, max_instances: int):
    source = SyntheticSource(count, (side, side), seed=11, max_shapes=max_instances)
    return [source.load(i) for i in range(count)]


def our_config(arch, side: int, batch: int, score_threshold: float):
    config = tv.coco_config(arch, (side, side))
    config.input.short_side = (side,)
    config.input.max_long_side = side
    config.input.test_short_side = side  # images are side x side: neither side resizes
    config.input.test_max_long_side = side
    config.input.global_batch = batch
    config.input.max_instances = 16
    config.input.mask_size = 56
    config.input.hflip = 0.0
    config.model.score_threshold = score_threshold
    return config


def our_batch(config, examples, train: bool):
    tconfig = builders.transform_config(config, train=train)
    out = [
        transform(e, tconfig, np.random.default_rng(i), report.new_counts())
        for i, e in enumerate(examples)
    ]
    return {k: jnp.asarray(v) for k, v in builders.device_fields(stack_examples(out)).items()}


def backbone_grad(bench: Bench, sides) -> list[list[str]]:
    """Rows of backbone+FPN forward, and forward and backward (gradient of the feature sum
    w.r.t. the trainable parameters; res2 and the stem frozen on both sides), batch 2."""
    torch, model, variables = bench.torch, bench.model, bench.variables
    params = variables["params"]
    rows = []
    model.train()
    for side in sides:
        config = our_config(bench.arch, side, 2, 0.05)
        net = MaskRCNN(builders.model_config(config, bench.arch["num_classes"]))
        frozen = variables["frozen"]
        image = jnp.asarray(
            np.random.default_rng(0).integers(0, 256, (2, side, side, 3)), jnp.float32
        )

        def feature_sum(params, x, net=net, frozen=frozen):
            features = net.apply({"params": params, "frozen": frozen}, x, method=MaskRCNN.features)
            return sum(jnp.sum(f) for f in features.values())

        # The value with the gradient, as torchvision's backward() follows its forward pass.
        value_and_grad = jax.value_and_grad(feature_sum)
        forward = compilation.jit(feature_sum).lower(params, image).compile()
        grad = compilation.jit(value_and_grad).lower(params, image).compile()
        # torchvision's transform would normalise; here it is done outside its timing.
        tensor = (torch.from_numpy(np.asarray(image)).permute(0, 3, 1, 2) / 255.0 - 0.45) / 0.225

        def theirs_forward(x=tensor):
            with torch.no_grad():
                return sum(f.sum() for f in model.backbone(x).values())

        def theirs_grad(x=tensor):
            model.zero_grad()
            total = sum(f.sum() for f in model.backbone(x).values())
            total.backward()
            return float(total.detach())

        for name, compiled, fn, theirs_fn in (
            ("forward", forward, feature_sum, theirs_forward),
            ("forward+backward", grad, value_and_grad, theirs_grad),
        ):
            measure(
                rows,
                bench,
                f"backbone+FPN {name} {side}x{side}, batch 2",
                NO_TRANSFORM,
                lambda c=compiled, x=image: jax.block_until_ready(c(params, x)),
                theirs_fn,
                Work(conv_matmul_flops(fn, params, image), flops_of(compiled)),
                images=2,
            )
    return rows


def halfway(scores_descending, count: int) -> float:
    below = scores_descending[count] if count < len(scores_descending) else 0.0
    return float((scores_descending[count - 1] + below) / 2)


def our_forward(arch, side: int, threshold: float, variables, batch):
    """Our inference as evaluate and predict run it (inference.inference_fn), warmed up so
    that both of its mask-slot programs are compiled before timing."""
    config = our_config(arch, side, 1, threshold)
    infer = inference.inference_fn(config, arch["num_classes"])
    jax.block_until_ready(infer(variables, batch))
    return infer


def inference_work(arch, side: int, threshold: float, variables, batch) -> Work:
    """FLOPs of what our inference runs: the boxes program, then the mask program on the
    slots make_inference picks for this many detections."""
    config = our_config(arch, side, 1, threshold)
    cfg = builders.model_config(config, arch["num_classes"])
    net = MaskRCNN(cfg)

    def boxes_fn(v, b):
        return net.apply(v, b, method=MaskRCNN.detect_boxes)

    boxes = compilation.jit(boxes_fn).lower(variables, batch).compile()
    detections, features, canvas_boxes = boxes(variables, batch)
    count = int(np.asarray(detections["valid"]).sum(axis=1).max())
    small = cfg.test_mask_slots_small
    slots = small if count <= small else cfg.detections_per_image

    def masks_fn(v, f, bx, c):
        return net.apply(v, f, bx[:, :slots], c[:, :slots], None, method=MaskRCNN.box_masks)

    mask_args = (variables, features, canvas_boxes, detections["classes"])
    masks = compilation.jit(masks_fn).lower(*mask_args).compile()
    return Work(
        conv_matmul_flops(boxes_fn, variables, batch) + conv_matmul_flops(masks_fn, *mask_args),
        flops_of(boxes) + flops_of(masks),
    )


def scores_only(arch, side: int, variables, batch):
    """Our detection scores at threshold 0, without the mask head."""
    config = our_config(arch, side, 1, 0.0)
    net = MaskRCNN(builders.model_config(config, arch["num_classes"]))
    boxes = compilation.jit(lambda v, b: net.apply(v, b, method=MaskRCNN.detect_boxes)[0])
    return np.asarray(boxes(variables, batch)["scores"][0])


def end_to_end(infer, variables, config, example, side: int):
    """Our inference as a user gets it, on the same footing as torchvision's model(images),
    which runs its own transform: our test-time transform of the image onto the canvas, the
    detections, then the valid detections' masks pasted at the image size (host side)."""

    def run():
        batch = our_batch(config, [example], train=False)
        det = jax.device_get(infer(variables, batch))
        return [
            detections.paste_box_mask(det["masks"][0, k], det["boxes"][0, k], (side, side))
            for k in np.flatnonzero(det["valid"][0])
        ]

    return run


def flops_of(compiled) -> float:
    """XLA's FLOP count of a compiled program (every op)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan")))


def conv_matmul_flops(fn, *args) -> float:
    """FLOPs of the convolutions and matrix products fn(*args) runs, counted on its jaxpr by
    torch.utils.flop_counter's rules, so that both sides count the same things: 2 per
    multiply-add, a transposed convolution (a strided convolution's input gradient) without
    the products with the zeros it inserts, a scan's body times its length. Equations whose
    results nothing uses are not counted (a gradient's jaxpr still holds the primal loss,
    which XLA drops); a while loop's body counts once (ours hold no convolution or matmul)."""
    # A jitted fn traces itself: inside make_jaxpr its compile options would be refused.
    closed = fn.trace(*args).jaxpr if hasattr(fn, "trace") else jax.make_jaxpr(fn)(*args)
    return _jaxpr_flops(closed.jaxpr, [True] * len(closed.jaxpr.outvars))


def _jaxpr_flops(jaxpr, outputs_used) -> float:
    used = {
        v
        for v, keep in zip(jaxpr.outvars, outputs_used, strict=True)
        if keep and isinstance(v, jax_core.Var)
    }
    total = 0.0
    for eqn in reversed(jaxpr.eqns):
        eqn_used = [v in used for v in eqn.outvars]
        if not any(eqn_used) and not eqn.effects:
            continue
        total += _equation_flops(eqn, eqn_used)
        used.update(v for v in eqn.invars if isinstance(v, jax_core.Var))
    return total


def _equation_flops(eqn, outputs_used) -> float:
    name = eqn.primitive.name
    if name == "dot_general":
        lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
        (_, rhs_contracting), (_, rhs_batch) = eqn.params["dimension_numbers"]
        rhs_free = [n for i, n in enumerate(rhs) if i not in (*rhs_contracting, *rhs_batch)]
        return 2.0 * math.prod(lhs) * math.prod(rhs_free)
    if name == "conv_general_dilated":
        kernel, out = eqn.invars[1].aval.shape, eqn.outvars[0].aval.shape
        # rhs_spec: (output features, input features, *window); input features are per group.
        products = math.prod(kernel[d] for d in eqn.params["dimension_numbers"].rhs_spec[1:])
        return 2.0 * math.prod(out) * products / math.prod(eqn.params["lhs_dilation"])
    inner = [j for value in eqn.params.values() for j in _jaxprs_in(value)]
    everything = [_jaxpr_flops(j, [True] * len(j.outvars)) for j in inner]
    if name == "scan":
        return eqn.params["length"] * sum(everything)
    if name == "cond":  # one branch runs: its outputs are the equation's
        return max((_jaxpr_flops(j, outputs_used) for j in inner), default=0.0)
    if len(inner) == 1 and len(inner[0].outvars) == len(eqn.outvars):  # jit, remat, custom_vjp
        return _jaxpr_flops(inner[0], outputs_used)
    return sum(everything)


def _jaxprs_in(value):
    if isinstance(value, jax_core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax_core.Jaxpr):
        yield value
    elif isinstance(value, tuple | list):
        for item in value:
            yield from _jaxprs_in(item)


def conv_ceiling(torch) -> dict:
    """FLOP/s of one ResNet-sized 3x3 convolution (batch 2, 100x100, 256 -> 256) in XLA
    (YNNPACK, XLA's default, and Eigen, under the package's CPU compile option) and in torch:
    the machine's convolution throughput is the fastest of them."""
    x = jnp.ones((2, 100, 100, 256), jnp.float32)
    w = jnp.ones((3, 3, 256, 256), jnp.float32) * 0.01

    def conv(a, b):
        return jax.lax.conv_general_dilated(
            a, b, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    xla_default, xla_option = jax.jit(conv), compilation.jit(conv)
    tx = torch.ones(2, 256, 100, 100)
    tw = torch.ones(256, 256, 3, 3) * 0.01
    flops = 2 * 2 * 100 * 100 * 256 * 256 * 9
    with torch.no_grad():
        t = common.time_interleaved(
            {
                "xla default": lambda: jax.block_until_ready(xla_default(x, w)),
                "xla option": lambda: jax.block_until_ready(xla_option(x, w)),
                "torch": lambda: torch.nn.functional.conv2d(tx, tw, padding=1),
            },
            rounds=7,
        )
    return {name: flops / seconds for name, seconds in t.items()}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[512, 800])
    parser.add_argument(
        "--rounds", type=int, default=MIN_ROUNDS, help=f"interleaved rounds (>= {MIN_ROUNDS})"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument(
        "--backbone-grad",
        action="store_true",
        help="only time backbone+FPN forward+backward on both sides (the training gap's source)",
    )
    args = parser.parse_args(argv)
    if args.rounds < MIN_ROUNDS:
        parser.error(f"--rounds must be at least {MIN_ROUNDS}: one slow round moves a median of 3")
    return args


def setup(args) -> tuple[Bench, dict]:
    """Both models (ours converted from torchvision's seeded one) and the machine's measured
    convolution and matmul throughput."""
    side_module = torch_side()
    torch = side_module.torch
    model = side_module.seeded_model(args.seed, 0.05)
    variables, arch = tv.convert({k: v.numpy() for k, v in model.state_dict().items()}, "seeded")
    variables = jax.tree.map(jnp.asarray, variables)
    freeze_as_pretrained(torch, model)
    ceiling = conv_ceiling(torch)
    ceiling["matmul"] = common.measure_ceilings()["matmul_flops"]
    best_conv = max(ceiling["xla default"], ceiling["xla option"], ceiling["torch"])
    print(f"conv throughput: { ({k: f'{v / 1e9:.1f} GFLOP/s' for k, v in ceiling.items()}) }")
    bench = Bench(
        torch, side_module.torchvision, model, variables, arch, best_conv, rounds=args.rounds
    )
    return bench, ceiling


def main(argv=None) -> int:
    args = parse_args(argv)
    bench, ceiling = setup(args)
    if args.backbone_grad:
        rows = backbone_grad(bench, args.sides)
    else:
        rows = []
        mesh = sharding.make_mesh()
        for side in args.sides:
            examples = scenes(side, 2, 8)
            bench.model.transform.min_size = (side,)
            bench.model.transform.max_size = side
            rows += inference_rows(bench, side, examples)
            if not args.skip_train:
                rows += training_rows(bench, side, examples, mesh)
    table = common.markdown_table(rows, COLUMNS)
    print(f"medians of {bench.rounds} interleaved rounds")
    print(table)
    if args.record:
        record(bench, args, table, ceiling)
    return 0


def inference_rows(bench: Bench, side: int, examples) -> list[list[str]]:
    """Inference of one image end to end with 1, 10 and 100 detections, then the
    backbone+FPN forward alone."""
    torch, model, variables, arch = bench.torch, bench.model, bench.variables, bench.arch
    rows = []
    model.eval()
    config = our_config(arch, side, 1, 0.05)
    batch = our_batch(config, examples[:1], train=False)
    image = torch.from_numpy(examples[0]["image"]).permute(2, 0, 1).float() / 255.0

    def theirs_infer(image=image):
        with torch.no_grad():
            return model([image])

    # Random weights give near-equal scores (many within float32 noise of a fixed
    # threshold such as 0.05, so the two sides could keep different numbers), so each side
    # takes its threshold from its own scores: halfway between its count-th and next score
    # keeps exactly `count` (greedy NMS keeps by score), both capped at 100.
    model.roi_heads.score_thresh = 0.0
    theirs_scores = np.sort(theirs_infer()[0]["scores"].numpy())[::-1]
    ours_scores = np.sort(scores_only(arch, side, variables, batch))[::-1]
    for count in (1, 10, 100):
        model.roi_heads.score_thresh = halfway(theirs_scores, count)
        threshold = halfway(ours_scores, count)
        compiled_k = our_forward(arch, side, threshold, variables, batch)
        ours_k = int(np.asarray(compiled_k(variables, batch)["valid"]).sum())
        theirs_k = len(theirs_infer()[0]["scores"])
        measure(
            rows,
            bench,
            f"inference of 1 image {side}x{side}, {theirs_k} detections (ours {ours_k})",
            BOTH_TRANSFORMS,
            end_to_end(compiled_k, variables, config, examples[0], side),
            theirs_infer,
            inference_work(arch, side, threshold, variables, batch),
            images=1,
        )
    # Where the time goes: the backbone + FPN alone on both sides, each on the input its
    # transform made outside the timing.
    net = MaskRCNN(builders.model_config(config, arch["num_classes"]))

    def features(v, x, net=net):
        return net.apply(v, x, method=MaskRCNN.features)

    compiled_features = compilation.jit(features).lower(variables, batch["image"]).compile()
    normalised = model.transform([image])[0].tensors

    def ours_backbone(c=compiled_features, x=batch["image"]):
        return jax.block_until_ready(c(variables, x))

    def theirs_backbone(x=normalised):
        with torch.no_grad():
            return model.backbone(x)

    measure(
        rows,
        bench,
        f"of which backbone+FPN {side}x{side}",
        NO_TRANSFORM,
        ours_backbone,
        theirs_backbone,
        Work(conv_matmul_flops(features, variables, batch["image"]), flops_of(compiled_features)),
        images=1,
    )
    return rows


def training_rows(bench: Bench, side: int, examples, mesh) -> list[list[str]]:
    """A training step at batch 2 with our default (data-chosen) mask budget and with 128
    slots, and the loss alone at the default budget; both sides' transforms timed."""
    rows = []
    bench.model.train()
    theirs_train, theirs_loss = torchvision_training(bench, examples)
    # Static shapes: our mask head trains on a fixed number of RoIs per image; torchvision
    # trains on the positives there are. The default budget comes from the training data
    # (the trainer's rule on 64 scenes of this generator); 128 is detectron2's maximum.
    default_budget = default_mask_budget(bench.arch, side)
    for mask_rois in (default_budget, 128):
        config = our_config(bench.arch, side, 2, 0.05)
        config.model.mask_fg_per_image = mask_rois
        ours_train, work, seen = our_training_step(bench, config, examples, mesh)
        ours_train()  # also reads the number of positives for the row's name
        label = "default, from the data" if mask_rois == default_budget else "detectron2's"
        measure(
            rows,
            bench,
            f"training step {side}x{side}, batch 2, our mask RoIs {mask_rois}/image ({label}; "
            f"positives {seen['fg']:.0f}/image, {100 * seen['over']:.0f}% beyond budget)",
            BOTH_TRANSFORMS,
            ours_train,
            theirs_train,
            work,
            images=2,
        )
        if mask_rois == default_budget:  # where the time goes: the loss without its gradient
            ours_loss, loss_work = our_loss_alone(bench, config, examples)
            measure(
                rows,
                bench,
                f"of which the loss alone (no gradient) {side}x{side}",
                BOTH_TRANSFORMS,
                ours_loss,
                theirs_loss,
                loss_work,
                images=2,
            )
    bench.model.eval()
    return rows


def torchvision_training(bench: Bench, examples):
    """torchvision's training step (forward with its transform, backward, SGD momentum) and
    its loss alone, on the examples."""
    torch, model = bench.torch, bench.model
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9
    )
    images = [torch.from_numpy(e["image"]).permute(2, 0, 1).float() / 255.0 for e in examples]
    targets = [
        {
            "boxes": torch.from_numpy(e["boxes"].astype(np.float32)),
            "labels": torch.from_numpy(e["classes"].astype(np.int64) + 1),
            "masks": torch.from_numpy(e["masks"].astype(np.uint8)),
        }
        for e in examples
    ]

    def theirs_train():
        losses = model(images, targets)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        return float(total.detach())

    def theirs_loss():
        with torch.no_grad():
            return float(sum(model(images, targets).values()))

    return theirs_train, theirs_loss


def our_training_step(bench: Bench, config, examples, mesh):
    """Our training transform of the examples and one jitted step, as `instseg-jax train`
    runs them; its work, and a dict that each call fills with the step's positives per image
    (fg) and the fraction of them beyond the mask budget (over)."""
    variables = bench.variables
    cfg = builders.model_config(config, bench.arch["num_classes"])
    batch = our_batch(config, examples, train=True)
    tx = train_lib.optimizer(config, variables["params"])
    state = train_lib.state_from_variables(variables, tx, config)
    state = jax.tree.map(jnp.copy, state)  # the step donates its state
    step = train_lib.make_train_step(
        MaskRCNN(cfg), mask_rcnn_loss, tx, cfg, mesh, sharding.replicated(mesh)
    )
    conv_matmul = conv_matmul_flops(step, state, batch)
    compiled_step = step.lower(state, batch).compile()
    holder = {"state": state}
    seen = {}

    def ours_train():
        batch = our_batch(config, examples, train=True)
        holder["state"], metrics = compiled_step(holder["state"], batch)
        seen["fg"] = float(metrics["num_fg_rois"])
        seen["over"] = float(metrics["mask_rois_over_budget_fraction"])
        return jax.block_until_ready(metrics["loss"])

    return ours_train, Work(conv_matmul, flops_of(compiled_step)), seen


def our_loss_alone(bench: Bench, config, examples):
    """Our training transform and the loss without its gradient, and its work."""
    cfg = builders.model_config(config, bench.arch["num_classes"])
    net = MaskRCNN(cfg)
    params, frozen = bench.variables["params"], bench.variables["frozen"]
    batch = our_batch(config, examples, train=True)

    def loss_only(p, b):
        outputs = net.apply({"params": p, "frozen": frozen}, b, train=True, key=jax.random.key(0))
        return mask_rcnn_loss(outputs, b, cfg)[0]

    compiled_loss = compilation.jit(loss_only).lower(params, batch).compile()

    def ours_loss():
        return jax.block_until_ready(compiled_loss(params, our_batch(config, examples, train=True)))

    return ours_loss, Work(conv_matmul_flops(loss_only, params, batch), flops_of(compiled_loss))


def record(bench: Bench, args, table: str, ceiling: dict) -> None:
    """Append the table to RESULTS.md with the machine line and what the figures count."""
    versions = {"torch": bench.torch.__version__, "torchvision": bench.torchvision.__version__}
    header = common.machine_line(versions) + f"; medians of {bench.rounds} interleaved rounds"
    notes = (
        "Measured in the same run (3x3 convolution, 256->256, batch 2 at 100x100): XLA default "
        f"(YNNPACK) {ceiling['xla default'] / 1e9:.1f} GFLOP/s, XLA with the CPU compile option "
        f"(Eigen) {ceiling['xla option'] / 1e9:.1f} GFLOP/s, torch "
        f"{ceiling['torch'] / 1e9:.1f} GFLOP/s (2048^2 float32 matmul through XLA: "
        f"{ceiling['matmul'] / 1e9:.1f} GFLOP/s); the percentages are of the fastest "
        "convolution. Input transform timed: 'both sides' times our transform as torchvision's "
        "call times its own, 'neither side' times the networks on inputs made beforehand. "
        "GFLOP: convolutions and matmuls on both sides (torch.utils.flop_counter on one "
        "torchvision call, the same rules on our programs' jaxprs; for inference the boxes "
        "program and the mask program on the slots used); the last column is XLA's count of "
        "our compiled programs, every op included."
    )
    if args.backbone_grad:
        title = "Backbone+FPN gradient vs torchvision: `.venv-peer/bin/python "
        title += "experiments/benchmarks/vs_torchvision.py --backbone-grad --record`"
    else:
        title = "Mask R-CNN R50-FPN vs torchvision: `.venv-peer/bin/python "
        title += "experiments/benchmarks/vs_torchvision.py --record`"
    common.append_results(title, header, table, notes)


def default_mask_budget(arch, side: int) -> int:
    """The budget `instseg-jax train` would choose (model.mask_fg_per_image = 0) for a training
    set of this benchmark's scenes: builders.defaults_from_data on 64 of them."""
    config = our_config(arch, side, 2, 0.05)
    config.model.mask_fg_per_image = 0
    train_source = SyntheticSource(64, (side, side), seed=12, max_shapes=8)
    for note in builders.defaults_from_data(config, train_source):
        print(note, flush=True)
    return int(config.model.mask_fg_per_image)


def measure(rows, bench: Bench, name, footing, ours, theirs, work: Work, images: int) -> None:
    """Time ours and theirs interleaved, append the row and print it."""
    t = common.time_interleaved({"ours": ours, "theirs": theirs}, rounds=bench.rounds)
    rows.append(row(name, footing, t, work, torch_flops(theirs), bench.best_conv, images))
    print(rows[-1], flush=True)


def torch_flops(fn) -> float:
    """FLOPs torch's own counter sees in one call (convolutions and matmuls, with backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def row(name, footing, t, work: Work, theirs_flops, best_conv, images) -> list[str]:
    ours, theirs = t["ours"], t["theirs"]
    ours_flops = work.conv_matmul
    return [
        name,
        footing,
        f"{ours:.2f}",
        f"{theirs:.2f}",
        f"{ours / theirs:.2f}",
        f"{theirs / ours:.2f}x",
        f"{ours_flops / 1e9:.0f} / {theirs_flops / 1e9:.0f}",
        f"{ours_flops / ours / 1e9:.1f} ({100 * ours_flops / ours / best_conv:.0f}%)",
        f"{theirs_flops / theirs / 1e9:.1f} ({100 * theirs_flops / theirs / best_conv:.0f}%)",
        f"{work.xla / 1e9:.0f}",
    ]


if __name__ == "__main__":
    sys.exit(main())
