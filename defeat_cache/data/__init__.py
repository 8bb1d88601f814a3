"""Datasets: COCO/VOC/synthetic records, views of each image, the DataLoader dataset and sampler."""
