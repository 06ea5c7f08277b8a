"""With worker groups the center is sharded: a save gathers it to the writer only (issue #18.5).

2 workers of 2 ranks on CPU (fork). Every tensor a rank creates during ``fabric.save`` is counted (a dispatch mode
sees every operator's output; fresh storages are summed), so a full copy of the center or its velocity on a rank
that does not write the main file would show as model-sized bytes there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from torch import Tensor, nn
from torch.nn.functional import mse_loss
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lightning_easgd import EASGDFabricStrategy

WIDTH = 1024  # about 1.05 M float32 parameters: 4 MB, far above the few kB of RNG states a save gathers


class _FreshBytes(TorchDispatchMode):
    """Sums the bytes of every storage an operator creates (outputs that alias none of its inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.bytes += t.untyped_storage().nbytes()
        return out


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, 1))


def _train_and_save(fabric: Fabric, out: Path) -> None:
    module = _model()
    model, optimizer = fabric.setup(module, torch.optim.SGD(module.parameters(), lr=0.01))
    g = torch.Generator().manual_seed(fabric.global_rank)
    for _ in range(3):  # exchanges at steps 1 and 2 (tau=1): the center and its velocity move
        x, y = torch.randn(4, WIDTH, generator=g), torch.randn(4, 1, generator=g)
        optimizer.zero_grad()
        fabric.backward(mse_loss(model(x), y))
        optimizer.step()
    averager = fabric.strategy.averager
    center = {n: v.clone() for n, v in zip(averager.names, averager.center_values())}  # before counting
    velocity = {n: v.clone() for n, v in averager.center_velocity().items()}
    local = {k: v.clone() for k, v in module.state_dict().items()}
    with fabric.strategy.center(), _FreshBytes() as swapped:  # the local values wait in slices: gathered too
        fabric.save(out / "in_center.ckpt", {"model": model, "optimizer": optimizer})
    with _FreshBytes() as fresh:
        fabric.save(out / "a.ckpt", {"model": model, "optimizer": optimizer})
    torch.save({"bytes": fresh.bytes, "in_center_bytes": swapped.bytes, "center": center, "velocity": velocity,
                "local": local}, out / f"rank{fabric.global_rank}.pt")


def test_only_the_writer_gathers_the_sharded_center(tmp_path: Path) -> None:
    strategy = EASGDFabricStrategy(tau=1, ranks_per_worker=2, center_momentum=0.5, start_method="fork")
    Fabric(accelerator="cpu", devices=4, strategy=strategy).launch(_train_and_save, tmp_path)
    model_bytes = sum(p.numel() * p.element_size() for p in _model().parameters())
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(4)]
    for name in ("in_center.ckpt", "a.ckpt"):
        main = torch.load(tmp_path / name, weights_only=True)
        for key, value in ranks[0]["center"].items():  # the gathered center and velocity are the whole of them
            assert torch.equal(main["model"][key], value), f"{name} {key}"
            assert torch.equal(main["easgd"]["center_velocity"][key], ranks[0]["velocity"][key]), f"{name} {key}"
        for g, file in enumerate(main["easgd"]["worker_files"]):  # each worker's own values, gathered from slices
            saved = torch.load(tmp_path / file, weights_only=True)["state_dict"]
            assert all(torch.equal(saved[k], v) for k, v in ranks[2 * g]["local"].items()), f"{name} worker {g}"
    assert any(v.abs().max() > 0 for v in ranks[0]["velocity"].values()), "a zero velocity would prove nothing"
    assert not torch.equal(ranks[0]["local"]["0.weight"], ranks[2]["local"]["0.weight"])
    # Rank 0 holds the center and the velocity in host memory, and its worker's file; ranks 1 and 3 (not the first
    # of their worker) only send slices; rank 2 writes worker 1's file, its own worker's state, and no center.
    for key in ("in_center_bytes", "bytes"):
        assert ranks[0][key] >= 2 * model_bytes
        for rank in (1, 3):
            assert ranks[rank][key] < model_bytes / 20, f"rank {rank} allocated {ranks[rank][key]} bytes ({key})"
    assert ranks[2]["in_center_bytes"] < 3 * model_bytes, f"rank 2 allocated {ranks[2]['in_center_bytes']} bytes"
    # a.ckpt, saved at the same step, shares in_center.ckpt's worker files: no worker state is built again.
    assert ranks[2]["bytes"] < model_bytes / 20, f"rank 2 allocated {ranks[2]['bytes']} bytes"
    for g in range(2):
        shared = [tmp_path / f"{name}.workers" for name in ("in_center.ckpt", "a.ckpt")]
        inodes = {next(d.rglob(f"worker_{g:05d}.pt")).stat().st_ino for d in shared}
        assert len(inodes) == 1, f"worker {g}'s file is stored once"
