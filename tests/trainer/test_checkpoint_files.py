"""Checkpoints that scale: every worker's state in its own file, written by that worker; old checkpoints load."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint

from helpers.asserts import assert_close
from helpers.checkpoint_files import worker_states
from helpers.launch import fit_fork
from helpers.toy import ToyRegressor, make_dataset
from lightning_easgd import EASGDStrategy
from lightning_easgd.checkpoint.atomic_io import AtomicCheckpointIO
from lightning_easgd.checkpoint.rng import capture_rng_state, restore_rng_state
from lightning_easgd.checkpoint.worker_files import WorkerFileError, resolve_worker_file

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_format_1_checkpoint_resumes_exactly(tmp_path: Path, messages: Any) -> None:
    """A checkpoint with the workers embedded (made by the code before worker files; see
    fixtures/make_legacy_checkpoint.py) resumes to what the uninterrupted run of that code gave."""
    expected = torch.load(FIXTURES / "legacy_format1_expected.pt", weights_only=True)
    resumed = ToyRegressor(lr=0.05, momentum=0.9, nesterov=True, dropout=0.2)
    _, records = fit_fork(resumed, make_dataset(24), tmp_path, p=2, epochs=2, batch_size=4,
                          ckpt_path=str(FIXTURES / "legacy_format1.ckpt"),
                          strategy=EASGDStrategy(tau=2, start_method="fork"))
    for rank, rec in enumerate(records):
        assert_close(rec["local"], expected["local"][rank], 1e-10, f"worker {rank} after resume")
        assert_close(rec["center"], expected["center"], 1e-10, "center after resume")
        momentum = [s["momentum_buffer"] for s in rec["optim"][0]["state"].values()]
        assert_close(dict(enumerate(momentum)), dict(enumerate(expected["momentum"][rank])), 1e-10, "momentum")
    assert not torch.equal(expected["local"][0]["net.0.weight"], expected["local"][1]["net.0.weight"])


def _legacy_twin_model() -> ToyRegressor:
    """The model, data and seeds of the format-1 fixture, so that its expected values apply to format 2 too."""
    return ToyRegressor(lr=0.05, momentum=0.9, nesterov=True, dropout=0.2)


def _refuse(name: str) -> Any:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"torch.distributed.{name} was called: a rank received other ranks' state")

    return refuse


def test_worker_files_resume_exactly_and_nobody_gathers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Save after one epoch, move the checkpoint directory, resume for one more: the same numbers as the
    uninterrupted run of the fixture, while no rank ever receives another rank's state."""
    for name in ("gather_object", "all_gather_object", "gather", "all_gather", "all_gather_into_tensor", "recv",
                 "irecv", "scatter_object_list"):
        monkeypatch.setattr(dist, name, _refuse(name))
    expected = torch.load(FIXTURES / "legacy_format1_expected.pt", weights_only=True)
    dataset = make_dataset(24)
    torch.manual_seed(21)
    first = _legacy_twin_model()
    fit_fork(first, dataset, tmp_path / "first", p=2, epochs=1, batch_size=4, enable_checkpointing=True,
             callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)],
             strategy=EASGDStrategy(tau=2, start_method="fork"))
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "ckpt", moved)
    path = moved / "last.ckpt"

    ckpt = torch.load(path, weights_only=True)
    section = ckpt["easgd"]
    assert section["format"] == 2 and section["num_workers"] == 2 and section["clock"] == 3
    assert not ckpt["optimizer_states"][0]["state"], "per-parameter optimizer state only in the worker files"
    assert_close(ToyRegressor.load_from_checkpoint(path).state_dict(), ckpt["state_dict"], 0.0, "load_from_checkpoint")
    files = sorted((moved / "last.ckpt.workers").rglob("*.pt"))
    assert [f.name for f in files] == ["worker_00000.pt", "worker_00001.pt"]
    assert [moved / name for name in section["worker_files"]] == files
    saved = [torch.load(f, weights_only=True) for f in files]  # plain tensors and Python types only
    for g, worker in enumerate(saved):
        assert worker["worker"] == g and worker["save_id"] == section["save_id"] and len(worker["rng"]) == 1
        assert set(worker["state_dict"]) == set(ckpt["state_dict"])
    assert not torch.equal(saved[0]["state_dict"]["net.0.weight"], saved[1]["state_dict"]["net.0.weight"])

    _, records = fit_fork(_legacy_twin_model(), dataset, tmp_path / "second", p=2, epochs=2, batch_size=4,
                          ckpt_path=str(path), strategy=EASGDStrategy(tau=2, start_method="fork"))
    for g, rec in enumerate(records):
        assert_close(rec["start_state"], saved[g]["state_dict"], 0.0, f"worker {g} resumes from its own file")
        assert_close(rec["local"], expected["local"][g], 1e-10, f"worker {g} after resume")
        assert_close(rec["center"], expected["center"], 1e-10, "center after resume")
        momentum = [s["momentum_buffer"] for s in rec["optim"][0]["state"].values()]
        assert_close(dict(enumerate(momentum)), dict(enumerate(expected["momentum"][g])), 1e-10, "momentum")


