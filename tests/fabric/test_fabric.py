"""The Fabric strategy against the same single-process replay of the paper's rule as the Trainer (tests/toy.py).

Workers are forked in-process (``start_method="fork"``); each writes what the tests compare to ``rank{r}.pt``.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import re
import sys
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.fabric import Fabric
from lightning.fabric.strategies import STRATEGY_REGISTRY
from lightning.pytorch.strategies import StrategyRegistry
from torch.nn.functional import mse_loss
from torch.utils.data import DataLoader, TensorDataset

from helpers.asserts import assert_close, assert_matches_replay
from helpers.bounded import run_bounded
from helpers.instruments import COUNTS, count_collectives
from helpers.launch import SEED
from helpers.momentum_replay import every, replay_center_momentum
from helpers.replay import replay_easgd
from helpers.toy import NaNLossRegressor, ToyRegressor, leave_collectives_in_flight, make_dataset, twins
from lightning_easgd import EASGDFabricStrategy, EASGDStrategy

ATOL = 1e-10  # float64 model: the only differences are summation order in the all-reduce
ROOT = Path(__file__).resolve().parents[2]


def run(p: int, strategy: EASGDFabricStrategy, out: Path, module: ToyRegressor, dataset: TensorDataset,
        **loop: Any) -> list[dict[str, Any]]:
    """Train ``module`` with ``p`` forked workers in a plain Fabric loop; return every rank's record."""
    out.mkdir(parents=True, exist_ok=True)
    fabric = Fabric(accelerator="cpu", devices=p, strategy=strategy)
    fabric.launch(_loop, module, dataset, out, **loop)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(p)]


def _loop(fabric: Fabric, module: ToyRegressor, dataset: TensorDataset, out: Path, *, epochs: int,
          batch_size: int, first_epoch: int = 0, closure: bool = False, accumulate: int = 1, load: Path | None = None,
          save: Path | None = None, save_in_center: bool = False, probe_center: bool = False,
          rank_seed: int | None = None) -> None:
    if rank_seed is not None:  # forked ranks inherit one RNG state; this gives each its own (dropout)
        torch.manual_seed(rank_seed + fabric.global_rank)
    model, optimizer = fabric.setup(module, module.configure_optimizers())
    loader = fabric.setup_dataloaders(DataLoader(dataset, batch_size=batch_size, shuffle=True))
    strategy = fabric.strategy
    assert isinstance(strategy, EASGDFabricStrategy)
    strategy.averager.track_distances()  # per tensor too where the strategy measures them
    for _ in range(first_epoch):  # Fabric sets the sampler's epoch to the number of times the loader was iterated
        next(iter(loader))
    if load is not None:
        fabric.load(load, {"model": model, "optimizer": optimizer})  # restores this rank's RNG: after the above
    rec: dict[str, Any] = {
        "start_state": {k: v.clone() for k, v in module.state_dict().items()},
        "start_optim": copy.deepcopy(optimizer.state_dict()),
        "collectives": [],
    }
    for epoch in range(first_epoch, epochs):
        batches = list(loader)
        for start in range(0, len(batches), accumulate):
            before = dict(COUNTS)
            x, y = batches[start]
            if accumulate > 1:
                optimizer.zero_grad()
                micro = batches[start : start + accumulate]
                for i, (x, y) in enumerate(micro):
                    with fabric.no_backward_sync(model, enabled=i < len(micro) - 1):  # a no-op under EASGD
                        fabric.backward(mse_loss(model(x), y) / len(micro))
                optimizer.step()
            elif closure:
                def step_closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                    optimizer.zero_grad()
                    loss = mse_loss(model(x), y)
                    fabric.backward(loss)
                    return loss

                optimizer.step(step_closure)
            else:
                optimizer.zero_grad()
                loss = mse_loss(model(x), y)
                if isinstance(module, NaNLossRegressor):
                    loss = module.poison(loss, (fabric.global_rank, strategy.averager.clock))
                fabric.backward(loss)
                optimizer.step()
            rec["collectives"].append({k: n - before.get(k, 0) for k, n in COUNTS.items() if n != before.get(k, 0)})
        if save is not None:
            with strategy.center() if save_in_center else contextlib.nullcontext():  # e.g. after evaluating it
                fabric.save(save / f"epoch={epoch}.ckpt", {"model": model, "optimizer": optimizer, "epoch": epoch})
                fabric.save(save / "last.ckpt", {"model": model, "optimizer": optimizer, "epoch": epoch})
    averager = strategy.averager
    rec.update(
        local={k: v.clone() for k, v in module.state_dict().items()},
        center={n: v.clone() for n, v in zip(averager.names, averager.center_values())},
        optim=copy.deepcopy(optimizer.state_dict()),
        stats=averager.pop_stats(),
        velocity={k: v.clone() for k, v in (averager.center_velocity() or {}).items()},
        alpha=averager.alpha,
        buckets=len(averager.layout.buckets),
        topology=(strategy.num_workers, strategy.ranks_per_worker, strategy.worker_index, strategy.rank_in_worker),
        wrapped=type(model._forward_module).__name__,
        exchange=(averager.bytes_per_exchange, averager.device_buffer_bytes < averager.buffer_bytes,
                  strategy.overlap),
    )
    if probe_center:
        rec.update(_probe_center(fabric, model, module, optimizer, dataset))
    torch.save(rec, out / f"rank{fabric.global_rank}.pt")


