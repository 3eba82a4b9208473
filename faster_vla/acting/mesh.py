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
    """Where batches and parameters live: split over the mesh's devices, or (one device) left alone.

    `shard_params` (for an actor that does not fit one device): the actor's parameters are split over the same
    mesh instead of replicated, each array along its largest axis that divides evenly (smaller arrays, and
    those with no such axis, stay replicated); XLA gathers each layer's weights where a computation needs them
    (ZeRO-3/FSDP-style), so memory per device falls by ~the device count at the cost of that traffic.
    """

    def __init__(self, devices: Sequence[jax.Device] | None = None, *, shard_params: bool = False) -> None:
        devices = list(jax.local_devices() if devices is None else devices)
        if not devices:
            raise ValueError("DataParallel needs at least one device")
        self.devices = devices
        self.shard_params = shard_params
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

    def place_params(self, tree: Any) -> Any:
        """The actor's parameters on the mesh: replicated, or with `shard_params` split (see the class); no copy
        for a leaf already placed so."""
        if self.mesh is None or not self.shard_params:
            return self.replicate(tree)

        def place(x: Any) -> Any:
            sharding = NamedSharding(self.mesh, param_spec(np.shape(x), self.size))
            return x if getattr(x, "sharding", None) == sharding else jax.device_put(x, sharding)

        return jax.tree.map(place, tree)


MIN_SHARDED_ELEMENTS = 1 << 14
"""Arrays smaller than this stay replicated: splitting them saves little memory and costs a gather each."""


def param_spec(shape: tuple[int, ...], devices: int) -> PartitionSpec:
    """How one parameter array splits over `devices`: along its largest axis divisible by the device count
    (ties: the last such axis), or replicated when small or when no axis divides."""
    if int(np.prod(shape, dtype=np.int64)) < MIN_SHARDED_ELEMENTS:
        return PartitionSpec()
    axes = [i for i, n in enumerate(shape) if n % devices == 0]
    if not axes:
        return PartitionSpec()
    axis = max(axes, key=lambda i: (shape[i], i))
    return PartitionSpec(*([None] * axis), AXIS)
