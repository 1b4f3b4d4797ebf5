"""solo_d2.model_zoo: config names, the checkpoint table, get_config / get, trained weights through
the table (local files with their sha256: no network)."""

import hashlib
import logging
import re
from pathlib import Path

import pytest
import torch
from conftest import REPO, load_script

from solo_d2 import model_zoo
from solo_d2.config import ConfigError
from solo_d2.model_zoo import ChecksumError, PublishedCheckpoint

CONFIG_NAMES = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))

# a small R18 model of any head variant (the channels of every branch at 32)
TINY = [
    "MODEL.DEVICE", "cpu",
    "MODEL.RESNETS.DEPTH", "18",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.RESNETS.NORM", "BN",
    "MODEL.RESNETS.DEFORM_ON_PER_STAGE", "[False, False, False, False]",
    "MODEL.FPN.OUT_CHANNELS", "32",
    "MODEL.SOLO.INSTANCE_IN_CHANNELS", "32",
    "MODEL.SOLO.INSTANCE_CHANNELS", "32",
    "MODEL.SOLO.NUM_INSTANCE_CONVS", "2",
    "MODEL.SOLO.NUM_KERNELS", "32",
    "MODEL.SOLO.MASK_IN_CHANNELS", "32",
    "MODEL.SOLO.MASK_CHANNELS", "32",
    "INPUT.MIN_SIZE_TEST", "96",
    "INPUT.MAX_SIZE_TEST", "128",
]  # fmt: skip
QUICKSTART = "SOLOv2_R18_quickstart_shapes"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- names ----------------------------------------------------------------------------------


def test_names_resolve(tmp_path, monkeypatch):
    path = model_zoo.get_config_file("SOLOv2_R50_3x")
    assert Path(path).name == "SOLOv2_R50_3x.yaml" and Path(path).is_file()
    assert model_zoo.get_config_file("SOLOv2_R50_3x.yaml") == path
    assert model_zoo.config_names() == CONFIG_NAMES
    # a file that exists wins; else a name; "configs/NAME.yaml" also away from the checkout
    own = tmp_path / "SOLOv2_R50_3x.yaml"
    own.write_text("VERSION: 2\n")
    assert model_zoo.resolve_config_file(str(own)) == str(own)
    monkeypatch.chdir(tmp_path)
    assert model_zoo.resolve_config_file("SOLOv2_R50_3x.yaml") == "SOLOv2_R50_3x.yaml"  # the file
    assert model_zoo.resolve_config_file("SOLOv2_R101_3x") == model_zoo.get_config_file(
        "SOLOv2_R101_3x"
    )
    assert model_zoo.resolve_config_file("configs/SOLOv2_R101_3x.yaml") == (
        model_zoo.get_config_file("SOLOv2_R101_3x")
    )


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_config_is_reachable_by_name_and_loads(name):
    path = Path(model_zoo.get_config_file(name))
    assert path.read_bytes() == (REPO / "configs" / f"{name}.yaml").read_bytes()
    cfg = model_zoo.get_config(name, opts=["MODEL.DEVICE", "cpu"])
    meta_arch = "PanopticSOLO" if name.endswith("panoptic") or "_panoptic_" in name else "SOLO"
    assert cfg.MODEL.META_ARCHITECTURE == meta_arch and cfg.MODEL.DEVICE == "cpu"


@pytest.mark.parametrize(
    "call, phrases",
    [
        (lambda: model_zoo.get_config_file("SOLOv2_R50_33x"),
         ["'SOLOv2_R50_33x' is not a config of the solo_d2 model zoo", "SOLOv2_R50_3x"]),
        (lambda: model_zoo.get_config("solov2_r101_3X"), ["close names: SOLOv2_R101_3x"]),
        (lambda: model_zoo.get_config_file("../configs/SOLOv2_R50_3x"), ["is not a config"]),
        (lambda: model_zoo.resolve_config_file("no/such/file.yaml"),
         ["config file no/such/file.yaml does not exist", "model zoo"]),
        (lambda: model_zoo.resolve_config_file("Decoupled_SOLO_R50"),
         ["does not exist", "close names: ", "Decoupled_SOLO_R50_1x"]),
        (lambda: model_zoo.get_config(QUICKSTART, trained=True),
         [f"no published checkpoint of '{QUICKSTART}'", "published: "]),
        (lambda: model_zoo.published_checkpoint("SOLO_R50_1x", source="adelaidet"),
         ["no published checkpoint of 'SOLO_R50_1x' from 'adelaidet'"]),
    ],
)  # fmt: skip
def test_unknown_names_are_one_line_errors(call, phrases):
    with pytest.raises(ConfigError) as e:
        call()
    message = str(e.value)
    assert "\n" not in message
    for phrase in phrases:
        assert phrase in message