def _probe_center(fabric: Fabric, model: Any, module: ToyRegressor, optimizer: Any,
                  dataset: TensorDataset) -> dict[str, Any]:
    """What ``center()`` and ``adopt_center()`` do to the model, its Parameter objects and the optimizer."""
    params = list(module.parameters())
    optim = copy.deepcopy(optimizer.state_dict())
    x, y = dataset.tensors
    with fabric.strategy.center():
        seen = {k: v.clone() for k, v in module.state_dict().items()}
        with torch.no_grad():
            center_loss = float(mse_loss(model(x), y))
        with pytest.raises(RuntimeError, match="inside `with fabric.strategy.center"):
            optimizer.step()
    same_objects = all(a is b for a, b in zip(params, module.parameters())) and all(
        a is b for a, b in zip(params, optimizer.param_groups[0]["params"]))
    restored = {k: v.clone() for k, v in module.state_dict().items()}
    optim_untouched = _same_optimizer_state(optim, optimizer.state_dict())
    fabric.strategy.adopt_center()
    with pytest.raises(RuntimeError, match="EASGD ended"):
        optimizer.step()
    return {"seen": seen, "center_loss": center_loss, "same_objects": same_objects, "restored": restored,
            "optim_untouched": optim_untouched, "adopted": {k: v.clone() for k, v in module.state_dict().items()},
            "still_same_objects": all(a is b for a, b in zip(params, module.parameters()))}


def _same_optimizer_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a["param_groups"] != b["param_groups"] or a["state"].keys() != b["state"].keys():
        return False
    return all(torch.equal(a["state"][i][k], b["state"][i][k]) for i in a["state"] for k in a["state"][i])


@pytest.fixture
def warnings_(monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> Any:
    """The strategy's warnings, also from forked workers (printed to the inherited stderr)."""
    for where in ("lightning_easgd.adapter.layout", "lightning_easgd.checkpoint.routines"):
        monkeypatch.setattr(f"{where}.rank_zero_warn", lambda msg, *a, **k: print(msg, file=sys.stderr))
    capfd.readouterr()
    return lambda: capfd.readouterr().err


# ---------------------------------------------------------------------- registry and options


def test_registered_in_fabrics_own_registry() -> None:
    assert STRATEGY_REGISTRY is not StrategyRegistry  # Fabric's registry is not the Trainer's
    for name, start_method in [("easgd", "popen"), ("easgd_spawn", "spawn"), ("easgd_fork", "fork")]:
        assert STRATEGY_REGISTRY[name]["strategy"] is EASGDFabricStrategy
        assert StrategyRegistry[name]["strategy"] is EASGDStrategy
        fabric = Fabric(accelerator="cpu", devices=2, strategy=name)
        assert isinstance(fabric.strategy, EASGDFabricStrategy)
        assert fabric.strategy._start_method == start_method


@pytest.mark.parametrize(
    "bad",
    [
        {"tau": 0}, {"tau": 2.5}, {"alpha": 1.0}, {"alpha": 0}, {"beta": 2.0}, {"overlap": "yes"},
        {"bucket_cap_mb": 0}, {"bucket_cap_mb": True}, {"save_worker_states": 1}, {"on_nonfinite": "ignore"},
        {"timeout": 30}, {"timeout": timedelta(0)}, {"start_method": "thread"}, {"ranks_per_worker": 0},
        {"center_device": "cuda"}, {"center_device": "cpu", "overlap": True}, {"exchange_dtype": "float16"},
        {"center_momentum": 1.0}, {"center_nesterov": "yes"}, {"warmup_steps": -1},
        {"tau": 4, "warmup_steps": 10, "warmup_tau": 5},
    ],
)
def test_bad_options_are_refused_as_by_the_trainer_strategy(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError) as trainer_error:
        EASGDStrategy(**bad)
    with pytest.raises(ValueError) as fabric_error:
        EASGDFabricStrategy(**bad)
    assert str(fabric_error.value) == str(trainer_error.value)
    assert f"{next(iter(bad))}=" in str(fabric_error.value)


def test_ddp_options_are_refused() -> None:
    with pytest.raises(ValueError, match="EASGDFabricStrategy does not accept find_unused_parameters=True"):
        EASGDFabricStrategy(find_unused_parameters=True)
    with pytest.raises(ValueError, match="model_averaging_period=4: EASGD replaces periodic model averaging"):
        EASGDFabricStrategy(model_averaging_period=4)
    with pytest.raises(TypeError, match="unexpected keyword argument.*: taux"):
        EASGDFabricStrategy(taux=3)
    with pytest.raises(ValueError, match=r"broadcast_buffers=False: .* inside a worker group the strategy sets it"):
        EASGDFabricStrategy(ranks_per_worker=2, broadcast_buffers=False)


def test_defaults_are_the_trainer_strategys() -> None:
    fabric, trainer = EASGDFabricStrategy(), EASGDStrategy()
    for name in ("tau", "beta", "overlap", "bucket_cap_mb", "save_worker_states", "on_nonfinite"):
        assert getattr(fabric, name) == getattr(trainer, name), name
    assert EASGDFabricStrategy(center_device="cpu").overlap is False  # as for the Trainer: a host center cannot


# ---------------------------------------------------------------------- the rule


@pytest.mark.parametrize(
    ("p", "tau", "optimizer", "overlap", "closure"),
    [
        (2, 1, "sgd", True, False),
        (2, 3, "nesterov", False, False),
        (3, 1, "nesterov", True, True),
        (3, 4, "sgd", True, False),
    ],
)
def test_matches_replay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, p: int, tau: int, optimizer: str,
                        overlap: bool, closure: bool) -> None:
    momentum = {"sgd": {}, "nesterov": {"momentum": 0.9, "nesterov": True}}[optimizer]
    module, init = twins(ToyRegressor, 0, lr=0.1, weight_decay=1e-3, **momentum)
    dataset = make_dataset(48)
    alpha = 0.9 / p
    count_collectives(monkeypatch)

    records = run(p, EASGDFabricStrategy(tau=tau, overlap=overlap, start_method="fork"), tmp_path, module, dataset,
                  epochs=2, batch_size=4, closure=closure, probe_center=True)
    expected = replay_easgd(init, dataset, p=p, tau=tau, alpha=alpha, epochs=2, batch_size=4, seed=SEED)

    x, y = dataset.tensors
    init.load_state_dict(expected.center, strict=False)
    with torch.no_grad():
        center_loss = float(mse_loss(init(x), y))
    assert_matches_replay(records, expected, ATOL)
    for rank, rec in enumerate(records):
        assert rec["wrapped"] == "ToyRegressor", "the module must not be wrapped in DistributedDataParallel"
        assert rec["alpha"] == pytest.approx(alpha)
        # One all-reduce per bucket plus the statistics vector at each exchange, nothing in between.
        assert len(rec["collectives"]) == 2 * 48 // (4 * p)
        for t, calls in enumerate(rec["collectives"]):
            want = {"all_reduce": rec["buckets"] + 1} if t > 0 and t % tau == 0 else {}
            assert calls == want, f"rank {rank} step {t}: {calls}"
        # center(): the center in the same Parameter objects, then exactly the local weights back; optimizer
        # untouched. adopt_center(): the center for good, in the same objects.
        assert_close(rec["seen"], expected.center, ATOL, f"rank {rank} weights inside center()")
        assert rec["center_loss"] == pytest.approx(center_loss, rel=1e-9)
        assert rec["same_objects"] and rec["still_same_objects"]
        for key, value in rec["local"].items():
            assert torch.equal(rec["restored"][key], value), f"rank {rank} {key} not restored exactly"
        assert rec["optim_untouched"]
        assert_close(rec["adopted"], expected.center, ATOL, f"rank {rank} after adopt_center()")
    assert not torch.equal(records[0]["local"]["net.0.weight"], records[1]["local"]["net.0.weight"])


