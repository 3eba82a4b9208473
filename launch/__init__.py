"""Command-line entry points (`faster-vla ...`)."""
