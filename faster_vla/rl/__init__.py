"""The RL core: selection rules, the learner (critics, edit policy, α), chunked TD, replay storage and its
windows, the filtering MDP, update schedules and FLOPs accounting.

It imports no LIBERO, run, serving, orbax or wandb code (checked by the import contract in pyproject.toml):
the learner sees arrays, replay never sees an agent or the actor.
"""
