"""The grain input pipeline: seeded, sharded per process, fixed batches, exactly resumable.

Every batch is a pure function of (seed, position in the stream): global example g of the
training stream is example ``perm(seed, epoch)[g mod n]`` of epoch ``g // n``, augmented with a
generator seeded by (seed, epoch, example index). Workers only change where that function runs,
so the stream does not depend on the number of workers, and restoring the iterator state (the
next position) continues it exactly.

With repeat-factor sampling (input.repeat_factor_threshold, input/repeat_factors.py) epoch e
lists each image a seeded number of times, shuffled, so epochs differ in length: position g is
found among the cumulative epoch lengths (StreamOrder), each a function of (seed, epoch), and
the augmentation generator is seeded by (seed, epoch, index, position in the epoch) so the
copies of an image differ. Copy-paste (input.copy_paste, input/copy_paste.py) pastes onto the
example at g instances of the example one slot before it in its global batch (torchvision rolls
the batch by one), drawn with its own generator (seed, epoch, index, salt). The SSD-style
augmentation (input.expand_ratio, input.min_iou_crop, input.photometric; input/ssd_augment.py)
draws from another salted generator: zoom-out and crop on the decoded example after
copy-paste, photometric distortion on the transformed canvas.

Process p of P takes slots [p * B/P, (p + 1) * B/P) of every global batch of B examples.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import signal
from collections.abc import Iterator

import grain
import numpy as np

from instseg_jax.config import ConfigValueError
from instseg_jax.input import copy_paste, report, ssd_augment
from instseg_jax.input.images import DataError, UnusableExample
from instseg_jax.input.repeat_factors import epoch_copies, repeat_factors
from instseg_jax.input.transforms import TransformConfig, transform

log = logging.getLogger(__name__)

# How many following examples to try in place of an unusable one before giving up.
_MAX_CONSECUTIVE_UNUSABLE = 32


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """Where a process's local example l sits in the global stream."""

    num_examples: int
    global_batch: int
    process_index: int
    process_count: int

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.process_count

    def global_index(self, local_index: int) -> int:
        step, slot = divmod(local_index, self.local_batch)
        return step * self.global_batch + self.process_index * self.local_batch + slot


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The shuffle of one epoch: a permutation keyed only on (seed, epoch)."""
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_examples)


# Keys the generator of an epoch's repeat counts and shuffle apart from epoch_order's.
_REPEAT_SALT = 0x4EAF


class StreamOrder:
    """Training stream position g -> (epoch, position in the epoch) -> example index.

    Without repeat factors every epoch is epoch_order's permutation of the n examples. With
    them (float64[n], each >= 1) epoch e holds repeat_factors.epoch_copies of each example,
    shuffled, both drawn from a generator keyed on (seed, e): its length is known without its
    order, and the cumulative lengths are extended (and kept) as far as the stream has asked.
    """

    def __init__(self, num_examples: int, seed: int, factors: np.ndarray | None = None):
        self.num_examples = num_examples
        self.seed = seed
        self.factors = None if factors is None else np.asarray(factors, np.float64)
        self._ends: list[int] = []  # _ends[e]: stream position after epoch e
        self._orders: dict[int, np.ndarray] = {}  # a few recent epochs' orders

    def _generator(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, _REPEAT_SALT])

    def epoch_length(self, epoch: int) -> int:
        if self.factors is None:
            return self.num_examples
        return int(epoch_copies(self.factors, self._generator(epoch)).sum())

    def locate(self, position: int) -> tuple[int, int]:
        """(epoch, position in that epoch) of stream position g."""
        if self.factors is None:
            return divmod(position, self.num_examples)
        while not self._ends or self._ends[-1] <= position:
            last = self._ends[-1] if self._ends else 0
            self._ends.append(last + self.epoch_length(len(self._ends)))
        epoch = int(np.searchsorted(self._ends, position, side="right"))
        return epoch, position - (self._ends[epoch - 1] if epoch else 0)

    def order(self, epoch: int) -> np.ndarray:
        """int64[epoch length]: the example index at each position of the epoch."""
        if self.factors is None:
            return epoch_order(self.seed, epoch, self.num_examples)
        if epoch not in self._orders:
            rng = self._generator(epoch)
            copies = epoch_copies(self.factors, rng)  # the same draws as epoch_length's
            listed = np.repeat(np.arange(self.num_examples), copies)
            if len(self._orders) >= 4:
                self._orders.pop(next(iter(self._orders)))
            self._orders[epoch] = listed[rng.permutation(len(listed))]
        return self._orders[epoch]

    def index_at(self, position: int) -> int:
        epoch, offset = self.locate(position)
        return int(self.order(epoch)[offset])


def padding_example(config: TransformConfig) -> dict:
    """An all-zero example with example_valid False (fills the last evaluation batch)."""
    height, width = config.canvas_hw
    n = config.max_instances
    extra = {}
    if config.box_masks:
        extra["gt_masks"] = np.zeros((n, config.mask_size, config.mask_size), np.uint8)
    if config.full_mask_stride:
        s = config.full_mask_stride
        extra["gt_full_masks"] = np.zeros((n, height // s, width // s), np.uint8)
    if config.centers:
        extra["gt_centers"] = np.zeros((n, 2), np.float32)
    if config.contour_points:
        extra["gt_contours"] = np.zeros((n, config.contour_points, 2), np.float32)
    if config.keypoints:
        extra["gt_keypoints"] = np.zeros((n, config.keypoints, 3), np.float32)
    if config.semantic_stride:
        s = config.semantic_stride
        extra["gt_semantic"] = np.full((height // s, width // s), 255, np.uint8)
    return {
        "image": np.zeros((height, width, 3), np.uint8),
        "image_hw": np.zeros(2, np.int32),
        "orig_hw": np.zeros(2, np.int32),
        "scale": np.float32(1.0),
        "scale_yx": np.ones(2, np.float32),
        "crop_offset": np.zeros(2, np.int32),
        "flipped": np.bool_(False),
        "image_id": np.int64(-1),
        "example_valid": np.bool_(False),
        "gt_boxes": np.zeros((n, 4), np.float32),
        "gt_classes": np.zeros((n,), np.int32),
        "gt_valid": np.zeros((n,), bool),
        "ignore_boxes": np.zeros((config.max_ignore_regions, 4), np.float32),
        "ignore_valid": np.zeros((config.max_ignore_regions,), bool),
        **extra,
    }


class ExampleMaker:
    """local example index -> fixed-shape example dict (runs in the grain workers)."""

    def __init__(
        self,
        source,
        config: TransformConfig,
        spec: StreamSpec,
        seed: int,
        train: bool,
        strict: bool,
        order: StreamOrder | None = None,
    ):
        self.source = source
        self.config = config
        self.spec = spec
        self.seed = seed
        self.train = train
        self.strict = strict
        self.order = order or StreamOrder(spec.num_examples, seed)
        self._warned: set[str] = set()  # unusable examples already named

    def _load(self, index: int, counts: np.ndarray, unusable_as: str | None = None):
        """The source's example, or None for an unusable one, counted (and logged) under its
        kind, or under `unusable_as` when given; strict mode raises instead. What a skipped
        example's annotations counted before it was found unusable is not counted."""
        own = report.new_counts()
        try:
            decoded = self.source.load(index, own)
        except UnusableExample as error:
            if self.strict:
                raise
            report.count(counts, unusable_as or error.kind)
            if str(error) not in self._warned:  # once per process: every epoch meets it again
                self._warned.add(str(error))
                log.warning("%s: %s", "skipped" if unusable_as is None else unusable_as, error)
            return None
        counts += own
        return decoded

    def _partner(self, g: int, counts: np.ndarray):
        """The decoded copy-paste partner of stream position g: the example one slot before it
        in its global batch, wrapping (a global batch of one: the next position). Its load
        counts like any other; an unusable one means no paste, counted as
        copy_paste_partner_unusable (not under its own kind: that counts skipped examples)."""
        batch = self.spec.global_batch
        start = g - g % batch
        partner = g + 1 if batch == 1 else start + (g - start - 1) % batch
        index = self.order.index_at(partner)
        return self._load(index, counts, unusable_as="copy_paste_partner_unusable")

    def __call__(self, local_index: int) -> dict:
        counts = report.new_counts()
        g = self.spec.global_index(int(local_index))
        n = self.spec.num_examples
        if not self.train and g >= n:
            example = padding_example(self.config)
            example["issues"] = counts
            return example
        epoch, position = self.order.locate(g) if self.train else (0, g)
        if not self.train:
            # Evaluation and prediction visit every example once, in order: an unusable one
            # becomes a padding slot (counted), never a second copy of its neighbour.
            decoded = self._load(position, counts)
            if decoded is None:
                example = padding_example(self.config)
                example["issues"] = counts
                return example
            example = transform(decoded, self.config, np.random.default_rng(0), counts)
            example["issues"] = counts
            return example
        order = self.order.order(epoch)
        for attempt in range(_MAX_CONSECUTIVE_UNUSABLE):
            # An unusable example is replaced by the next example of the same order: the
            # replacement is as deterministic as the stream itself.
            pos = (position + attempt) % len(order)
            index = int(order[pos])
            decoded = self._load(index, counts)
            if decoded is not None:
                break
        else:
            raise DataError(
                f"{_MAX_CONSECUTIVE_UNUSABLE} consecutive unusable examples from example "
                f"{position} of epoch {epoch}; check the data (the log names each of them)"
            )
        # Repeats of an image in one epoch get their own augmentation; without repeat factors
        # the key is the one streams had before them (a resumed run continues unchanged).
        key = [self.seed, epoch, index] + ([pos] if self.order.factors is not None else [])
        if self.config.copy_paste:
            paste_rng = np.random.default_rng([*key, copy_paste.COPY_PASTE_SALT])
            if paste_rng.uniform() < self.config.copy_paste:
                partner = self._partner(g, counts)
                if partner is not None:
                    decoded = copy_paste.paste(decoded, partner, self.config, paste_rng, counts)
        augment_rng = None
        if self.config.zooms_or_crops or self.config.photometric:
            augment_rng = np.random.default_rng([*key, ssd_augment.AUGMENT_SALT])
        if self.config.zooms_or_crops:
            decoded = ssd_augment.zoom_and_crop(decoded, self.config, augment_rng, counts)
        rng = np.random.default_rng(key)
        example = transform(decoded, self.config, rng, counts)
        if self.config.photometric:  # after resize and flip, as mmdetection's YOLACT recipe
            ssd_augment.distort_canvas(example, augment_rng)
        example["issues"] = counts
        return example


