"""Exact resume of Fabric loops written as users write them (docs/fabric.md): a new process loads the checkpoint.

Every ``fabric.launch`` below forks fresh worker processes, so the resumed run shares nothing with the straight one
but the checkpoint on disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.fabric import Fabric
from torch.nn.functional import mse_loss
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from helpers.launch import SEED
from helpers.toy import ToyRegressor, make_dataset
from lightning_easgd import EASGDFabricStrategy
from lightning_easgd.checkpoint.atomic_io import AtomicCheckpointIO

EPOCHS = 3


def _loop(fabric: Fabric, module: ToyRegressor, dataset: TensorDataset, out: Path, *, own_sampler: bool,
          ckpt: Path, load: bool) -> None:
    """The loop of docs/fabric.md: save every epoch, or load ``epoch=0.ckpt`` and go on from the next epoch."""
    model, optimizer = fabric.setup(module, module.configure_optimizers())
    sampler: DistributedSampler | None = None
    if own_sampler:  # the exact-resume pattern: the loop owns the loader and sets its sampler's epoch
        sampler = DistributedSampler(dataset, num_replicas=fabric.world_size, rank=fabric.global_rank, shuffle=True,
                                     seed=SEED)
        loader: Any = DataLoader(dataset, batch_size=4, sampler=sampler)
    else:  # Fabric's wrapper: it sets the sampler's epoch to the number of times this process iterated the loader
        loader = fabric.setup_dataloaders(DataLoader(dataset, batch_size=4, shuffle=True))
    start = 0
    if load:
        state = {"model": model, "optimizer": optimizer, "epoch": 0}
        fabric.load(ckpt / "epoch=0.ckpt", state)
        start = state["epoch"] + 1
    for epoch in range(start, EPOCHS):
        if sampler is not None:
            sampler.set_epoch(epoch)
        for batch in loader:
            x, y = fabric.to_device(batch)
            optimizer.zero_grad()
            output = model(x)
            fabric.backward(mse_loss(output, y.to(output.dtype)))
            optimizer.step()
        if not load:
            fabric.save(ckpt / f"epoch={epoch}.ckpt", {"model": model, "optimizer": optimizer, "epoch": epoch})
    averager = fabric.strategy.averager
    torch.save({"local": {k: v.clone() for k, v in module.state_dict().items()},
                "center": {n: v.clone() for n, v in zip(averager.names, averager.center_values())}},
               out / f"rank{fabric.global_rank}.pt")


def _run(out: Path, *, precision: str = "32-true", own_sampler: bool = True, ckpt: Path, load: bool
         ) -> list[dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(9)
    module = ToyRegressor(momentum=0.9, nesterov=True, dtype="float32")  # the resumed run's weights come from ckpt
    fabric = Fabric(accelerator="cpu", devices=2, precision=precision,
                    strategy=EASGDFabricStrategy(tau=2, start_method="fork"))
    fabric.launch(_loop, module, make_dataset(48, dtype=torch.float32), out, own_sampler=own_sampler, ckpt=ckpt,
                  load=load)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _identical(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    return all(torch.equal(x[what][key], y[what][key]) for x, y in zip(a, b) for what in ("local", "center")
               for key in x[what])


@pytest.mark.parametrize("precision", ["32-true", "bf16-true", "16-true"])
def test_a_loop_with_its_own_sampler_resumes_bit_identically(tmp_path: Path, precision: str) -> None:
    """The documented pattern: 3 epochs straight == 1 epoch, save, load in new processes, 2 more; with 16-bit
    weights too, where the float32 center comes from the checkpoint's values, not from the rounded model."""
    straight = _run(tmp_path / "straight", precision=precision, ckpt=tmp_path / "ckpt", load=False)
    saved = torch.load(tmp_path / "ckpt" / "epoch=0.ckpt", weights_only=True)
    assert saved["model"]["net.0.weight"].dtype == torch.float32
    assert not saved["optimizer"]["state"], "the main file keeps no worker's per-parameter optimizer state"
    if precision != "32-true":
        weight = saved["model"]["net.0.weight"]
        assert not torch.equal(weight, weight.to(straight[0]["local"]["net.0.weight"].dtype).float()), (
            "the saved center must carry more than 16 bits, or this test proves nothing")
    resumed = _run(tmp_path / "resumed", precision=precision, ckpt=tmp_path / "ckpt", load=True)
    assert _identical(resumed, straight)
    assert not torch.equal(straight[0]["local"]["net.0.weight"], straight[1]["local"]["net.0.weight"])


def test_fabrics_injected_sampler_does_not_resume_exactly(tmp_path: Path) -> None:
    """Why the pattern: with ``setup_dataloaders`` injecting the sampler, a resumed process starts its epoch count
    at 0 and replays epoch 0's data order, so the run differs from the straight one."""
    straight = _run(tmp_path / "straight", own_sampler=False, ckpt=tmp_path / "ckpt", load=False)
    resumed = _run(tmp_path / "resumed", own_sampler=False, ckpt=tmp_path / "ckpt", load=True)
    assert not _identical(resumed, straight)


class _RecordingIO(AtomicCheckpointIO):
    """Records where every file this rank loads is mapped to."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[tuple[str, Any]] = []

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None
                        ) -> dict[str, Any]:
        self.loads.append((Path(path).name, map_location))
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


def _save_then_load(fabric: Fabric, out: Path) -> None:
    module = ToyRegressor(momentum=0.9, dtype="float32")
    model, optimizer = fabric.setup(module, module.configure_optimizers())
    x, y = make_dataset(8, dtype=torch.float32).tensors
    for _ in range(3):  # momentum buffers exist, an exchange happened (tau=2)
        optimizer.zero_grad()
        fabric.backward(mse_loss(model(x), y))
        optimizer.step()
    fabric.save(out / "a.ckpt", {"model": model, "optimizer": optimizer})
    fabric.load(out / "a.ckpt", {"model": model, "optimizer": optimizer})
    assert optimizer.state_dict()["state"], "this worker's momentum came back from its worker file"
    torch.save(fabric.strategy.checkpoint_io.loads, out / f"loads{fabric.global_rank}.pt")


def test_every_rank_reads_the_main_file_to_the_host(tmp_path: Path) -> None:
    """Rank 0's tensors would otherwise land on the device they were saved from (a GPU's, on every rank)."""
    fabric = Fabric(accelerator="cpu", devices=2,
                    strategy=EASGDFabricStrategy(tau=2, start_method="fork", checkpoint_io=_RecordingIO()))
    fabric.launch(_save_then_load, tmp_path)
    assert not torch.load(tmp_path / "a.ckpt", weights_only=True)["optimizer"]["state"]
    for rank in range(2):
        loads = torch.load(tmp_path / f"loads{rank}.pt", weights_only=True)
        assert loads == [("a.ckpt", "cpu"), (f"worker_{rank:05d}.pt", "cpu")], loads
