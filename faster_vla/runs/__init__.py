"""Fine-tuning runs: the train config and named configs, the run's pieces and its loop, run checkpoints,
metrics and plots, loading a finished run, and evaluation."""
