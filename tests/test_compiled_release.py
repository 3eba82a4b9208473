"""The suite's guard against XLA:CPU running out of memory maps (tests/conftest.py `release_compiled_programs`):
compiled programs hold mapped regions until jax's caches let them go, and releasing them unmaps them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from tests.conftest import memory_map_count, release_compiled_programs

PROGRAMS = 60


def test_releasing_compiled_programs_unmaps_their_memory():
    if memory_map_count() == 0:
        pytest.skip("no /proc/self/maps on this system: nothing to count")
    release_compiled_programs()
    before = memory_map_count()
    for i in range(PROGRAMS):  # distinct shapes: one executable each, all kept by jit's cache
        jax.jit(lambda x, i=i: jnp.cumsum(jnp.sin(x) * i))(jnp.ones((i + 1,))).block_until_ready()
    compiled = memory_map_count()
    # at least one region per loaded executable (XLA 0.7.1 and 0.11.2 map ~3); other allocations may add a few
    assert compiled - before >= PROGRAMS, (before, compiled)
    release_compiled_programs()
    # most of what the programs mapped is returned; the allocator may keep a few regions of its own
    assert memory_map_count() <= before + (compiled - before) // 4, (before, compiled, memory_map_count())