# ---- the checkpoint table -------------------------------------------------------------------


def test_the_checkpoint_table():
    names = set(CONFIG_NAMES)
    for ckpt in model_zoo.CHECKPOINTS:
        assert ckpt.config in names, ckpt
        assert ckpt.source in ("adelaidet", "official")
        assert ckpt.url.startswith("https://") and ckpt.url.endswith(".pth")
        assert ckpt.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", ckpt.sha256)
    pairs = [(c.config, c.source) for c in model_zoo.CHECKPOINTS]
    assert len(pairs) == len(set(pairs))
    # the default of a config with two checkpoints is AdelaiDet's, which loads as it is
    assert model_zoo.published_checkpoint("SOLOv2_R50_3x").url == (
        "https://huggingface.co/ZjuCv/AdelaiDet/resolve/main/SOLOv2_R50_3x.pth"
    )
    assert model_zoo.published_checkpoint("SOLOv2_R50_3x", "official").source == "official"
    # every published model of the official repository has an entry (17 models)
    assert sum(c.source == "official" for c in model_zoo.CHECKPOINTS) == 17


# ---- models ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["SOLOv2_R50_3x", "SOLO_R50_1x", "Decoupled_SOLO_Light_R50_3x"])
def test_get_builds_the_model_in_eval_mode(name):
    model = model_zoo.get(name, opts=TINY)
    assert not model.training and model.device.type == "cpu"
    image = torch.randint(0, 256, (3, 80, 112), dtype=torch.uint8)
    with torch.no_grad():
        [out] = model([{"image": image}])
    assert out["instances"].image_size == (80, 112)


def test_get_device_argument():
    model = model_zoo.get(QUICKSTART, device="cpu", opts=TINY[2:])
    assert model.device.type == "cpu"


def perturbed_weights(path: Path) -> dict:
    """A checkpoint of the tiny quickstart model with weights unlike its initialisation."""
    model = model_zoo.get(QUICKSTART, opts=TINY)
    g = torch.Generator().manual_seed(1)
    state = {
        k: v + torch.rand(v.shape, generator=g) if v.is_floating_point() else v
        for k, v in model.state_dict().items()
    }
    torch.save({"model": state}, path)
    return state


def test_trained_weights_through_the_table(tmp_path, monkeypatch, caplog):
    weights = tmp_path / "model.pth"
    state = perturbed_weights(weights)
    entry = PublishedCheckpoint(QUICKSTART, "adelaidet", weights.as_uri(), sha256(weights))
    monkeypatch.setattr(model_zoo.model_zoo, "CHECKPOINTS", (entry,))

    cfg = model_zoo.get_config(QUICKSTART, trained=True, opts=TINY)
    assert cfg.MODEL.WEIGHTS == str(weights)
    model = model_zoo.get(QUICKSTART, trained=True, opts=TINY)
    for k, v in model.state_dict().items():
        if k not in ("pixel_mean", "pixel_std"):
            assert torch.equal(v, state[k]), k

    # no published checksum: loaded, and the log says it was not verified
    unchecked = PublishedCheckpoint(QUICKSTART, "adelaidet", weights.as_uri(), None)
    monkeypatch.setattr(model_zoo.model_zoo, "CHECKPOINTS", (unchecked,))
    with caplog.at_level(logging.INFO, logger="solo_d2.model_zoo.model_zoo"):
        assert model_zoo.checkpoint_file(QUICKSTART) == str(weights)
    assert "checksum not published" in caplog.text


