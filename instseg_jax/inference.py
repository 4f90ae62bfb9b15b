"""A model's inference over a source, as evaluate, predict and the demo all run it: the jitted
detections function of a config and the loop that feeds it test-size batches in order.

What the detections become (COCO results and scores, image files, overlays) is each caller's
own; this module ends at host Detections.
"""

from __future__ import annotations

import functools
import time

import jax

from instseg_jax import builders, compilation


@functools.lru_cache(maxsize=4)
def _inference_fn(module, cfg):
    model = module.Model(cfg)
    if hasattr(module, "make_inference"):  # the method runs its own jitted programs
        return module.make_inference(model)
    return compilation.jit(lambda v, b: model.apply(v, b, train=False)["detections"])


def inference_fn(config, num_classes: int):
    """The detections function (variables, device batch) -> Detections, compiled once per
    (method, model config): one jitted forward, or the method's `make_inference` (optional in
    the method interface) when it splits inference into several programs."""
    module = builders.method(config)
    return _inference_fn(module, builders.model_config(config, num_classes))


def run_inference(config, variables, source, num_classes: int, max_batches=None, desc="eval"):
    """Yield (host batch, host Detections, (input seconds, device seconds)) over a source at the
    test size, in order; the last batch is padded with example_valid False. Device seconds
    include the compilation on the first batch."""
    # Imported here, not above: the input pipeline (grain) loads only when a model runs, so
    # `eval --results`, which scores a results file, never pays for it.
    from tqdm import tqdm

    from instseg_jax.input.pipeline import InputPipeline

    pipeline = InputPipeline(
        source,
        builders.transform_config(config, train=False),
        config.eval.global_batch,
        seed=config.seed,
        num_workers=0,
        process_index=0,
        process_count=1,
    )
    infer = inference_fn(config, num_classes)
    total = pipeline.num_batches if max_batches is None else min(max_batches, pipeline.num_batches)
    bar = tqdm(total=total, desc=desc, unit="batch", leave=False)
    try:
        for _ in range(total):
            start = time.perf_counter()
            batch = next(pipeline)
            loaded = time.perf_counter()
            found = jax.device_get(infer(variables, builders.device_fields(batch)))
            yield batch, found, (loaded - start, time.perf_counter() - loaded)
            bar.update(1)
    finally:
        bar.close()
        pipeline.close()