def _source_repeat_factors(source, threshold: float) -> np.ndarray:
    """Repeat factors of a source's images from its annotations (logged: their mean and the
    epoch length they give on average)."""
    if not hasattr(source, "image_categories"):
        raise ConfigValueError(
            f"input.repeat_factor_threshold={threshold}: the {type(source).__name__} source "
            "cannot list its images' categories; use a COCO, TFDS or synthetic source, or "
            "input.repeat_factor_threshold=0"
        )
    factors = repeat_factors(source.image_categories(), threshold)
    log.info(
        "repeat-factor sampling (t=%g): mean repeat factor %.3f (max %.2f, %d of %d images "
        "repeated), epochs of about %d examples instead of %d",
        threshold,
        factors.mean(),
        factors.max(),
        int((factors > 1).sum()),
        len(factors),
        round(factors.sum()),
        len(factors),
    )
    return factors


def _absl_flags_ready() -> None:
    """grain's worker processes read absl flags; outside an absl app they were never parsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _package_logging() -> tuple[int, str | None, str | None]:
    """(level, format, date format) of this process's "instseg_jax" logger, for workers."""
    package = logging.getLogger("instseg_jax")
    formatter = next((h.formatter for h in package.handlers if h.formatter), None)
    if formatter is None:
        return package.getEffectiveLevel(), None, None
    return package.getEffectiveLevel(), formatter._fmt, formatter.datefmt


