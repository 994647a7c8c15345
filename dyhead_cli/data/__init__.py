"""Data: COCO-format loading, augmentations, the synthetic shapes set and a data set checker."""
