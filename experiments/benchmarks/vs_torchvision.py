"""Mask R-CNN R50-FPN speed, ours against torchvision, side by side (`make peer` environment).

    .venv-peer/bin/python experiments/benchmarks/vs_torchvision.py [--record]

Same architecture and settings on both sides: torchvision's maskrcnn_resnet50_fpn with seeded
random weights (experiments/parity/torchvision.py's), and ours with those weights converted
under the torchvision preset, on square synthetic scenes at 512x512 and 800x800 (torchvision's
min_size = max_size = the side, so neither side resizes). Timed interleaved in one process,
medians:

- inference of 1 image, end to end: torchvision's model(images) (its transform, RPN, heads,
  masks pasted at the image size) against our test-time transform, our inference as evaluate
  and predict run it (the method's make_inference: boxes, then the mask head on 16 or all 100
  slots, picked on the host) and the host paste of the valid detections' masks;
- a training step at batch 2 (SGD momentum; ours the training transform of both images and
  one jitted step with the gradient, update and non-finite guard; torchvision's forward,
  backward and optimizer.step(), its transform included), ours with the
  default mask budget (model.mask_fg_per_image = 0: chosen from the training data by the
  rule of methods/mask_rcnn.mask_budget_from_data, here from 64 scenes of the same
  generator) and with 128 slots (detectron2's maximum);
- inference of one image with 1, 10 and 100 detections (score thresholds read off each side's
  own score list, so both sides keep the same number of detections), and the backbone+FPN
  forward alone;
- achieved FLOP/s (XLA's count of our compiled programs, the same architecture on both sides)
  against the machine's measured 3x3-convolution throughput (the faster of XLA and torch on a
  ResNet-sized convolution).
"""

from __future__ import annotations

import argparse
import importlib.util
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

from instseg_jax import builders, compilation, detections, sharding  # noqa: E402
from instseg_jax import train as train_lib  # noqa: E402
from instseg_jax.input import report  # noqa: E402
from instseg_jax.input.pipeline import stack_examples  # noqa: E402
from instseg_jax.input.synthetic import SyntheticSource  # noqa: E402
from instseg_jax.input.transforms import transform  # noqa: E402
from instseg_jax.methods.mask_rcnn import MaskRCNN  # noqa: E402
from instseg_jax.methods.mask_rcnn import loss_fn as mask_rcnn_loss  # noqa: E402
from instseg_jax.weights import torchvision as tv  # noqa: E402

COLUMNS = [
    "case",
    "ours (s)",
    "torchvision (s)",
    "ours / torchvision time",
    "ours ÷ torchvision images/s",
    "GFLOP ours (XLA, all ops) / torchvision (conv + matmul)",
    "ours GFLOP/s (% conv peak)",
    "torchvision GFLOP/s (% conv peak)",
]


