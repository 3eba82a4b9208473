"""Small I/O helpers with no RL, model or env knowledge: atomic writes, writable folders, self-describing
.npz files, dataclass <-> JSON, and the one non-finite check. Everything else of ours may import these."""
