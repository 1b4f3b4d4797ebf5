"""Data: datasets (shapes, COCO-format from the command line) and the SOLO DatasetMapper."""
