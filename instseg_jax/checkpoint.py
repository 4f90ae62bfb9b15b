"""orbax CheckpointManager around the train state and the input pipeline's position.

A checkpoint holds the train state (params, frozen statistics, optimizer state, step, the
sampling stream's raw key) and, as JSON, the grain iterator state: a resumed run is the same
run. Saves are asynchronous; a save interrupted by a crash leaves only a temporary folder that
orbax ignores, so the latest finished checkpoint is the one restored.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, workdir: str | Path, every_steps: int, keep: int, use_async: bool = True):
        self.directory = Path(workdir).absolute() / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                save_interval_steps=every_steps,
                enable_async_checkpointing=use_async,
                create=True,
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, force: bool = False) -> bool:
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
            ),
            force=force,
        )

    def restore(self, step: int, abstract_state):
        """(state with the shardings of abstract_state, data_state dict)."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
            ),
        )
        return restored["state"], restored["data"]

    def data_state(self, step: int) -> dict:
        """The JSON saved beside checkpoint `step`'s state (the input pipeline's position, or
        what import-weights recorded), read alone: no array is restored."""
        return self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))[
            "data"
        ]

    def state_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
        """{"params/a/b": shape} of every array of checkpoint `step`'s state, from its metadata
        alone (nothing is read into memory, nothing is written)."""
        metadata = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state")
        return leaf_shapes(getattr(metadata, "tree", metadata))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract(state, sharding):
    """ShapeDtypeStructs of a state, with a sharding, for restoring into."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def leaf_shapes(tree) -> dict[str, tuple[int, ...]]:
    """{"a/b/0/c": shape} of a tree's leaves: dict keys, attribute names and sequence indices
    joined by "/", so a state and its checkpoint's metadata name their arrays alike."""

    def name(path):
        return "/".join(
            str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path
        )

    return {
        name(path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
