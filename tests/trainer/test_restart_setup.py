"""A TorchElastic restart sets the process group up through Lightning's own connection setup, on a store
namespaced by the attempt (so a restarted rank never reads the previous attempt's addresses)."""

from __future__ import annotations

import socket
from typing import Any

import pytest
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.accelerators import CPUAccelerator

import lightning_easgd.trainer.strategy as strategy_module
from lightning_easgd import EASGDStrategy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("attempt", ["0", "2"])
def test_restart_goes_through_lightnings_setup_on_a_namespaced_store(
    attempt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", attempt)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    calls: list[dict[str, Any]] = []
    real = strategy_module._init_dist_connection

    def spy(*args: Any, **kwargs: Any) -> None:
        calls.append(kwargs)
        real(*args, **kwargs)

    monkeypatch.setattr(strategy_module, "_init_dist_connection", spy)
    monkeypatch.setattr("lightning.pytorch.strategies.ddp._init_dist_connection", spy)
    strategy = EASGDStrategy(accelerator=CPUAccelerator(), parallel_devices=[torch.device("cpu")],
                             cluster_environment=LightningEnvironment(), process_group_backend="gloo")
    try:
        strategy.setup_distributed()
        assert dist.is_initialized() and dist.get_world_size() == 1
        assert len(calls) == 1, "the process group must be set up once, by Lightning's _init_dist_connection"
        store = calls[0].get("store")
        if attempt == "0":
            assert store is None  # a first attempt is plain DDPStrategy setup
        else:
            assert isinstance(store, dist.PrefixStore)
            store.set("probe", "1")
            raw = dist.TCPStore("127.0.0.1", strategy.cluster_environment.main_port, is_master=False)
            assert raw.get(f"lightning_easgd/attempt_{attempt}/probe") == b"1"
        tensor = torch.ones(2)
        dist.all_reduce(tensor)  # the group works
        assert tensor.tolist() == [1.0, 1.0]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_restarted_nccl_group_is_destroyed_at_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.fabric.utilities import distributed as fabric_distributed
    from lightning.pytorch.accelerators import CUDAAccelerator

    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    registered: list[Any] = []
    monkeypatch.setattr(fabric_distributed.atexit, "register", registered.append)
    strategy = EASGDStrategy(accelerator=CUDAAccelerator(), parallel_devices=[torch.device("cuda", 0)],
                             cluster_environment=LightningEnvironment())
    try:
        strategy.setup_distributed()
        assert dist.get_backend() == "nccl"
        assert registered == [fabric_distributed._destroy_dist_connection]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
