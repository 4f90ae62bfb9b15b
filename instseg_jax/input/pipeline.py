"""The grain input pipeline: seeded, sharded per process, fixed batches, exactly resumable.

Every batch is a pure function of (seed, position in the stream): global example g of the
training stream is example ``perm(seed, epoch)[g mod n]`` of epoch ``g // n``, augmented with a
generator seeded by (seed, epoch, example index). Workers only change where that function runs,
so the stream does not depend on the number of workers, and restoring the iterator state (the
next position) continues it exactly.

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
from instseg_jax.input import report
from instseg_jax.input.images import DataError, UnusableExample
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
    ):
        self.source = source
        self.config = config
        self.spec = spec
        self.seed = seed
        self.train = train
        self.strict = strict
        self._warned: set[str] = set()  # unusable examples already named

    def _load(self, index: int, counts: np.ndarray):
        """The source's example, or None for an unusable one, counted (and logged) under its
        kind; strict mode raises instead. What a skipped example's annotations counted before
        it was found unusable is not counted."""
        own = report.new_counts()
        try:
            decoded = self.source.load(index, own)
        except UnusableExample as error:
            if self.strict:
                raise
            report.count(counts, error.kind)
            if str(error) not in self._warned:  # once per process: every epoch meets it again
                self._warned.add(str(error))
                log.warning("skipped: %s", error)
            return None
        counts += own
        return decoded

    def __call__(self, local_index: int) -> dict:
        counts = report.new_counts()
        g = self.spec.global_index(int(local_index))
        n = self.spec.num_examples
        if not self.train and g >= n:
            example = padding_example(self.config)
            example["issues"] = counts
            return example
        epoch, position = divmod(g, n) if self.train else (0, g)
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
        for attempt in range(_MAX_CONSECUTIVE_UNUSABLE):
            # An unusable example is replaced by the next example of the same order: the
            # replacement is as deterministic as the stream itself.
            pos = (position + attempt) % n
            index = int(epoch_order(self.seed, epoch, n)[pos])
            decoded = self._load(index, counts)
            if decoded is not None:
                break
        else:
            raise DataError(
                f"{_MAX_CONSECUTIVE_UNUSABLE} consecutive unusable examples from example "
                f"{position} of epoch {epoch}; check the data (the log names each of them)"
            )
        rng = np.random.default_rng([self.seed, epoch, index])
        example = transform(decoded, self.config, rng, counts)
        example["issues"] = counts
        return example


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
        self._maker = ExampleMaker(source, config, self.spec, seed, self.train, strict)
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
        return (step * self.spec.global_batch) // self.spec.num_examples

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