def torch_side():
    """experiments/parity/torchvision.py as a module (its file name shadows the package)."""
    spec = importlib.util.spec_from_file_location(
        "tv_parity", ROOT / "experiments" / "parity" / "torchvision.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def backbone_grad(args, model, variables, arch, best_conv, torch, torchvision) -> int:
    """Backbone+FPN forward and backward (gradient of the feature sum w.r.t. the trainable
    parameters; res2 and the stem frozen on both sides), batch 2."""
    rows = []
    model.train()
    for side in args.sides:
        config = our_config(arch, side, 2, 0.05)
        net = MaskRCNN(builders.model_config(config, arch["num_classes"]))
        frozen = variables["frozen"]
        image = jnp.asarray(
            np.random.default_rng(0).integers(0, 256, (2, side, side, 3)), jnp.float32
        )

        def feature_sum(params, x, net=net, frozen=frozen):
            features = net.apply({"params": params, "frozen": frozen}, x, method=MaskRCNN.features)
            return sum(jnp.sum(f) for f in features.values())

        forward = compilation.jit(feature_sum).lower(variables["params"], image).compile()
        grad = compilation.jit(jax.grad(feature_sum)).lower(variables["params"], image).compile()
        tensor = (torch.from_numpy(np.asarray(image)).permute(0, 3, 1, 2) / 255.0 - 0.45) / 0.225

        def theirs_forward(x=tensor):
            with torch.no_grad():
                return sum(f.sum() for f in model.backbone(x).values())

        def theirs_grad(x=tensor):
            model.zero_grad()
            total = sum(f.sum() for f in model.backbone(x).values())
            total.backward()
            return float(total.detach())

        for name, ours_fn, theirs_fn, compiled in (
            ("forward", forward, theirs_forward, forward),
            ("forward+backward", grad, theirs_grad, grad),
        ):
            measure(
                rows,
                f"backbone+FPN {name} {side}x{side}, batch 2",
                lambda f=ours_fn, x=image: jax.block_until_ready(f(variables["params"], x)),
                theirs_fn,
                flops_of(compiled),
                best_conv,
                2,
                args.rounds,
            )
    table = common.markdown_table(rows, COLUMNS)
    print(table)
    if args.record:
        common.append_results(
            "Backbone+FPN gradient vs torchvision: `.venv-peer/bin/python "
            "experiments/benchmarks/vs_torchvision.py --backbone-grad --record`",
            common.machine_line(
                {"torch": torch.__version__, "torchvision": torchvision.__version__}
            )
            + f"; medians of {args.rounds} interleaved rounds",
            table,
        )
    return 0


def halfway(scores_descending, count: int) -> float:
    below = scores_descending[count] if count < len(scores_descending) else 0.0
    return float((scores_descending[count - 1] + below) / 2)


def our_forward(arch, side: int, threshold: float, variables, batch):
    """Our inference as evaluate and predict run it (builders.inference_fn), warmed up so
    that both of its mask-slot programs are compiled before timing."""
    config = our_config(arch, side, 1, threshold)
    infer = builders.inference_fn(config, arch["num_classes"])
    jax.block_until_ready(infer(variables, batch))
    return infer


def inference_flops(arch, side: int, threshold: float, variables, batch) -> float:
    """XLA's FLOP count of what our inference runs: the boxes program, then the mask program
    on the slots make_inference picks for this many detections."""
    config = our_config(arch, side, 1, threshold)
    cfg = builders.model_config(config, arch["num_classes"])
    net = MaskRCNN(cfg)
    boxes = compilation.jit(lambda v, b: net.apply(v, b, method=MaskRCNN.detect_boxes))
    boxes = boxes.lower(variables, batch).compile()
    detections, features, canvas_boxes = boxes(variables, batch)
    count = int(np.asarray(detections["valid"]).sum(axis=1).max())
    small = cfg.test_mask_slots_small
    slots = small if count <= small else cfg.detections_per_image
    masks = compilation.jit(
        lambda v, f, bx, c: net.apply(
            v, f, bx[:, :slots], c[:, :slots], None, method=MaskRCNN.box_masks
        )
    )
    masks = masks.lower(variables, features, canvas_boxes, detections["classes"]).compile()
    return flops_of(boxes) + flops_of(masks)


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
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan")))


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[512, 800])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument(
        "--backbone-grad",
        action="store_true",
        help="only time backbone+FPN forward+backward on both sides (the training gap's source)",
    )
    args = parser.parse_args(argv)
    side_module = torch_side()
    torch = side_module.torch
    torchvision = side_module.torchvision

    model = side_module.seeded_model(args.seed, 0.05)
    variables, arch = tv.convert({k: v.numpy() for k, v in model.state_dict().items()}, "seeded")
    variables = jax.tree.map(jnp.asarray, variables)
    ceiling = conv_ceiling(torch)
    ceiling["matmul"] = common.measure_ceilings()["matmul_flops"]
    best_conv = max(ceiling["xla default"], ceiling["xla option"], ceiling["torch"])
    print(f"conv throughput: { ({k: f'{v / 1e9:.1f} GFLOP/s' for k, v in ceiling.items()}) }")
    if args.backbone_grad:
        return backbone_grad(args, model, variables, arch, best_conv, torch, torchvision)
    rows, notes = [], []
    mesh = sharding.make_mesh()
    for side in args.sides:
        examples = scenes(side, 2, 8)
        model.transform.min_size = (side,)
        model.transform.max_size = side
        # ------------------------------------------------------------------ inference
        model.eval()
        config = our_config(arch, side, 1, 0.05)
        net = MaskRCNN(builders.model_config(config, arch["num_classes"]))
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
                f"inference of 1 image {side}x{side}, {theirs_k} detections (ours {ours_k})",
                end_to_end(compiled_k, variables, config, examples[0], side),
                theirs_infer,
                inference_flops(arch, side, threshold, variables, batch),
                best_conv,
                1,
                args.rounds,
            )
        # Where the time goes: the backbone + FPN alone on both sides.
        features = compilation.jit(lambda v, x, net=net: net.apply(v, x, method=MaskRCNN.features))
        compiled_features = features.lower(variables, batch["image"]).compile()
        normalised = model.transform([image])[0].tensors

        def ours_backbone(c=compiled_features, x=batch["image"]):
            return jax.block_until_ready(c(variables, x))

        def theirs_backbone(x=normalised):
            with torch.no_grad():
                return model.backbone(x)

        measure(
            rows,
            f"of which backbone+FPN {side}x{side}",
            ours_backbone,
            theirs_backbone,
            flops_of(compiled_features),
            best_conv,
            1,
            args.rounds,
        )
        if args.skip_train:
            continue
        # ------------------------------------------------------------------ training step
        model.train()
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

        def theirs_train(images=images, targets=targets, optimizer=optimizer):
            losses = model(images, targets)
            total = sum(losses.values())
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            return float(total.detach())

        def theirs_loss(images=images, targets=targets):
            with torch.no_grad():
                return float(sum(model(images, targets).values()))

        # Static shapes: our mask head trains on a fixed number of RoIs per image; torchvision
        # trains on the positives there are. The default budget comes from the training data
        # (the trainer's rule on 64 scenes of this generator); 128 is detectron2's maximum.
        default_budget = default_mask_budget(arch, side)
        for mask_rois in (default_budget, 128):
            config = our_config(arch, side, 2, 0.05)
            config.model.mask_fg_per_image = mask_rois
            cfg = builders.model_config(config, arch["num_classes"])
            net = MaskRCNN(cfg)
            batch = our_batch(config, examples, train=True)
            tx = train_lib.optimizer(config, variables["params"])
            state = train_lib.state_from_variables(variables, tx, config)
            state = jax.tree.map(jnp.copy, state)  # the step donates its state
            step = train_lib.make_train_step(
                net, mask_rcnn_loss, tx, cfg, mesh, sharding.replicated(mesh)
            )
            compiled_step = step.lower(state, batch).compile()
            train_flops = flops_of(compiled_step)
            holder = {"state": state}

            def ours_train(
                compiled_step=compiled_step, config=config, holder=holder, examples=examples
            ):
                # Our training transform of both images is timed, as torchvision's is.
                batch = our_batch(config, examples, train=True)
                holder["state"], metrics = compiled_step(holder["state"], batch)
                holder["fg"] = float(metrics["num_fg_rois"])
                holder["over"] = float(metrics["mask_rois_over_budget_fraction"])
                return jax.block_until_ready(metrics["loss"])

            ours_train()  # also reads the number of positives for the row's name
            label = "default, from the data" if mask_rois == default_budget else "detectron2's"
            measure(
                rows,
                f"training step {side}x{side}, batch 2, our mask RoIs {mask_rois}/image ({label}; "
                f"positives {holder['fg']:.0f}/image, {100 * holder['over']:.0f}% beyond budget)",
                ours_train,
                theirs_train,
                train_flops,
                best_conv,
                2,
                args.rounds,
            )
            if mask_rois == default_budget:  # where the time goes: the loss without its gradient
                params, frozen = variables["params"], variables["frozen"]

                def loss_only(p, b, net=net, cfg=cfg, frozen=frozen):
                    outputs = net.apply(
                        {"params": p, "frozen": frozen}, b, train=True, key=jax.random.key(0)
                    )
                    return mask_rcnn_loss(outputs, b, cfg)[0]

                compiled_loss = compilation.jit(loss_only).lower(params, batch).compile()

                def ours_loss(c=compiled_loss, batch=batch, params=params):
                    return jax.block_until_ready(c(params, batch))

                measure(
                    rows,
                    f"of which the loss alone (no gradient) {side}x{side}",
                    ours_loss,
                    theirs_loss,
                    flops_of(compiled_loss),
                    best_conv,
                    2,
                    args.rounds,
                )
        model.eval()
    table = common.markdown_table(rows, COLUMNS)
    print(table)
    if args.record:
        notes.append(
            f"Convolution throughput measured in the same run (3x3, 256->256, batch 2 at 100x100): "
            f"XLA default (YNNPACK) {ceiling['xla default'] / 1e9:.1f} GFLOP/s, XLA with the CPU "
            f"compile option (Eigen) {ceiling['xla option'] / 1e9:.1f} GFLOP/s, torch "
            f"{ceiling['torch'] / 1e9:.1f} GFLOP/s (2048^2 float32 matmul through XLA: "
            f"{ceiling['matmul'] / 1e9:.1f} GFLOP/s); the percentages are of the fastest "
            "convolution. FLOPs: XLA's count of our compiled program (for inference: the boxes "
            "program and the 100-slot mask program), and torch.utils.flop_counter's count of one "
            "torchvision call (it counts convolutions and matmuls only)."
        )
        common.append_results(
            "Mask R-CNN R50-FPN vs torchvision: `.venv-peer/bin/python "
            "experiments/benchmarks/vs_torchvision.py --record`",
            common.machine_line(
                {"torch": torch.__version__, "torchvision": torchvision.__version__}
            )
            + f"; medians of {args.rounds} interleaved rounds",
            table,
            "\n".join(notes),
        )
    return 0