WARMUP_STEPS = [2, 4, 6, 8, 12, 16, 20]  # warm-up period 2 below step 7, then tau = 4 (24 steps)


@pytest.mark.parametrize(
    ("options", "due"),
    [
        ({"tau": 3, "center_momentum": 0.5}, every(3)),
        ({"tau": 4, "warmup_steps": 7, "warmup_tau": 2, "center_momentum": 0.9, "center_nesterov": True},
         WARMUP_STEPS.__contains__),
    ],
    ids=["heavy-ball", "nesterov-warmup"],
)
def test_center_momentum_and_warmup_match_replay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 options: dict[str, Any], due: Any) -> None:
    """The averager options reach the Fabric strategy's exchange: the same replay as the Trainer's momentum tests."""
    module, init = twins(ToyRegressor, 1, lr=0.1, momentum=0.9, nesterov=True)
    dataset = make_dataset(48)
    count_collectives(monkeypatch)
    records = run(2, EASGDFabricStrategy(start_method="fork", **options), tmp_path, module, dataset, epochs=2,
                  batch_size=2)
    momentum, nesterov = options["center_momentum"], options.get("center_nesterov", False)
    expected = replay_center_momentum(init, dataset, p=2, alpha=0.45, momentum=momentum, nesterov=nesterov,
                                      due=due, epochs=2, batch_size=2, seed=SEED)
    if "warmup_steps" in options:
        assert expected.exchange_steps == WARMUP_STEPS
    for rank, rec in enumerate(records):
        assert [t for t, calls in enumerate(rec["collectives"]) if calls] == expected.exchange_steps
        assert_close(rec["local"], expected.workers[rank], ATOL, f"worker {rank} local weights")
        assert_close(rec["center"], expected.center, ATOL, f"rank {rank} center")
        assert_close(rec["velocity"], expected.velocity, ATOL, f"rank {rank} center velocity")
    plain = replay_center_momentum(init, dataset, p=2, alpha=0.45, momentum=0.0, nesterov=False, due=due, epochs=2,
                                   batch_size=2, seed=SEED)
    assert (records[0]["center"]["net.0.weight"] - plain.center["net.0.weight"]).abs().max() > 1e-4


@pytest.mark.parametrize("options", [{"center_device": "cpu"}, {"exchange_dtype": "bfloat16"}])
def test_host_center_and_bf16_exchange_match_replay(tmp_path: Path, options: dict[str, Any]) -> None:
    module, init = twins(ToyRegressor, 11, lr=0.1, weight_decay=1e-3, momentum=0.9, nesterov=True)
    dataset = make_dataset(48)
    strategy = EASGDFabricStrategy(tau=2, start_method="fork", **options)
    records = run(2, strategy, tmp_path, module, dataset, epochs=2, batch_size=4)
    wire = torch.bfloat16 if "exchange_dtype" in options else None
    numel = sum(v.numel() for v in init.state_dict().values() if v.is_floating_point())
    expected = replay_easgd(init, dataset, p=2, tau=2, alpha=0.45, epochs=2, batch_size=4, seed=SEED,
                            exchange_dtype=wire)
    for rank, rec in enumerate(records):
        host = "center_device" in options  # center and d_i in host memory, not overlapped
        assert rec["exchange"] == (numel * (2 if wire else 8), host, not host)
        assert_close(rec["local"], expected.workers[rank], ATOL, f"worker {rank} local weights")
        assert_close(rec["center"], expected.center, ATOL, f"rank {rank} center")
    if wire is not None:  # the bf16 rounding of d_i is visible: the full-precision replay is elsewhere
        full = replay_easgd(init, dataset, p=2, tau=2, alpha=0.45, epochs=2, batch_size=4, seed=SEED)
        assert (records[0]["center"]["net.0.weight"] - full.center["net.0.weight"]).abs().max() > 1e-6


