"""Acting and learning data-parallel over all local accelerators.

A 1-D `jax.sharding.Mesh` over the local devices: a batch's leading axis (decisions' observations, the
critics' minibatch windows) is split across it, parameters are replicated, and XLA inserts the collectives
(the gradient all-reduce of a critic update). With one device there is no mesh and nothing changes. Several
machines (`jax.distributed.initialize()` before anything else) see all hosts' devices as one mesh when the
mesh is built from `jax.devices()`; this toolkit builds it from the local ones, since each host runs its own
envs and agent (docs/finetune.md, "Many envs, many machines").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "batch"


class DataParallel:
    """Where batches and parameters live: split over the mesh's devices, or (one device) left alone."""

    def __init__(self, devices: Sequence[jax.Device] | None = None) -> None:
        devices = list(jax.local_devices() if devices is None else devices)
        if not devices:
            raise ValueError("DataParallel needs at least one device")
        self.devices = devices
        self.mesh = Mesh(np.array(devices), (AXIS,)) if len(devices) > 1 else None

    @property
    def size(self) -> int:
        """Devices the batch axis is split over (1: no mesh)."""
        return len(self.devices)

    def padded(self, n: int) -> int:
        """The smallest multiple of `size` that is >= n (a sharded axis must split evenly)."""
        return -(-n // self.size) * self.size

    def check_divisible(self, n: int, what: str) -> None:
        """Raises a ValueError naming `what` unless n splits evenly over the devices."""
        if n % self.size:
            raise ValueError(f"{what} must be a multiple of the {self.size} local devices it is split over, got {n}")

    def shard(self, tree: Any, axis: int = 0) -> Any:
        """Every array leaf split along `axis` over the mesh (its length must divide evenly)."""
        if self.mesh is None:
            return tree
        spec = PartitionSpec(*([None] * axis), AXIS)
        sharding = NamedSharding(self.mesh, spec)
        return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)

    def replicate(self, tree: Any) -> Any:
        """Every array leaf copied to every device of the mesh (no copy when already there)."""
        if self.mesh is None:
            return tree
        sharding = NamedSharding(self.mesh, PartitionSpec())
        return jax.tree.map(lambda x: x if getattr(x, "sharding", None) == sharding else jax.device_put(x, sharding),
                            tree)