def _init_worker(package_logging, worker_index: int, worker_count: int) -> None:
    """A loader worker's start: its warnings (an unreadable image) in the main process's format
    (a worker starts without the CLI's logging setup). It ignores SIGINT: a terminal's Ctrl-C
    reaches the whole process group, and the main process stops training and closes the
    workers itself (a worker stopped by it would print its traceback and leave its shared
    memory behind)."""
    del worker_index, worker_count
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    level, fmt, datefmt = package_logging
    if fmt is None:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(fmt, datefmt))
    package = logging.getLogger("instseg_jax")
    package.handlers = [handler]
    package.setLevel(level)
    package.propagate = False


def stack_examples(examples) -> dict:
    return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


class InputPipeline:
    """Batches of a source for one process: an iterator with get_state / set_state.

    Args:
      source: anything with ``__len__`` and ``load(index, counts) -> decoded example``
        (CocoSource, SyntheticSource, the TFDS source).
      config: the transform settings (config.train selects the training stream: shuffled,
        augmented, endless; otherwise one ordered pass, the last batch padded with
        example_valid=False).
      global_batch: B over all processes; must divide by the process count.
      num_workers: grain worker processes (0: in this process).
      strict: raise on an unusable example (images.UnusableExample: an unreadable image, one
        whose size differs from its annotations', a segmentation that does not fit it) instead
        of skipping it and counting it in the per-epoch report.
      process_index, process_count: default jax.process_index() / jax.process_count().
      repeat_factor_threshold: above 0 (training only), repeat-factor sampling with this
        frequency threshold t (input/repeat_factors.py); the source must list each image's
        categories (image_categories()).
    """

    def __init__(
        self,
        source,
        config: TransformConfig,
        global_batch: int,
        seed: int = 0,
        num_workers: int = 0,
        strict: bool = False,
        process_index: int | None = None,
        process_count: int | None = None,
        worker_buffer: int = 2,
        repeat_factor_threshold: float = 0.0,
    ):
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if global_batch % process_count:
            raise ConfigValueError(
                f"global batch {global_batch} does not divide over "
                f"{process_count} processes; change input.global_batch"
            )
        if len(source) == 0:
            raise ConfigValueError(
                f"the data source has no examples ({getattr(source, 'annotation_file', source)})"
            )
        self.config = config
        self.spec = StreamSpec(len(source), global_batch, process_index, process_count)
        self.train = config.train
        if self.train:
            self.num_batches = None
            num_local = 2**62  # endless: positions are computed, never materialised
        else:
            self.num_batches = -(-len(source) // global_batch)
            num_local = self.num_batches * self.spec.local_batch
        factors = None
        if self.train and repeat_factor_threshold > 0:
            factors = _source_repeat_factors(source, repeat_factor_threshold)
        self.order = StreamOrder(len(source), seed, factors)
        self._maker = ExampleMaker(source, config, self.spec, seed, self.train, strict, self.order)
        self._num_local = num_local
        self._num_workers = num_workers
        self._worker_buffer = worker_buffer
        self._dataset = self._stream_from(0)
        self._iterator = None
        self.step = 0
        self.epoch_counts = report.new_counts()
        self.total_counts = report.new_counts()
        self._reported_epoch = 0
        self._last_logged = report.new_counts()  # the counts of the last epoch line

    def _stream_from(self, step: int):
        """The grain dataset of this process's batches from batch `step` on. Every batch is a
        pure function of its position, so a stream rebuilt at a position continues exactly,
        whatever the number of workers before and after."""
        local = self.spec.local_batch
        dataset = (
            grain.MapDataset.range(step * local, self._num_local)
            .map(self._maker)
            .batch(local, drop_remainder=False, batch_fn=stack_examples)
        )
        dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        if self._num_workers > 0:
            _absl_flags_ready()
            dataset = dataset.mp_prefetch(
                grain.MultiprocessingOptions(
                    num_workers=self._num_workers, per_worker_buffer_size=self._worker_buffer
                ),
                worker_init_fn=functools.partial(_init_worker, _package_logging()),
            )
        return dataset

    def __iter__(self) -> Iterator[dict]:
        return self

    def _ensure_iterator(self):
        if self._iterator is None:
            self._iterator = iter(self._dataset)
        return self._iterator

    def epoch_of_step(self, step: int) -> int:
        return self.order.locate(step * self.spec.global_batch)[0]

    def __next__(self) -> dict:
        if self.num_batches is not None and self.step >= self.num_batches:
            raise StopIteration
        # Plain arrays: a worker's batch arrives in shared memory, which is unlinked only when
        # its last reference goes; a batch kept alive until the interpreter exits (a device
        # array on CPU may alias it) would leave the segment behind ("leaked shared_memory").
        batch = {k: np.array(v) for k, v in next(self._ensure_iterator()).items()}
        issues = batch.pop("issues").sum(axis=0)
        epoch = self.epoch_of_step(self.step) if self.train else 0
        if self.train and epoch > self._reported_epoch:
            self._report_epoch()
            self._reported_epoch = epoch
        self.epoch_counts += issues
        self.total_counts += issues
        self.step += 1
        if self.num_batches is not None and self.step == self.num_batches:
            self._report_epoch()
        return batch

    def _report_epoch(self):
        """One line for an epoch (a pass, in evaluation) with data issues, unless the epoch
        before said the same; none without: the trainer sums up the whole run at its end."""
        if self.epoch_counts.any() and not np.array_equal(self.epoch_counts, self._last_logged):
            where = f"input epoch {self._reported_epoch}" if self.train else "input"
            log.info("%s: %s", where, report.summary(self.epoch_counts))
            self._last_logged = self.epoch_counts
        self.epoch_counts = report.new_counts()

    def get_state(self) -> dict:
        """JSON-serialisable position of the stream (and the issue counts so far)."""
        return {
            "step": self.step,
            "epoch_counts": self.epoch_counts.tolist(),
            "total_counts": self.total_counts.tolist(),
            "reported_epoch": self._reported_epoch,
        }

    def set_state(self, state: dict) -> None:
        """Continue at a saved position (get_state); the stream is rebuilt there, so the number
        of workers may differ from the saving run's (a saved "grain" entry is not needed)."""
        self.close()
        self.step = int(state["step"])
        self._dataset = self._stream_from(self.step)
        self.epoch_counts = report.resized(state["epoch_counts"])
        self.total_counts = report.resized(state["total_counts"])
        self._reported_epoch = int(state["reported_epoch"])

    def close(self) -> None:
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()
        self._iterator = None
