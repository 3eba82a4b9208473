"""Acting and critic updates data-parallel over a device mesh equal the one-device results.

Run in a subprocess with 4 CPU devices (`--xla_force_host_platform_device_count=4`): the flag must be set
before JAX starts, and the suite's own process has one device."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import dataclasses
    import jax
    import numpy as np

    assert len(jax.devices()) == 4, jax.devices()
    from faster_vla.acting.agent import Agent
    from faster_vla.acting.mesh import DataParallel
    from faster_vla.launch.demo import libero_observation
    from tests import test_agent as ta
    from tests import test_learner as tl
    from tests.toy_task import FlowActor

    one, four = DataParallel(jax.devices()[:1]), DataParallel()
    assert one.mesh is None and four.size == 4
    policy = ta.policy.__wrapped__()
    raw = [libero_observation("open the microwave", seed=s) for s in range(3)]  # 3 rows: padded to 4 on the mesh
    for rule in ("base", "faster", "best_of_n", "idql", "faster_idql"):
        config = ta._config(rule)
        learner = ta._learner(config)
        keys = [jax.random.key(10 + i) for i in range(3)]
        a = Agent(policy, config, parallel=one).act_batch(learner, raw, rngs=keys)
        b = Agent(policy, config, parallel=four).act_batch(learner, raw, rngs=keys)
        for x, y in zip(a, b):
            # float32; the sharded program reduces in another order: ~1e-6, far below a different seed's O(1)
            np.testing.assert_allclose(y.actions, x.actions, rtol=0, atol=1e-4, err_msg=rule)
            assert x.seed_index == y.seed_index, rule

    # Parameters split over the mesh (--shard-actor-params): the same chunks, each large array held in quarters.
    from faster_vla.acting.mesh import param_spec
    sharded = DataParallel(shard_params=True)
    config = ta._config("faster")
    learner = ta._learner(config)
    keys = [jax.random.key(10 + i) for i in range(3)]
    a = Agent(policy, config, parallel=one).act_batch(learner, raw, rngs=keys)
    agent = Agent(policy, config, parallel=sharded)
    b = agent.act_batch(learner, raw, rngs=keys)
    for x, y in zip(a, b):
        np.testing.assert_allclose(y.actions, x.actions, rtol=0, atol=1e-4, err_msg="sharded params")
    leaves = jax.tree.leaves(agent.actor.params)
    split = [x for x in leaves if param_spec(x.shape, 4) != jax.sharding.PartitionSpec()]
    assert split, "no parameter was large enough to split"
    for x in split:
        assert x.addressable_shards[0].data.size * 4 == x.size, x.shape
    assert param_spec((3, 1 << 14), 4) == jax.sharding.PartitionSpec(None, "batch")
    assert param_spec((5, 3), 4) == jax.sharding.PartitionSpec()  # small: replicated
    assert param_spec((3, 1 << 14 | 1), 4) == jax.sharding.PartitionSpec()  # no axis divides

    learner = tl._learner("faster")
    batch = jax.tree.map(np.asarray, tl._batch(FlowActor(tl.TASK), utd=2))
    _, info_one = learner.update(batch)
    _, info_four = four.replicate(learner).update(four.shard(batch, axis=1))
    for key in info_one:
        np.testing.assert_allclose(float(info_four[key]), float(info_one[key]), rtol=1e-4, atol=1e-6, err_msg=key)
    print("mesh ok")
''')


def test_acting_and_updates_over_four_devices_match_one():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0 and "mesh ok" in result.stdout, result.stdout[-3000:] + result.stderr[-6000:]
