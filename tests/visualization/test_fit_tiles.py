"""The fit's choice between whole images and tiles (dataset_fit.fit_tiles), by hand."""

import numpy as np
import pytest
from conftest import REPO, solo_cfg
from detectron2.structures import BoxMode

from solo_d2.config import load_config
from solo_d2.engine.fit_trials import trial_candidates
from solo_d2.visualization.dataset_fit import fit_config, write_fit


def dicts(hw, size, per_image=20, images=4, seed=0):
    """Images of ``hw`` with ``per_image`` squares of side ``size`` at random places."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(images):
        xs = rng.uniform(size, hw[1] - 2 * size, per_image)
        ys = rng.uniform(size, hw[0] - 2 * size, per_image)
        out.append(
            {"height": hw[0], "width": hw[1], "annotations": [
                {"bbox": [float(x), float(y), size, size], "bbox_mode": BoxMode.XYWH_ABS,
                 "category_id": 0, "iscrowd": 0, "segmentation": [[0, 0, 1, 0, 1, 1]]}
                for x, y in zip(xs, ys)]}  # fmt: skip
        )
    return out


def quickstart():
    return solo_cfg("SOLOv2_R18_quickstart_shapes.yaml")


def test_objects_under_the_filter_at_every_whole_size_get_tiles(tmp_path):
    """800 x 1024 images, objects of 6 px: the quickstart's budget (416 px) allows no upscale, so
    all stay under the 16-px filter. Tiles: x16/6 -> 2.75 (quarter steps), size 288 / 2.75 ->
    112 px (multiple of 16), overlap 6 / 112 -> at least 0.1."""
    base = str(REPO / "configs" / "SOLOv2_R18_quickstart_shapes.yaml")
    fit = fit_config(quickstart(), dicts((800, 1024), 6.0), ["a"], base_config=base)
    c = fit.changes
    assert c["INPUT.TILE.TRAIN"][0] is True and c["INPUT.TILE.TEST"][0] is True
    assert (c["INPUT.TILE.SCALE"][0], c["INPUT.TILE.SIZE"][0]) == (2.75, 112)
    assert c["INPUT.TILE.OVERLAP"][0] == pytest.approx(0.1)
    # the whole-image resizes, ranges and grids are the base's
    assert "INPUT.MIN_SIZE_TEST" not in c and "MODEL.SOLO.NUM_GRIDS" not in c
    assert fit.decision[0].startswith("chose tiles (more than 20% under the filter)")
    assert "Mpx per training sample" in fit.decision[0] and "x the base's" in fit.decision[1]
    # written and loaded back: SCALE stays a float for yacs
    out = tmp_path / "fit.yaml"
    write_fit(fit, str(out))
    assert "# chose tiles" in out.read_text()
    loaded = load_config(str(out))
    assert loaded.INPUT.TILE.SCALE == 2.75 and loaded.INPUT.TILE.TEST


def test_whole_images_too_costly_get_tiles(tmp_path):
    """3000 x 4000 images, objects of 20 px: above the filter at x0.8, but that resize is 2400 x
    3200 px, about 70x the quickstart's 288 x 384 test pixels: tiles (none under the filter)."""
    fit = fit_config(quickstart(), dicts((3000, 4000), 20.0), ["a"], base_config="b.yaml")
    assert fit.changes["INPUT.TILE.TRAIN"][0] is True
    assert fit.decision[0].startswith("chose tiles (whole images cost over 8x")
    assert fit.changes["INPUT.TILE.SCALE"][0] == 1.0
    fit.base_config = str(REPO / "configs" / "SOLOv2_R18_quickstart_shapes.yaml")
    write_fit(fit, str(tmp_path / "fit.yaml"))
    assert "SCALE: 1.0\n" in (tmp_path / "fit.yaml").read_text()  # a float for yacs, not "1"
    assert load_config(str(tmp_path / "fit.yaml")).INPUT.TILE.SCALE == 1.0


def test_objects_a_whole_image_fit_keeps_stay_whole():
    """480 x 640 images, objects of 30 px: whole images, no tile key; the report still costs
    the tiles."""
    fit = fit_config(quickstart(), dicts((480, 640), 30.0), ["a"], base_config="b.yaml")
    assert not any(k.startswith("INPUT.TILE") for k in fit.changes)
    assert "INPUT.MIN_SIZE_TEST" in fit.changes
    assert fit.decision[0].startswith("chose whole images") and "tiles of" in fit.decision[1]


def test_trials_tell_a_tiled_fit_from_the_start():
    """A tiled fit keeps the base's resizes and levels: the trials still train it (the tile keys
    tell it apart), and the 1.5x finer grids around it."""
    base = str(REPO / "configs" / "SOLOv2_R18_quickstart_shapes.yaml")
    fit = fit_config(quickstart(), dicts((800, 1024), 6.0), ["a"], base_config=base)
    names = [c.name for c in trial_candidates(quickstart(), fit)]
    assert names == ["start", "start_reseeded", "fit", "fit_finer_grids"]
