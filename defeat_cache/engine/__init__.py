"""Training and evaluation: the SGD schedule, the training loop, run files, COCO/VOC metrics."""
