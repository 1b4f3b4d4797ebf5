"""The evaluation data loader: TEST.IMS_PER_BATCH images per batch."""

from conftest import tiny_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from solo_d2.data.shapes import SHAPES_CLASSES, generate_shapes
from solo_d2.engine import Trainer


def test_evaluation_loader_batches_test_ims_per_batch(tmp_path):
    json_file = generate_shapes(str(tmp_path), "val", 5, seed=0, min_size=64, max_size=96)
    name = "loader_test_batched_eval"
    DatasetCatalog.register(name, lambda: load_coco_json(json_file, str(tmp_path / "val"), name))
    MetadataCatalog.get(name).set(thing_classes=list(SHAPES_CLASSES))
    try:
        cfg = tiny_cfg()
        cfg.TEST.IMS_PER_BATCH = 2
        cfg.DATALOADER.NUM_WORKERS = 0
        batches = list(Trainer.build_test_loader(cfg, name))
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    assert [len(b) for b in batches] == [2, 2, 1]
    assert all("image" in x and "height" in x for b in batches for x in b)
