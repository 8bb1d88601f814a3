"""Detectors: the zoo on torchvision models, family facts, teacher outputs, checkpoints, per-image sampling."""