def test_checksum_mismatch_is_a_one_line_error_naming_the_file(tmp_path, monkeypatch):
    weights = tmp_path / "model.pth"
    perturbed_weights(weights)
    wrong = PublishedCheckpoint(QUICKSTART, "adelaidet", weights.as_uri(), "0" * 64)
    monkeypatch.setattr(model_zoo.model_zoo, "CHECKPOINTS", (wrong,))
    with pytest.raises(ChecksumError) as e:
        model_zoo.get(QUICKSTART, trained=True, opts=TINY)
    message = str(e.value)
    assert str(weights) in message and "0" * 64 in message and "\n" not in message

    missing = PublishedCheckpoint(QUICKSTART, "adelaidet", (tmp_path / "gone.pth").as_uri(), None)
    monkeypatch.setattr(model_zoo.model_zoo, "CHECKPOINTS", (missing,))
    with pytest.raises(OSError, match="gone.pth does not exist"):
        model_zoo.checkpoint_file(QUICKSTART)


def official_cases():
    """The official-layout checkpoints that tests/model_zoo/test_official.py builds."""
    return load_script(REPO / "tests" / "model_zoo" / "test_official.py", "official_cases").CASES


def test_official_weights_go_through_the_converter(tmp_path, monkeypatch):
    name = "SOLOv2_Light_448_R18_3x"
    ckpt = official_cases()[name][0]()
    src = tmp_path / "SOLOv2_LIGHT_448_R18_3x.pth"  # the published file name
    torch.save(ckpt, src)
    entry = PublishedCheckpoint(name, "official", src.as_uri(), sha256(src))
    monkeypatch.setattr(model_zoo.model_zoo, "CHECKPOINTS", (entry,))

    cfg = model_zoo.get_config(name, trained=True)
    assert cfg.INPUT.FORMAT == "RGB" and cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False
    assert cfg.MODEL.WEIGHTS == str((tmp_path / "SOLOv2_LIGHT_448_R18_3x.solo_d2.pth").resolve())
    model = model_zoo.get(name, trained=True, device="cpu")
    assert torch.equal(
        model.state_dict()["ins_head.cate_pred.weight"],
        ckpt["state_dict"]["bbox_head.solo_cate.weight"],
    )
    # converted once: a second call reuses the converted files
    mtime = Path(cfg.MODEL.WEIGHTS).stat().st_mtime_ns
    model_zoo.get_config(name, trained=True)
    assert Path(cfg.MODEL.WEIGHTS).stat().st_mtime_ns == mtime


# ---- the entry points: a file, else a zoo name ----------------------------------------------


def test_train_net_takes_a_zoo_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # shapes registered under ./datasets, nothing generated
    train_net = load_script(REPO / "train_net.py", "train_net_script")
    parser = train_net.get_parser()
    args = parser.parse_args(["--config-file", QUICKSTART, "--eval-only", "MODEL.DEVICE", "cpu"])
    train_net.preflight(args)
    assert args.config_file == model_zoo.get_config_file(QUICKSTART)
    args = parser.parse_args(["--config-file", "SOLOv2_R18_quickstrat", "--eval-only"])
    with pytest.raises(ConfigError, match="does not exist and is not a model zoo config name; "):
        train_net.preflight(args)


def test_demo_takes_a_zoo_name():
    demo = load_script(REPO / "demo" / "demo.py", "demo_script")
    assert demo.get_parser().parse_args(["--input", "x.jpg"]).config_file == "SOLOv2_R50_3x"
    cfg = demo.setup_cfg("SOLOv2_R50_3x", ["MODEL.DEVICE", "cpu"])  # the default model
    assert cfg.MODEL.WEIGHTS == model_zoo.published_checkpoint("SOLOv2_R50_3x").url
    assert cfg.MODEL.WEIGHTS == demo.COCO_WEIGHTS_URL
    cfg = demo.setup_cfg(QUICKSTART, ["MODEL.DEVICE", "cpu"], warn_untrained=False)
    assert cfg.MODEL.SOLO.NUM_CLASSES == 4
    with pytest.raises(ConfigError, match="close names: SOLOv2_R101_3x"):
        demo.setup_cfg("SOLOv2_R101_3", [])