@pytest.mark.parametrize("save_last", [True, "link"])
def test_rotation_removes_worker_files(tmp_path: Path, save_last: bool | str) -> None:
    """save_top_k=1 over three epochs keeps one checkpoint with its files; last.ckpt has its own (or is a link
    that resumes through the file it points to)."""
    out = tmp_path / "ckpt"
    fit_fork(ToyRegressor(momentum=0.9), make_dataset(24), tmp_path, p=2, epochs=3, batch_size=4,
             enable_checkpointing=True, strategy=EASGDStrategy(tau=2, start_method="fork"),
             callbacks=[ModelCheckpoint(dirpath=out, filename="{epoch}", save_top_k=1, save_last=save_last)])
    names = {"epoch=2.ckpt", "epoch=2.ckpt.workers", "last.ckpt"}
    if save_last is True:
        names.add("last.ckpt.workers")
    assert {p.name for p in out.iterdir()} == names
    for ckpt_name in ("epoch=2.ckpt", "last.ckpt"):
        section = torch.load(out / ckpt_name, weights_only=True)["easgd"]
        directory = out / section["worker_files"][0].split("/")[0]
        assert directory.name == ("epoch=2.ckpt.workers" if save_last == "link" else f"{ckpt_name}.workers")
        assert [p.name for p in directory.iterdir()] == [section["save_id"]], "older saves are removed"
        assert sorted(p.name for p in (directory / section["save_id"]).iterdir()) == [
            "worker_00000.pt", "worker_00001.pt"
        ]
    if save_last == "link":
        assert (out / "last.ckpt").is_symlink()
        _, records = fit_fork(ToyRegressor(momentum=0.9), make_dataset(24), tmp_path / "second", p=2, epochs=4,
                              batch_size=4, ckpt_path=str(out / "last.ckpt"),
                              strategy=EASGDStrategy(tau=2, start_method="fork"))
        for g, worker in enumerate(worker_states(out / "epoch=2.ckpt")):
            assert_close(records[g]["start_state"], worker["state_dict"], 0.0, f"worker {g} resumed through link")


def _break(files: list[Path], damage: str) -> None:
    if damage == "missing":
        files[1].unlink()
    elif damage == "unreadable":
        files[1].write_bytes(files[1].read_bytes()[:100])
    else:
        shutil.copyfile(files[0], files[1])


@pytest.mark.parametrize(("damage", "reason"), [
    ("missing", "is missing"),
    ("unreadable", r"is unreadable \(truncated or corrupt\?\)"),
    ("foreign", "does not belong to this checkpoint"),
])
def test_damaged_worker_file_is_named(tmp_path: Path, damage: str, reason: str) -> None:
    fit_fork(ToyRegressor(), make_dataset(24), tmp_path / "first", p=2, epochs=1, batch_size=4,
             enable_checkpointing=True, strategy=EASGDStrategy(tau=2, start_method="fork"),
             callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)])
    path = tmp_path / "ckpt" / "last.ckpt"
    files = sorted((tmp_path / "ckpt" / "last.ckpt.workers").rglob("worker_*.pt"))
    _break(files, damage)
    with pytest.raises(Exception, match=rf"cannot resume from {re.escape(str(path))}: .*\n  worker 1: "
                                        rf"{re.escape(str(files[1]))} {reason}"):
        fit_fork(ToyRegressor(), make_dataset(24), tmp_path / "second", p=2, epochs=2, batch_size=4,
                 ckpt_path=str(path), strategy=EASGDStrategy(tau=2, start_method="fork"))