@pytest.mark.parametrize(("tau", "batch_size", "accumulate"), [(2, 2, 1), (1, 2, 2)])
def test_worker_groups_match_replay(tmp_path: Path, tau: int, batch_size: int, accumulate: int) -> None:
    """2 workers of 2 ranks: DDP on each worker's own process group averages its ranks' gradients every step
    (``fabric.no_backward_sync`` skips that on accumulation micro-batches), the exchange runs between the workers."""
    module, init = twins(ToyRegressor, 11, lr=0.1, weight_decay=1e-3, momentum=0.9, nesterov=True)
    dataset = make_dataset(48)
    strategy = EASGDFabricStrategy(tau=tau, ranks_per_worker=2, start_method="fork")
    records = run(4, strategy, tmp_path, module, dataset, epochs=2, batch_size=batch_size, accumulate=accumulate,
                  probe_center=True)
    expected = replay_easgd(init, dataset, p=2, tau=tau, alpha=0.45, epochs=2, batch_size=batch_size, seed=SEED,
                            ranks_per_worker=2, accumulate=accumulate)
    assert len(expected.exchanges) >= 3
    for rank, rec in enumerate(records):
        assert rec["wrapped"] == "DistributedDataParallel"
        assert rec["topology"] == (2, 2, rank // 2, rank % 2)
        assert rec["alpha"] == pytest.approx(0.45)
        assert_close(rec["local"], expected.workers[rank // 2], ATOL, f"rank {rank} (worker {rank // 2})")
        assert_close(rec["center"], expected.center, ATOL, f"rank {rank} center")
        # center() and adopt_center() with a sharded center: the full center in, the local weights back exactly.
        assert_close(rec["seen"], expected.center, ATOL, f"rank {rank} weights inside center()")
        assert_close(rec["restored"], rec["local"], 0.0, f"rank {rank} after center()")
        assert rec["same_objects"] and rec["still_same_objects"] and rec["optim_untouched"]
        assert_close(rec["adopted"], expected.center, ATOL, f"rank {rank} after adopt_center()")
    assert not torch.equal(records[0]["local"]["net.0.weight"], records[2]["local"]["net.0.weight"])


def test_worker_groups_save_and_resume_exactly(tmp_path: Path, warnings_: Any) -> None:
    """2 workers of 2 ranks: one file per worker, written by its first rank with both ranks' RNG states; resuming
    reproduces the uninterrupted run (dropout: every rank's own generator matters). Saved with the center swapped in,
    where the worker's local values are gathered from its ranks' slices."""
    dataset = make_dataset(48, dtype=torch.float32)
    torch.manual_seed(14)
    init = _resume_model().state_dict()
    straight = _resume_model()
    straight.load_state_dict(init)
    ckpt = tmp_path / "ckpt"
    full = run(4, EASGDFabricStrategy(tau=2, ranks_per_worker=2, timeout=timedelta(seconds=60), start_method="fork"),
               tmp_path / "full", straight, dataset, epochs=2, batch_size=2, save=ckpt, save_in_center=True,
               rank_seed=100)
    section = torch.load(ckpt / "epoch=0.ckpt", weights_only=True)["easgd"]
    assert section["num_workers"] == 2 and section["ranks_per_worker"] == 2 and len(section["worker_files"]) == 2
    for g in range(2):
        mine = torch.load(ckpt / section["worker_files"][g], weights_only=True)
        assert mine["worker"] == g and len(mine["rng"]) == 2
        assert not torch.equal(mine["rng"][0]["torch"], mine["rng"][1]["torch"]), "each rank's own generator"
    second = run(4, EASGDFabricStrategy(tau=2, ranks_per_worker=2, start_method="fork"), tmp_path / "second",
                 _resume_model(), dataset, epochs=2, batch_size=2, first_epoch=1, load=ckpt / "epoch=0.ckpt",
                 rank_seed=200)
    for rank in range(4):
        assert_close(second[rank]["local"], full[rank]["local"], 1e-6, f"rank {rank} after resume")
        assert_close(second[rank]["center"], full[rank]["center"], 1e-6, "center after resume")
    assert not torch.equal(full[0]["local"]["net.0.weight"], full[2]["local"]["net.0.weight"])


def test_gradient_accumulation(tmp_path: Path) -> None:
    """Several forward/backward passes per optimizer.step(): one tick of the clock, the step opens at the first."""
    module, init = twins(ToyRegressor, 2, momentum=0.9, nesterov=True)
    dataset = make_dataset(48)
    records = run(2, EASGDFabricStrategy(tau=2, start_method="fork"), tmp_path, module, dataset, epochs=1,
                  batch_size=3, accumulate=2)
    expected = replay_easgd(init, dataset, p=2, tau=2, alpha=0.45, epochs=1, batch_size=3, seed=SEED, accumulate=2)
    for rank, rec in enumerate(records):
        assert len(rec["collectives"]) == 4 and [s.step for s in rec["stats"]] == [2]
        assert_close(rec["local"], expected.workers[rank], ATOL, f"worker {rank}")
        assert_close(rec["center"], expected.center, ATOL, "center")


def test_batchnorm_buffers_and_distance_statistics(tmp_path: Path) -> None:
    """Buffers are measured before the step's forward pass, as the Trainer does; statistics match the replay."""
    module, init = twins(ToyRegressor, 1, batchnorm=True)
    dataset = make_dataset(48)
    records = run(2, EASGDFabricStrategy(tau=2, per_tensor_distances=True, start_method="fork"), tmp_path, module,
                  dataset, epochs=2, batch_size=6)
    expected = replay_easgd(init, dataset, p=2, tau=2, alpha=0.45, epochs=2, batch_size=6, seed=SEED)
    assert len(expected.exchanges) == 3  # 8 steps: exchanges at t = 2, 4, 6
    for rank, rec in enumerate(records):
        assert "net.1.running_mean" in rec["center"] and "net.1.num_batches_tracked" not in rec["center"]
        assert_close(rec["local"], expected.workers[rank], ATOL, f"worker {rank}")
        assert_close(rec["center"], expected.center, ATOL, "center")
        assert rec["local"]["net.1.num_batches_tracked"].item() == 8
        names = list(rec["center"])
        assert [s.step for s in rec["stats"]] == [e["step"] for e in expected.exchanges]
        for got, want in zip(rec["stats"], expected.exchanges):
            assert got.distances.tolist() == pytest.approx(want["distances"], rel=1e-9)
            assert got.center_norm == pytest.approx(want["center_norm"], rel=1e-9)
            for r in range(2):
                layers = dict(zip(names, got.layer_distances[r].tolist()))
                assert layers == pytest.approx(want["layers"][r], rel=1e-9, abs=1e-12)
    assert not torch.equal(records[0]["center"]["net.1.running_mean"], init.net[1].running_mean)


def test_reset_policy_drops_and_restarts_the_diverged_worker(tmp_path: Path, warnings_: Any) -> None:
    """Worker 1's loss is NaN at step 3; the exchange at step 4 leaves it out and resets it, momentum cleared."""
    module, init = twins(NaNLossRegressor, 40, nan_rank=1, nan_step=3, momentum=0.9)
    dataset = make_dataset(48)
    records = run(2, EASGDFabricStrategy(tau=2, on_nonfinite="reset", start_method="fork"), tmp_path, module,
                  dataset, epochs=1, batch_size=4)
    assert "worker(s) 1 had non-finite weights at optimizer step 4" in warnings_()
    expected = replay_easgd(init, dataset, p=2, tau=2, alpha=0.45, epochs=1, batch_size=4, seed=SEED,
                            reset_nonfinite=True)
    for rank, rec in enumerate(records):
        assert all(v.isfinite().all() for v in rec["local"].values())
        assert_close(rec["local"], expected.workers[rank], ATOL, f"worker {rank}")
        assert_close(rec["center"], expected.center, ATOL, "center")


# ---------------------------------------------------------------------- checkpoints


def _resume_model() -> ToyRegressor:
    return ToyRegressor(lr=0.05, momentum=0.9, nesterov=True, dropout=0.2, dtype="float32")


def test_save_and_resume_exactly(tmp_path: Path) -> None:
    """2 epochs straight == 1 epoch, fabric.save, fabric.load in fresh processes, 1 more (dropout and momentum)."""
    dataset = make_dataset(48, dtype=torch.float32)
    torch.manual_seed(11)
    init = _resume_model().state_dict()
    straight = _resume_model()
    straight.load_state_dict(init)
    ckpt = tmp_path / "ckpt"
    full = run(2, EASGDFabricStrategy(tau=2, start_method="fork"), tmp_path / "full", straight, dataset, epochs=2,
               batch_size=4, save=ckpt)

    # The main file: the center as the model's weights, the user's entries, EASGD's metadata; plain tensors only.
    main = torch.load(ckpt / "last.ckpt", weights_only=True)
    assert_close(main["model"], full[0]["center"], 0.0, "saved center")
    assert main["epoch"] == 1
    section = main["easgd"]
    assert section["num_workers"] == 2 and section["tau"] == 2 and section["clock"] == 12
    assert section["alpha"] == pytest.approx(0.45)
    assert "center_velocity" not in section  # no center momentum
    # Each worker's file, written by that worker (the Trainer strategy's layout); saving twice over last.ckpt kept
    # only the newest files.
    assert [d.name for d in (ckpt / "last.ckpt.workers").iterdir()] == [section["save_id"]]
    assert section["worker_files"] == [f"last.ckpt.workers/{section['save_id']}/worker_{g:05d}.pt" for g in range(2)]
    for rank in range(2):
        mine = torch.load(ckpt / section["worker_files"][rank], weights_only=True)
        assert mine["worker"] == rank and mine["save_id"] == section["save_id"] and mine["num_workers"] == 2
        assert_close(mine["state_dict"], full[rank]["local"], 0.0, f"worker {rank} file")
        assert mine["optimizer_states"][0]["state"], "momentum buffers are saved"

    resumed = _resume_model()  # fresh weights: everything must come from the checkpoint
    second = run(2, EASGDFabricStrategy(tau=2, start_method="fork"), tmp_path / "second", resumed, dataset,
                 epochs=2, batch_size=4, first_epoch=1, load=ckpt / "epoch=0.ckpt")
    for rank in range(2):
        assert_close(second[rank]["local"], full[rank]["local"], 1e-6, f"worker {rank} after resume")
        assert_close(second[rank]["center"], full[rank]["center"], 1e-6, "center after resume")
        for got, want in zip(second[rank]["optim"]["state"].values(), full[rank]["optim"]["state"].values()):
            assert torch.allclose(got["momentum_buffer"], want["momentum_buffer"], atol=1e-6)
        assert [s.step for s in second[rank]["stats"]] == [6, 8, 10]  # the clock was restored
    assert not torch.equal(full[0]["local"]["net.0.weight"], full[1]["local"]["net.0.weight"])


def test_center_velocity_travels_in_checkpoints_and_resumes_exactly(tmp_path: Path, warnings_: Any) -> None:
    """Center momentum and a warm-up: 2 epochs straight == 1 epoch, save, load, 1 more; v comes from the file."""
    dataset = make_dataset(48, dtype=torch.float32)
    torch.manual_seed(13)
    init = _resume_model().state_dict()
    options = {"tau": 3, "warmup_steps": 8, "warmup_tau": 1, "center_momentum": 0.5, "center_nesterov": True}
    straight = _resume_model()
    straight.load_state_dict(init)
    ckpt = tmp_path / "ckpt"
    full = run(2, EASGDFabricStrategy(start_method="fork", **options), tmp_path / "full", straight, dataset,
               epochs=2, batch_size=4, save=ckpt)
    last = torch.load(ckpt / "last.ckpt", weights_only=True)["easgd"]
    assert_close(last["center_velocity"], full[0]["velocity"], 0.0, "saved velocity")
    saved = torch.load(ckpt / "epoch=0.ckpt", weights_only=True)["easgd"]["center_velocity"]
    assert max(v.abs().max().item() for v in saved.values()) > 1e-3, "a zero velocity would prove nothing"

    second = run(2, EASGDFabricStrategy(start_method="fork", **options), tmp_path / "second", _resume_model(),
                 dataset, epochs=2, batch_size=4, first_epoch=1, load=ckpt / "epoch=0.ckpt")
    for rank in range(2):
        assert_close(second[rank]["local"], full[rank]["local"], 1e-6, f"worker {rank} after resume")
        assert_close(second[rank]["center"], full[rank]["center"], 1e-6, "center after resume")
        assert_close(second[rank]["velocity"], full[rank]["velocity"], 1e-6, "velocity after resume")
        assert [s.step for s in second[rank]["stats"]] == [6, 7, 9]  # warm-up until step 8, then tau = 3
    warnings_()
    plain = run(2, EASGDFabricStrategy(tau=3, start_method="fork"), tmp_path / "plain", _resume_model(), dataset,
                epochs=1, batch_size=4, first_epoch=1, load=ckpt / "epoch=0.ckpt")
    assert "the velocity is dropped" in warnings_()
    assert plain[0]["velocity"] == {}


def test_resume_with_more_workers(tmp_path: Path, warnings_: Any) -> None:
    dataset = make_dataset(48)
    torch.manual_seed(12)
    ckpt = tmp_path / "ckpt"
    run(2, EASGDFabricStrategy(tau=2, start_method="fork"), tmp_path / "first", ToyRegressor(momentum=0.9),
        dataset, epochs=1, batch_size=4, save=ckpt)
    main = torch.load(ckpt / "last.ckpt", weights_only=True)
    warnings_()

    records = run(3, EASGDFabricStrategy(tau=2, start_method="fork"), tmp_path / "second",
                  ToyRegressor(momentum=0.9), dataset, epochs=2, batch_size=4, first_epoch=1, load=ckpt / "last.ckpt")
    assert ("the checkpoint has 2 workers and this run has 3; own weights and optimizer state restored: workers "
            "0-1; starting from the center: worker 2; alpha is now 0.3.") in warnings_()
    for rank, rec in enumerate(records):
        assert rec["alpha"] == pytest.approx(0.3)
        if rank < 2:
            mine = torch.load(ckpt / main["easgd"]["worker_files"][rank], weights_only=True)
            assert_close(rec["start_state"], mine["state_dict"], 0.0, f"worker {rank}")
            assert rec["start_optim"]["state"], f"worker {rank} keeps its momentum"
        else:
            assert_close(rec["start_state"], main["model"], 0.0, "new worker 2 starts from the center")
            assert not rec["start_optim"]["state"], "a new worker starts with no momentum"
            assert rec["start_optim"]["param_groups"] == main["optimizer"]["param_groups"]
        assert [s.step for s in rec["stats"]] == [6, 8]  # clock 6 restored, then 4 steps (16 samples per worker)


def test_without_worker_states(tmp_path: Path, warnings_: Any) -> None:
    dataset = make_dataset(48)
    ckpt = tmp_path / "ckpt"
    run(2, EASGDFabricStrategy(tau=2, start_method="fork"), tmp_path / "a", ToyRegressor(), dataset, epochs=1,
        batch_size=4, save=ckpt)
    assert (ckpt / "last.ckpt.workers").is_dir()
    run(2, EASGDFabricStrategy(tau=2, save_worker_states=False, start_method="fork"), tmp_path / "b",
        ToyRegressor(), dataset, epochs=1, batch_size=4, save=ckpt)
    main = torch.load(ckpt / "last.ckpt", weights_only=True)
    assert "worker_files" not in main["easgd"]
    assert not (ckpt / "last.ckpt.workers").exists(), "worker files no checkpoint names are removed"
    warnings_()
    records = run(2, EASGDFabricStrategy(tau=2, start_method="fork"), tmp_path / "c", ToyRegressor(), dataset,
                  epochs=2, batch_size=4, first_epoch=1, load=ckpt / "last.ckpt")
    assert "all 2 workers start from the center" in warnings_()
    for rec in records:
        assert_close(rec["start_state"], main["model"], 0.0, "worker starts from the center")


def _misuse(fabric: Fabric, out: Path) -> None:
    module = ToyRegressor()
    model, optimizer = fabric.setup(module, module.configure_optimizers())
    with pytest.raises(ValueError, match="has no entry holding the model set up with EASGD"):
        fabric.save(out / "x.ckpt", {"optimizer": optimizer})
    with pytest.raises(ValueError, match="'easgd' is reserved"):
        fabric.save(out / "x.ckpt", {"model": model, "easgd": 1})
    with pytest.raises(ValueError, match="trains one model per run"):
        fabric.setup(ToyRegressor())
    x, y = make_dataset(4).tensors
    fabric.backward(mse_loss(model(x), y))  # step 0 opens, no exchange due: saving is fine
    optimizer.step()
    fabric.backward(mse_loss(model(x), y))  # step 1 opens with an exchange in flight (tau=1)
    with pytest.raises(RuntimeError, match="in the middle of an optimizer step"):
        fabric.save(out / "x.ckpt", {"model": model})
    with pytest.raises(RuntimeError, match="in the middle of an optimizer step"):
        with fabric.strategy.center():
            pass
    optimizer.step()
    # Loading plain weights into the set-up model moves the center and this worker there.
    torch.save({k: v + 1 for k, v in module.state_dict().items()}, out / "raw.pt")
    fabric.load_raw(out / "raw.pt", model)
    center = dict(zip(fabric.strategy.averager.names, fabric.strategy.averager.center_values()))
    for key, value in torch.load(out / "raw.pt").items():
        assert torch.equal(module.state_dict()[key], value) and torch.equal(center[key], value), key
    torch.save({"done": True}, out / "rank0.pt")


def test_misuse_is_refused(tmp_path: Path) -> None:
    fabric = Fabric(accelerator="cpu", devices=1, strategy=EASGDFabricStrategy(tau=1, start_method="fork"))
    fabric.launch(_misuse, tmp_path)
    assert torch.load(tmp_path / "rank0.pt")["done"]


def _setup_only(fabric: Fabric) -> None:
    fabric.setup(ToyRegressor())


@pytest.mark.parametrize("error_handling", ["0", None])
def test_setup_warns_like_the_trainer(monkeypatch: pytest.MonkeyPatch, warnings_: Any, error_handling: str | None
                                      ) -> None:
    """Fabric's setup is the Trainer's (lightning_easgd.adapter.layout): one worker is warned about, and so is NCCL with
    its error handling off, which would hang a stalled exchange instead of timing it out (NCCL reported, gloo
    running)."""
    if error_handling is None:
        monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", raising=False)
    else:
        monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", error_handling)
    monkeypatch.setattr("lightning_easgd.adapter.layout.dist", SimpleNamespace(is_initialized=lambda: True,
                                                                        get_backend=lambda: "nccl"))
    fabric = Fabric(accelerator="cpu", devices=1, strategy=EASGDFabricStrategy(start_method="fork"))
    fabric.launch(_setup_only)
    warned = warnings_()
    assert "EASGDFabricStrategy is running with a single worker: EASGD needs at least 2 workers" in warned
    assert ("TORCH_NCCL_ASYNC_ERROR_HANDLING=0 disables NCCL's handling of collective timeouts" in warned) == (
        error_handling == "0")


# ---------------------------------------------------------------------- the spawn launcher


def _setup_and_leave_collectives_in_flight(fabric: Fabric) -> None:
    fabric.setup(ToyRegressor())
    leave_collectives_in_flight()


def test_spawned_workers_exit_cleanly_with_collectives_in_flight() -> None:
    # As for the Trainer (tests/trainer/test_strategy.py): an undestroyed gloo group aborted most such exits.
    for _ in range(3):
        Fabric(accelerator="cpu", devices=2, strategy=EASGDFabricStrategy(start_method="spawn")).launch(
            _setup_and_leave_collectives_in_flight
        )


# ---------------------------------------------------------------------- the popen launcher


def test_quickstart_with_the_registry_name(tmp_path: Path) -> None:
    """``Fabric(strategy="easgd")`` and ``fabric.launch()`` start two processes with the popen launcher; the example
    leaves every epoch's logged metrics on disk (its CSVLogger is finalized) and says where its files went."""
    done = run_bounded([sys.executable, str(ROOT / "examples" / "fabric_quickstart.py")], cwd=tmp_path, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:]
    out = tmp_path / "outputs" / "fabric_quickstart"
    printed = dict(re.findall(r"epoch (\d+): center accuracy ([0-9.]+)", done.stdout))
    assert sorted(printed) == ["0", "1", "2", "3", "4"], done.stdout[-3000:]
    metrics = out / "lightning_logs" / "version_0" / "metrics.csv"
    with metrics.open() as f:
        rows = list(csv.DictReader(f))
    assert [row["step"] for row in rows] == sorted(printed)
    assert [f"{float(row['center_acc']):.3f}" for row in rows] == [printed[row["step"]] for row in rows]
    assert all(float(row["max_distance"]) > 0 for row in rows)
    assert f"metrics: {metrics}" in done.stdout
    for name in ("last.ckpt", "center.ckpt"):
        assert (out / name).is_file()
        assert f"{out / name}" in done.stdout


# ---------------------------------------------------------------------- the elastic family (docs/family.md)


@pytest.mark.parametrize(
    ("p", "k", "options", "closure"),
    [
        (2, 1, {"tau": 3, "worker_pull": "reset", "center_momentum": 0.9, "center_nesterov": True, "beta": 0.7},
         False),  # DiLoCo
        (3, 1, {"tau": 2, "sync_steps": 3}, True),  # post-local SGD, gradients averaged after the closure
        (2, 1, {"tau": 2, "sync_steps": 4, "worker_pull": "reset", "beta": 1.0}, False),  # post-local averaging
        (2, 2, {"tau": 2, "sync_steps": 3, "worker_pull": "reset", "beta": 1.0, "center_momentum": 0.5}, False),
    ],
    ids=["diloco", "sync-closure", "sync-local-sgd", "sync-slowmo-groups"],
)
def test_family_matches_replay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, p: int, k: int,
                               options: dict[str, Any], closure: bool) -> None:
    """The reset rule and the synchronous start in a Fabric loop: the Trainer's replay, every worker and the center,
    with the synchronous steps' all-reduce and the exchanges on their steps (worker groups: across the column)."""
    module, init = twins(ToyRegressor, 2, lr=0.1, momentum=0.9, nesterov=True)
    dataset = make_dataset(48)
    count_collectives(monkeypatch)
    records = run(p * k, EASGDFabricStrategy(ranks_per_worker=k, start_method="fork", **options), tmp_path, module,
                  dataset, epochs=2, batch_size=2, closure=closure)
    sync, tau = options.get("sync_steps", 0), options["tau"]
    due = every(tau, after=sync)
    expected = replay_center_momentum(init, dataset, p=p, alpha=options.get("beta", 0.9) / p,
                                      momentum=options.get("center_momentum", 0.0),
                                      nesterov=options.get("center_nesterov", False), due=due, epochs=2,
                                      batch_size=2, seed=SEED, reset=options.get("worker_pull") == "reset",
                                      sync_steps=sync, ranks_per_worker=k)
    assert_matches_replay(records, expected, ATOL, k)
    for rank, rec in enumerate(records):
        steps = [t for t, calls in enumerate(rec["collectives"]) if calls.get("all_reduce")]
        if k == 1:
            assert steps == list(range(sync)) + expected.exchange_steps, f"rank {rank}"
        if options.get("center_momentum"):
            assert_close(rec["velocity"], expected.velocity, ATOL, f"rank {rank} center velocity")


def test_family_options_refused_by_fabric() -> None:
    with pytest.raises(ValueError, match=r"EASGDFabricStrategy does not accept sync_epochs=2: Fabric never sees the "
                                         r"training loop's length.*pass sync_steps"):
        EASGDFabricStrategy(sync_epochs=2)
    with pytest.raises(ValueError, match=r"worker_pull='average' is invalid"):
        EASGDFabricStrategy(worker_pull="average")
    with pytest.raises(ValueError, match=r"sync_steps=2 cannot be combined with warmup_steps=4"):
        EASGDFabricStrategy(sync_steps=2, warmup_steps=4, warmup_tau=2)


def _clipped_loop(fabric: Fabric, module: ToyRegressor, dataset: TensorDataset, out: Path) -> None:
    """Two epochs with ``fabric.clip_gradients`` between backward and step; saves the local weights (and the center
    under EASGD)."""
    model, optimizer = fabric.setup(module, module.configure_optimizers())
    loader = fabric.setup_dataloaders(DataLoader(dataset, batch_size=4, shuffle=True))
    for _ in range(2):
        for x, y in loader:
            optimizer.zero_grad()
            fabric.backward(mse_loss(model(x), y))
            fabric.clip_gradients(model, optimizer, max_norm=0.05)
            optimizer.step()
    strategy = fabric.strategy
    center = ({n: v.clone() for n, v in zip(strategy.averager.names, strategy.averager.center_values())}
              if isinstance(strategy, EASGDFabricStrategy) else None)
    torch.save({"local": {k: v.clone() for k, v in module.state_dict().items()}, "center": center},
               out / f"rank{fabric.global_rank}.pt")


def test_all_synchronous_fabric_loop_with_clipping_is_fabrics_ddp(tmp_path: Path) -> None:
    """sync_steps beyond the loop: every step is DDP's, with the gradients averaged before ``fabric.clip_gradients``
    clips them, so every worker and the center end where Fabric's own DDPStrategy ends."""
    from lightning.fabric.strategies import DDPStrategy as FabricDDPStrategy

    dataset = make_dataset(48)
    results = {}
    for name, strategy in (("easgd", EASGDFabricStrategy(tau=2, sync_steps=1000, start_method="fork")),
                           ("ddp", FabricDDPStrategy(start_method="fork"))):
        module, _ = twins(ToyRegressor, 9, lr=0.2, momentum=0.9, nesterov=True)
        (tmp_path / name).mkdir()
        Fabric(accelerator="cpu", devices=2, strategy=strategy).launch(_clipped_loop, module, dataset, tmp_path / name)
        results[name] = [torch.load(tmp_path / name / f"rank{r}.pt", weights_only=False) for r in range(2)]
    ddp = results["ddp"][0]["local"]
    for rank, rec in enumerate(results["easgd"]):
        assert_close(rec["local"], ddp, ATOL, f"worker {rank} against DDP")
        assert_close(rec["center"], ddp, ATOL, f"rank {rank} center against DDP")
    module, init = twins(ToyRegressor, 9, lr=0.2, momentum=0.9, nesterov=True)
    per_worker = replay_center_momentum(init, dataset, p=2, alpha=0.45, momentum=0.0, nesterov=False,
                                        due=lambda t: False, epochs=2, batch_size=4, seed=SEED, sync_steps=1000)
    # Without clipping the same averaged steps end elsewhere: the clipping acted.
    assert (per_worker.center["net.0.weight"] - ddp["net.0.weight"]).abs().max() > 1e-4


@pytest.mark.parametrize("sync", [8, 6, 4])  # the resume at clock 6: inside the start, at the hand-over, after it
def test_synchronous_start_resumes_exactly(tmp_path: Path, sync: int) -> None:
    """fabric.save after epoch 0 (clock 6) and fabric.load in fresh processes reproduce the uninterrupted run with
    the reset rule and heavy-ball center momentum, the exchanges on the same steps (t > N, (t − N) % 2 == 0)."""
    dataset = make_dataset(48, dtype=torch.float32)
    torch.manual_seed(13)
    init = _resume_model().state_dict()
    straight = _resume_model()
    straight.load_state_dict(init)
    ckpt = tmp_path / "ckpt"

    def strategy() -> EASGDFabricStrategy:
        return EASGDFabricStrategy(tau=2, sync_steps=sync, worker_pull="reset", beta=1.0, center_momentum=0.5,
                                   start_method="fork")

    full = run(2, strategy(), tmp_path / "full", straight, dataset, epochs=2, batch_size=4, save=ckpt)
    second = run(2, strategy(), tmp_path / "second", _resume_model(), dataset, epochs=2, batch_size=4,
                 first_epoch=1, load=ckpt / "epoch=0.ckpt")
    exchanges = [t for t in range(12) if t > sync and (t - sync) % 2 == 0]
    for rank in range(2):
        assert_close(second[rank]["local"], full[rank]["local"], 1e-6, f"worker {rank} after resume")
        assert_close(second[rank]["center"], full[rank]["center"], 1e-6, "center after resume")
        assert [s.step for s in full[rank]["stats"]] == exchanges
        assert [s.step for s in second[rank]["stats"]] == [t for t in exchanges if t >= 6]
    # Dropout differs between the ranks: only the synchronous start keeps the workers identical.
    assert not torch.equal(full[0]["local"]["net.0.weight"], full[1]["local"]["net.0.weight"])
