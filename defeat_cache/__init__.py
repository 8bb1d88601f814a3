"""defeat-cache: DeFeat knowledge distillation for object detectors through an offline teacher cache."""

__version__ = "0.1.0"


def load_detector(path, model=None, data=None, device="cpu"):
    """A detector from any checkpoint form that takes raw images (models.detector.load_detector)."""
    from .models.detector import load_detector as load
    return load(path, model=model, data=data, device=device)