def test_worker_file_names_stay_inside_the_checkpoint_directory(tmp_path: Path) -> None:
    assert resolve_worker_file(tmp_path / "a.ckpt", "a.ckpt.workers/x/worker_00000.pt") == str(
        tmp_path.resolve() / "a.ckpt.workers" / "x" / "worker_00000.pt"
    )
    for bad in ("../elsewhere/worker_00000.pt", "/etc/worker_00000.pt"):
        with pytest.raises(WorkerFileError, match="must be relative paths inside the checkpoint's directory"):
            resolve_worker_file(tmp_path / "a.ckpt", bad)


class _FakeCuda:
    """Stands in for torch.cuda's generator functions: ``visible`` devices, this process on ``current``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, visible: int, current: int) -> None:
        self.states = [torch.full((16,), d, dtype=torch.uint8) for d in range(visible)]
        self.current = current
        for name, value in {
            "is_available": lambda: True, "is_initialized": lambda: True, "current_device": lambda: self.current,
            "get_rng_state": self.get_rng_state, "set_rng_state": self.set_rng_state,
            "get_rng_state_all": lambda: list(self.states), "set_rng_state_all": self.set_rng_state_all,
        }.items():
            monkeypatch.setattr(torch.cuda, name, value)

    def get_rng_state(self, device: Any = "cuda") -> torch.Tensor:
        assert device == "cuda", "the current device's generator"
        return self.states[self.current].clone()

    def set_rng_state(self, state: torch.Tensor, device: Any = "cuda") -> None:
        assert device == "cuda", "the current device's generator"
        self.states[self.current] = state.clone()

    def set_rng_state_all(self, states: list[torch.Tensor]) -> None:
        for d, state in enumerate(states):  # raises IndexError with fewer visible devices, as torch does
            self.states[d] = state.clone()


def test_rng_state_is_the_current_cuda_devices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Saved where a rank sees 4 devices and uses device 2, restored where it sees only its own device 0
    (SLURM --gpus-per-task=1)."""
    _FakeCuda(monkeypatch, visible=4, current=2)
    torch.save(capture_rng_state(), tmp_path / "rng.pt")
    state = torch.load(tmp_path / "rng.pt", weights_only=True)
    assert torch.equal(state["cuda"], torch.full((16,), 2, dtype=torch.uint8))
    single = _FakeCuda(monkeypatch, visible=1, current=0)
    restore_rng_state(state)
    assert torch.equal(single.states[0], torch.full((16,), 2, dtype=torch.uint8))


def test_rng_state_of_format_1_takes_the_current_devices_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Format 1 saved every visible device's state: the current device's entry is restored, and a device the list
    does not reach keeps its state, with a warning (instead of an IndexError)."""
    _FakeCuda(monkeypatch, visible=4, current=0)
    legacy = capture_rng_state()
    legacy["cuda"] = [torch.full((16,), 10 + d, dtype=torch.uint8) for d in range(4)]
    fake = _FakeCuda(monkeypatch, visible=2, current=1)
    restore_rng_state(legacy)
    assert torch.equal(fake.states[1], torch.full((16,), 11, dtype=torch.uint8))
    assert torch.equal(fake.states[0], torch.zeros(16, dtype=torch.uint8)), "other devices are left alone"
    fake = _FakeCuda(monkeypatch, visible=8, current=5)
    with pytest.warns(UserWarning, match="CUDA random state of 4 device"):
        restore_rng_state(legacy)
    assert torch.equal(fake.states[5], torch.full((16,), 5, dtype=torch.uint8))


def test_failed_worker_file_write_stops_every_rank_before_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write = AtomicCheckpointIO.save_checkpoint

    def full_disk_for_worker_1(self: AtomicCheckpointIO, checkpoint: Any, path: Any, storage_options: Any = None
                               ) -> None:
        if Path(path).name == "worker_00001.pt":
            raise OSError(28, "No space left on device")
        write(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", full_disk_for_worker_1)
    path = tmp_path / "ckpt" / "epoch=0.ckpt"
    with pytest.raises(Exception) as raised:
        fit_fork(ToyRegressor(), make_dataset(24), tmp_path, p=2, epochs=1, batch_size=4, enable_checkpointing=True,
                 strategy=EASGDStrategy(tau=2, start_method="fork"),
                 callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}")])
    text = str(raised.value)
    assert (f"could not write {path}.workers/" in text and "/worker_00001.pt, worker 1's file of checkpoint "
            f"{path}: OSError: [Errno 28] No space left on device" in text) or (
        f"another rank could not write its worker file of checkpoint {path} (see its error)" in text)
    assert not path.exists(), "no checkpoint file names a worker file that was not written"


def test_damaged_section_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {}, "easgd": {"format": 2, "num_workers": 2, "save_id": "x",
                                            "worker_files": ["bad.ckpt.workers/x/worker_00000.pt"]}}, path)
    with pytest.raises(ValueError, match=r"bad.ckpt: the checkpoint's 'easgd' section is damaged: it needs "
                                         r"num_workers \(got 2\) worker file names"):
        EASGDStrategy().load_checkpoint(path)
    torch.save({"state_dict": {}, "easgd": {"format": 2, "num_workers": 1, "save_id": "x",
                                            "worker_files": ["../x/worker_00000.pt"]}}, path)
    with pytest.raises(WorkerFileError, match="must be relative paths inside the checkpoint's directory"):
        EASGDStrategy().load_checkpoint(path)


def _two_ranks_per_worker(**kwargs: Any) -> EASGDStrategy:
    """2 ranks forming 1 worker (k = 2): the strategy's resolved topology is what the checkpoint routines read."""
    return EASGDStrategy(ranks_per_worker=2, **kwargs)


class _NumpyStateAtStart(L.Callback):
    """Saves each rank's numpy generator state when training starts (after the restore; nothing draws from it)."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _, keys, pos, _, _ = np.random.get_state()
        torch.save({"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos)},
                   self.out / f"numpy{trainer.global_rank}.pt")


class _RankDependentDraws(L.Callback):
    """Makes the ranks' numpy generators differ: rank r draws r + 1 numbers per batch."""

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        np.random.rand(trainer.global_rank + 1)


def test_a_worker_of_two_ranks_keeps_both_rng_states(tmp_path: Path, messages: Any) -> None:
    """With k = 2 the writer gathers its worker's two RNG states (inside the worker) into one file; on resume each
    rank takes its own entry, and ranks beyond the saved k start from seeded generators, with a warning."""
    fit_fork(ToyRegressor(), make_dataset(24), tmp_path / "first", p=2, epochs=1, batch_size=4,
             enable_checkpointing=True, strategy=_two_ranks_per_worker(tau=2, start_method="fork"),
             callbacks=[_RankDependentDraws(),
                        ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)])
    path = tmp_path / "ckpt" / "last.ckpt"
    section = torch.load(path, weights_only=True)["easgd"]
    assert section["num_workers"] == 1 and section["ranks_per_worker"] == 2
    (worker,) = worker_states(path)
    assert len(worker["rng"]) == 2
    assert worker["rng"][0]["numpy"]["pos"] != worker["rng"][1]["numpy"]["pos"], "each rank's own state"

    fit_fork(ToyRegressor(), make_dataset(24), tmp_path / "second", p=2, epochs=2, batch_size=4,
             ckpt_path=str(path), strategy=_two_ranks_per_worker(tau=2, start_method="fork"),
             callbacks=[_NumpyStateAtStart(tmp_path / "second")])
    for j in range(2):
        got = torch.load(tmp_path / "second" / f"numpy{j}.pt", weights_only=True)
        saved = worker["rng"][j]["numpy"]
        assert torch.equal(got["keys"], saved["keys"]) and got["pos"] == saved["pos"], f"rank {j}'s own RNG state"

    plain = tmp_path / "plain"
    fit_fork(ToyRegressor(), make_dataset(24), plain, p=2, epochs=1, batch_size=4, enable_checkpointing=True,
             strategy=EASGDStrategy(tau=2, start_method="fork"),
             callbacks=[ModelCheckpoint(dirpath=plain / "ckpt", save_last=True, save_top_k=0)])
    messages()
    fit_fork(ToyRegressor(), make_dataset(24), tmp_path / "third", p=2, epochs=2, batch_size=4,
             ckpt_path=str(plain / "ckpt" / "last.ckpt"), strategy=_two_ranks_per_worker(tau=2, start_method="fork"))
    assert ("the checkpoint has 1 rank(s) per worker and this run has 2; ranks 1-1 of every worker start from "
            "freshly seeded random number generators") in messages()


class _CenterCopies(L.Callback):
    """Records, on every rank, whether the checkpoint's state_dict copies the center or shares its memory."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
                           ) -> None:
        averager = trainer.strategy.averager
        center = {t.untyped_storage().data_ptr() for t in averager.center_values()}
        state = checkpoint["state_dict"]
        torch.save({"shared": [state[n].untyped_storage().data_ptr() in center for n in averager.names],
                    "devices": sorted({str(v.device) for v in state.values()})},
                   self.out / f"copies{trainer.global_rank}.pt")


def test_only_rank_zero_copies_the_center(tmp_path: Path) -> None:
    """Rank 0, which writes the checkpoint file, holds one CPU copy of the center; the other ranks none."""
    fit_fork(ToyRegressor(), make_dataset(24), tmp_path, p=2, epochs=1, batch_size=4, enable_checkpointing=True,
             strategy=EASGDStrategy(tau=2, start_method="fork"),
             callbacks=[_CenterCopies(tmp_path), ModelCheckpoint(dirpath=tmp_path / "ckpt")])
    zero, one = (torch.load(tmp_path / f"copies{r}.pt", weights_only=True) for r in range(2))
    assert not any(zero["shared"]) and zero["devices"] == ["cpu"]
    assert all(one["shared"]), "the other ranks' state_dict views the center"


def test_checkpoints_of_the_same_step_share_their_worker_files(tmp_path: Path) -> None:
    """last.ckpt and the top-k checkpoint saved at the same step store each worker file once (hard links to one
    inode); rotation still prunes; removing either checkpoint leaves the other resumable."""
    out = tmp_path / "ckpt"
    fit_fork(ToyRegressor(momentum=0.9), make_dataset(24), tmp_path / "first", p=2, epochs=3, batch_size=4,
             enable_checkpointing=True, strategy=EASGDStrategy(tau=2, start_method="fork"),
             callbacks=[ModelCheckpoint(dirpath=out, filename="{epoch}", save_top_k=1, save_last=True)])
    assert {p.name for p in out.iterdir()} == {"epoch=2.ckpt", "epoch=2.ckpt.workers", "last.ckpt",
                                               "last.ckpt.workers"}
    top, last = (torch.load(out / name, weights_only=True)["easgd"] for name in ("epoch=2.ckpt", "last.ckpt"))
    assert top["save_id"] == last["save_id"]
    for g in range(2):
        files = [out / top["worker_files"][g], out / last["worker_files"][g]]
        assert files[0] != files[1] and files[0].stat().st_ino == files[1].stat().st_ino, f"worker {g} stored once"
        assert files[0].stat().st_nlink == 2, "the files of earlier epochs are gone"
    states = worker_states(out / "epoch=2.ckpt")
    assert not torch.equal(states[0]["state_dict"]["net.0.weight"], states[1]["state_dict"]["net.0.weight"])
    for removed, kept in (("epoch=2.ckpt", "last.ckpt"), ("last.ckpt", "epoch=2.ckpt")):
        copy = tmp_path / f"without_{removed}"
        shutil.copytree(out, copy, copy_function=os.link)  # more links to the same inodes
        (copy / removed).unlink()
        shutil.rmtree(copy / f"{removed}.workers")
        _, records = fit_fork(ToyRegressor(momentum=0.9), make_dataset(24), tmp_path / f"resume_{kept}", p=2,
                              epochs=4, batch_size=4, ckpt_path=str(copy / kept),
                              strategy=EASGDStrategy(tau=2, start_method="fork"))
        for g in range(2):
            assert_close(records[g]["start_state"], states[g]["state_dict"], 0.0, f"worker {g} from {kept}")
            momentum = [s["momentum_buffer"] for s in records[g]["start_optim"][0]["state"].values()]
            saved = [s["momentum_buffer"] for s in states[g]["optimizer_states"][0]["state"].values()]
            assert_close(dict(enumerate(momentum)), dict(enumerate(saved)), 0.0, f"worker {g} momentum")


def test_the_checkpoint_format_imports_no_adapter() -> None:
    """lightning_easgd/checkpoint/ is framework-neutral: no lightning.pytorch, no trainer/ or fabric/ module, not
    even for type checking (every import statement of its files, wherever it stands)."""
    import ast

    package = Path(__file__).resolve().parents[2] / "lightning_easgd" / "checkpoint"
    forbidden = ("lightning.pytorch", "pytorch_lightning", "lightning_easgd.trainer", "lightning_easgd.fabric")
    found = []
    for source in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{source.name}: {name}" for name in names if name.startswith(forbidden)]
    assert len(list(package.glob("*.py"))) >= 5
    assert not found, found
