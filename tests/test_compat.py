"""solo_d2/compat.py, the one module relying on private parts of detectron2: these tests fail when
the upstream code it relies on changes (a new detectron2), so that it is checked, and compat.py
updated, before that detectron2 is used."""

import importlib
import inspect

import pytest
import torch.distributed as dist
from detectron2.engine import DefaultTrainer

from solo_d2 import compat
from solo_d2.engine import create_ddp_model


@pytest.mark.parametrize("key", sorted(compat.UPSTREAM_SOURCES))
def test_upstream_source_is_the_one_mirrored(key):
    obj = compat.upstream_objects()[key]
    assert compat.source_sha256(obj) == compat.UPSTREAM_SOURCES[key], (
        f"{key} differs from detectron2 {compat.DETECTRON2_VERSION} "
        f"({compat.DETECTRON2_COMMIT[:10]}), which solo_d2/compat.py relies on: check the use "
        "there, then record the new sha256"
    )


@pytest.mark.parametrize("owner, field, methods", compat.PRIVATE_FIELDS)
def test_private_fields_still_exist(owner, field, methods):
    module, name = owner.split(":")
    cls = getattr(importlib.import_module(module), name)
    for method in methods:
        assert f"self.{field}" in inspect.getsource(
            getattr(cls, method)
        ), f"{owner}.{method} no longer uses {field}, which solo_d2/compat.py relies on"


def test_launch_helpers_have_the_arguments_used():
    params = list(inspect.signature(compat.distributed_worker).parameters)
    assert params == [
        "local_rank",
        "main_func",
        "world_size",
        "num_gpus_per_machine",
        "machine_rank",
        "dist_url",
        "args",
        "timeout",
    ]
    port = compat.find_free_port()
    assert isinstance(port, int) and 0 < port < 65536


def test_default_trainer_ddp_is_scoped():
    """DefaultTrainer.__init__ looks create_ddp_model up in its module: within the block it finds
    solo_d2's, afterwards detectron2's again (also after an error)."""
    assert "create_ddp_model" in DefaultTrainer.__init__.__code__.co_names
    defaults = importlib.import_module("detectron2.engine.defaults")
    original = defaults.create_ddp_model
    with compat.default_trainer_ddp(create_ddp_model):
        assert defaults.create_ddp_model is create_ddp_model
    assert defaults.create_ddp_model is original
    with pytest.raises(RuntimeError):
        with compat.default_trainer_ddp(create_ddp_model):
            raise RuntimeError()
    assert defaults.create_ddp_model is original


def test_compiled_ops_import_is_an_import_error_when_absent():
    try:
        module = compat.import_compiled_ops()
    except ImportError:
        return
    assert module.__name__ == "detectron2._C"


def test_released_process_groups_are_forgotten_and_can_be_made_again(tmp_path):
    """After destroy_process_group, release_process_groups drops detectron2's local group and its
    cached Gloo group (freed while the interpreter lives); a new process group can then be made
    in the same process, which detectron2's create_local_process_group otherwise refuses."""
    comm = importlib.import_module("detectron2.utils.comm")
    for attempt in range(2):
        dist.init_process_group(
            "gloo", init_method=f"file://{tmp_path / f'store{attempt}'}", world_size=1, rank=0
        )
        try:
            comm.create_local_process_group(1)
            assert comm.get_local_size() == 1 and comm.get_local_rank() == 0
            assert comm._get_global_gloo_group() is dist.group.WORLD
        finally:
            dist.destroy_process_group()
            compat.release_process_groups()
        assert comm._LOCAL_PROCESS_GROUP is None
        assert comm._get_global_gloo_group.cache_info().currsize == 0
        assert comm.create_local_process_group.cache_info().currsize == 0
