"""Serving: openpi's websocket protocol (wire codec and server) and exported bundles (`load_policy`).
It imports no training loop: a bundle loads its learner through `faster_vla.runs.loading`."""
