"""LIBERO: install checks, tasks, the headless env, env worker pools, the one rollout loop, scripted experts.

The `libero` package itself is imported lazily (on first env), so configs and task names stay cheap."""
