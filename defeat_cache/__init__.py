"""defeat-cache: DeFeat knowledge distillation for object detectors through an offline teacher cache."""

__version__ = "0.1.0"
