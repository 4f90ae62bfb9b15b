"""Device mesh, shardings and multi-host start-up.

One mesh axis, "data", over every device of every process: the batch is split along it and
parameters are replicated.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from instseg_jax.config import ConfigValueError

log = logging.getLogger(__name__)


def maybe_initialize_distributed(config_mesh=None) -> None:
    """jax.distributed.initialize() when the config or the environment asks for it.

    Environment: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (all three), or a
    cluster JAX detects by itself when config.mesh.distributed is True.
    """
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    wanted = bool(config_mesh and config_mesh.get("distributed", False))
    if not (address or wanted):
        return
    # CPU processes exchange gradients through gloo (affects CPU devices only). Nothing here may
    # touch the backend before initialize().
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if address:
        missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in os.environ]
        if missing:
            raise ConfigValueError(
                f"JAX_COORDINATOR_ADDRESS is set but {' and '.join(missing)} not: a multi-process "
                "run needs all three (or none, with mesh.distributed=True on a cluster JAX "
                "detects)"
            )
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    else:
        try:
            jax.distributed.initialize()
        except ValueError as error:  # no cluster found: JAX asks for a coordinator address
            raise ConfigValueError(
                f"mesh.distributed=True but JAX detects no cluster here ({error}): run on a "
                "cluster it detects (SLURM, Open MPI, a TPU pod), set JAX_COORDINATOR_ADDRESS, "
                "JAX_NUM_PROCESSES and JAX_PROCESS_ID, or train in one process with "
                "--config.mesh.distributed=False"
            ) from error
    log.info(
        "process %d of %d, %d local of %d devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def make_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()), ("data",))


def check_global_batch(global_batch: int, mesh: Mesh) -> None:
    """ConfigValueError unless the global batch splits evenly over the mesh's devices (each
    takes global_batch / devices images of every step)."""
    devices = int(mesh.devices.size)
    if global_batch % devices:
        fits = -(-global_batch // devices) * devices
        raise ConfigValueError(
            f"input.global_batch {global_batch} does not divide over the {devices} devices "
            f"({jax.process_count()} process(es)): give a multiple of {devices}, e.g. "
            f"--config.input.global_batch={fits}"
        )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec("data"))


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
    """Host-local numpy batch -> global jax.Arrays sharded over "data"."""
    sharding = data_sharded(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )
