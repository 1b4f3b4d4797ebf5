"""Seeing inside SOLO models and their data (docs/visualization.md).

* :mod:`.features`: one image through a model: SOLOv2's mask-feature channels (the paper's
  Fig. 5), SOLO / Decoupled SOLO's per-level mask maps, the category grids of every level, and
  each kept instance's soft mask beside its final mask (``tools/visualize_features.py``).
* :mod:`.dataset_report`: a dataset's object sizes after the config's resizes against the FPN
  levels' scale ranges and grids, with warnings where they fit poorly
  (``tools/analyze_dataset.py``).
* :mod:`.dataset_fit`: a config fitted to those statistics (resizes, scale ranges, grids,
  classes, sigma, detections per image; ``tools/analyze_dataset.py --fit``, docs/your_data.md).
* :mod:`.training_plots`: loss curves and per-class AP charts, written by the Trainer.
* :mod:`.drawing`: predictions drawn on their image (instances or a panoptic segmentation, as
  ``demo/demo.py`` shows them), and the class names of a config's test dataset.

Submodules are imported on use (matplotlib is imported only when a chart is drawn).
"""