def default_mask_budget(arch, side: int) -> int:
    """The budget `instseg-jax train` would choose (model.mask_fg_per_image = 0) for a training
    set of this benchmark's scenes: builders.defaults_from_data on 64 of them."""
    config = our_config(arch, side, 2, 0.05)
    config.model.mask_fg_per_image = 0
    train_source = SyntheticSource(64, (side, side), seed=12, max_shapes=8)
    for note in builders.defaults_from_data(config, train_source):
        print(note, flush=True)
    return int(config.model.mask_fg_per_image)


def measure(rows, name, ours, theirs, flops, best_conv, images, rounds) -> None:
    """Time ours and theirs interleaved, append the row and print it."""
    t = common.time_interleaved({"ours": ours, "theirs": theirs}, rounds=rounds)
    rows.append(row(name, t, flops, best_conv, images, theirs))
    print(rows[-1], flush=True)


def torch_flops(fn) -> float:
    """FLOPs torch's own counter sees in one call (convolutions and matmuls, with backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def row(name, t, flops, best_conv, images, theirs_fn=None) -> list[str]:
    ours, theirs = t["ours"], t["theirs"]
    theirs_flops = torch_flops(theirs_fn) if theirs_fn is not None else float("nan")
    return [
        name,
        f"{ours:.2f}",
        f"{theirs:.2f}",
        f"{ours / theirs:.2f}",
        f"{theirs / ours:.2f}x",
        f"{flops / 1e9:.0f} / {theirs_flops / 1e9:.0f}",
        f"{flops / ours / 1e9:.1f} ({100 * flops / ours / best_conv:.0f}%)",
        f"{theirs_flops / theirs / 1e9:.1f} ({100 * theirs_flops / theirs / best_conv:.0f}%)",
    ]


if __name__ == "__main__":
    sys.exit(main())
