"""Mask R-CNN R50-FPN speed, ours against torchvision, side by side (`make peer` environment).

    .venv-peer/bin/python experiments/benchmarks/vs_torchvision.py [--record]

Same architecture and settings on both sides: torchvision's maskrcnn_resnet50_fpn with seeded
random weights (experiments/parity/torchvision.py's), and ours with those weights converted
under the torchvision preset, on square synthetic scenes at 512x512 and 800x800 (torchvision's
min_size = max_size = the side, so neither side resizes). Timed interleaved in one process,
medians:

- inference of 1 image, end to end: torchvision's model(images) (normalise, pad, RPN, heads,
  masks pasted at the image size) against our jitted forward plus our jitted paste of the K
  mask slots at the image size;
- a training step at batch 2 (SGD momentum; ours one jitted step with the gradient, update and
  non-finite guard; torchvision's forward, backward and optimizer.step());
- inference at 800x800 with 1, 10 and 100 detections (score thresholds read off torchvision's
  own score list, so both sides keep the same detections): our shapes are static, so our time
  should not move;
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
    "GFLOP ours / torchvision",
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
    config = our_config(arch, side, 1, threshold)
    net = MaskRCNN(builders.model_config(config, arch["num_classes"]))
    forward = compilation.jit(lambda v, b: net.apply(v, b, train=False)["detections"])
    return forward.lower(variables, batch).compile()


def end_to_end(compiled, variables, batch, side: int):
    """Our inference as a user gets it: the compiled forward, then the valid detections' masks
    pasted at the image size (instseg_jax.detections, host side)."""

    def run():
        det = jax.device_get(compiled(variables, batch))
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
    """FLOP/s of one ResNet-sized 3x3 convolution (batch 2, 100x100, 256 -> 256) in XLA and
    in torch: the machine's convolution throughput is the faster of the two."""
    x = jnp.ones((2, 100, 100, 256), jnp.float32)
    w = jnp.ones((3, 3, 256, 256), jnp.float32) * 0.01
    conv = jax.jit(
        lambda a, b: jax.lax.conv_general_dilated(
            a, b, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    )
    tx = torch.ones(2, 256, 100, 100)
    tw = torch.ones(256, 256, 3, 3) * 0.01
    flops = 2 * 2 * 100 * 100 * 256 * 256 * 9
    with torch.no_grad():
        t = common.time_interleaved(
            {
                "xla": lambda: jax.block_until_ready(conv(x, w)),
                "torch": lambda: torch.nn.functional.conv2d(tx, tw, padding=1),
            },
            rounds=7,
        )
    return {name: flops / seconds for name, seconds in t.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[512, 800])
    parser.add_argument("--rounds", type=int, default=3)
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
    best_conv = max(ceiling["xla"], ceiling["torch"])
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
        model.roi_heads.score_thresh = 0.05
        config = our_config(arch, side, 1, 0.05)
        net = MaskRCNN(builders.model_config(config, arch["num_classes"]))
        batch = our_batch(config, examples[:1], train=False)
        compiled = our_forward(arch, side, 0.05, variables, batch)
        infer_flops = flops_of(compiled)
        ours_infer = end_to_end(compiled, variables, batch, side)

        image = torch.from_numpy(examples[0]["image"]).permute(2, 0, 1).float() / 255.0

        def theirs_infer(image=image):
            with torch.no_grad():
                return model([image])

        measure(
            rows,
            f"inference {side}x{side}, 1 image",
            ours_infer,
            theirs_infer,
            infer_flops,
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
        # ------------------------------------------------------------------ detection counts
        if side == max(args.sides):
            # Random weights give near-equal scores (gaps below float32 noise), so each side
            # takes its threshold from its own scores: halfway between its count-th and next
            # score keeps exactly `count` (greedy NMS keeps by score), both capped at 100.
            model.roi_heads.score_thresh = 0.0
            theirs_scores = np.sort(theirs_infer()[0]["scores"].numpy())[::-1]
            ours_all = our_forward(arch, side, 0.0, variables, batch)
            ours_scores = np.sort(np.asarray(ours_all(variables, batch)["scores"][0]))[::-1]
            for count in (1, 10, 100):
                model.roi_heads.score_thresh = halfway(theirs_scores, count)
                compiled_k = our_forward(arch, side, halfway(ours_scores, count), variables, batch)
                ours_k = int(np.asarray(compiled_k(variables, batch)["valid"]).sum())
                theirs_k = len(theirs_infer()[0]["scores"])
                measure(
                    rows,
                    f"inference {side}x{side}, {theirs_k} detections (ours {ours_k})",
                    end_to_end(compiled_k, variables, batch, side),
                    theirs_infer,
                    infer_flops,
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

        # Static shapes: our mask head trains on a fixed number of RoIs per image (the preset's
        # 128 = 25% of 512, torchvision's maximum); torchvision trains on the positives there
        # are. The second row sizes our budget to these scenes' positives.
        for mask_rois in (128, 32):
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

            def ours_train(compiled_step=compiled_step, batch=batch, holder=holder):
                holder["state"], metrics = compiled_step(holder["state"], batch)
                holder["fg"] = float(metrics["num_fg_rois"])
                return jax.block_until_ready(metrics["loss"])

            ours_train()  # also reads the number of positives for the row's name
            measure(
                rows,
                f"training step {side}x{side}, batch 2, our mask RoIs {mask_rois}/image "
                f"(positives: {holder['fg']:.0f}/image)",
                ours_train,
                theirs_train,
                train_flops,
                best_conv,
                2,
                args.rounds,
            )
            if mask_rois == 128:  # where the time goes: the loss without its gradient
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
            f"XLA {ceiling['xla'] / 1e9:.1f} GFLOP/s, torch {ceiling['torch'] / 1e9:.1f} GFLOP/s "
            f"(2048^2 float32 matmul through XLA: {ceiling['matmul'] / 1e9:.1f} GFLOP/s); "
            "the percentages are of the faster convolution. FLOPs: XLA's count of our compiled "
            "program, and torch.utils.flop_counter's count of one torchvision call (it counts "
            "convolutions and matmuls only)."
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
