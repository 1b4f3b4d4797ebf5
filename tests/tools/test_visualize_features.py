"""tools/visualize_features.py: pictures of a tiny model, and one-line errors on bad input."""

import json

import cv2
import numpy as np
import pytest
from conftest import REPO, load_script, tiny_cfg

visualize_features = load_script(REPO / "tools" / "visualize_features.py", "visualize_features")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    """The tiny SOLOv2 config as a YAML file, and a 80 x 120 image."""
    folder = tmp_path_factory.mktemp("visualize")
    config = folder / "tiny.yaml"
    cfg = tiny_cfg()
    cfg.INPUT.MIN_SIZE_TEST = 96
    config.write_text(cfg.dump())
    image = folder / "image.png"
    pixels = np.random.default_rng(0).integers(0, 256, (80, 120, 3), dtype=np.uint8)
    pixels[20:60, 30:70] = (40, 40, 230)
    cv2.imwrite(str(image), pixels)
    return str(config), str(image)


@pytest.mark.parametrize(
    "opts, first",
    [([], "mask_features.png"), (["MODEL.SOLO.HEAD", "SOLOInstanceHead"], "level_masks.png")],
)
def test_random_weights_pictures_with_a_warning(tiny_config, tmp_path, capsys, opts, first):
    config, image = tiny_config
    argv = ["--config-file", config, "--input", image, "--output", str(tmp_path), "--opts", *opts]
    assert visualize_features.main(argv) == 0
    out, err = capsys.readouterr()
    assert "no trained model: the heads are randomly initialised" in err
    assert "0 instances; wrote 2 pictures and summary.json" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [first, "category_grids.png", "summary.json"]
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["input_hw"] == [96, 144]  # 80 x 120 resized to the test size 96
    assert summary["files"] == [first, "category_grids.png"]
    # category grids: the 96 x 160 canvas (144 padded to 32) in panels of 192 x 320
    assert cv2.imread(str(tmp_path / "category_grids.png")).shape == (192 + 22 + 24, 1624, 3)


@pytest.mark.parametrize(
    "args, phrase",
    [
        (["--input", "missing.png"], "missing.png: file not found"),
        (["--opts", "MODEL.WEIGHTS", "nowhere.pth"], "MODEL.WEIGHTS nowhere.pth: no such file"),
        (["--opts", "MODEL.SOLO.NUM_GRID", "3"], "config key MODEL.SOLO.NUM_GRID does not exist"),
        (["--config-file", "nope.yaml"], "config file nope.yaml does not exist"),
    ],
)
def test_bad_input_is_one_line_and_status_2(tiny_config, tmp_path, capsys, args, phrase):
    config, image = tiny_config
    argv = ["--config-file", config, "--input", image, "--output", str(tmp_path)]
    for i in range(0, len(args), 2):  # replace or add the given option
        if args[i] in argv and args[i] != "--opts":
            argv[argv.index(args[i]) + 1] = args[i + 1]
    if "--opts" in args:
        argv += args[args.index("--opts") :]
    assert visualize_features.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and phrase in err[-1], err
    assert not list(tmp_path.iterdir())  # nothing written


def test_usage_errors_exit_2(tiny_config, capsys):
    config, image = tiny_config
    with pytest.raises(SystemExit) as e:
        visualize_features.main(
            ["--config-file", config, "--input", image, "--max-instances", "-1"]
        )
    assert e.value.code == 2
    assert "--max-instances must be at least 0" in capsys.readouterr().err
