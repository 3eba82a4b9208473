"""Pretraining the built-in small π0.5: scripted demonstrations recorded in LIBERO and behaviour cloning."""
