"""Worker groups (k ranks per worker), the host-resident center and the bf16 exchange against the replay."""

from __future__ import annotations

import csv
import json
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from helpers.asserts import assert_close, assert_matches_replay
from helpers.bounded import run_bounded
from helpers.instruments import count_collectives
from helpers.launch import REPO, SEED, fit_fork
from helpers.replay import replay_easgd
from helpers.toy import NaNLossRegressor, ToyRegressor, make_dataset, twins
from lightning_easgd import AsyncEASGDStrategy, EASGDStrategy, ElasticDistanceMonitor

ATOL = 1e-10  # float64 model: only summation order differs (in DDP's mean, the all-reduce and the union batch)
NUMEL = 6 * 8 + 8 + 8 + 1  # ToyRegressor's parameters: one float64 bucket, split between the ranks of a worker


class CountGradientReduction(L.Callback):
    """Route DDP's gradient all-reduce through torch.distributed.all_reduce (DDP's own allreduce hook, the same
    arithmetic as its built-in reduction) so that count_collectives sees it."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = trainer.strategy.model
        if isinstance(model, DistributedDataParallel):
            model.register_comm_hook(trainer.strategy.worker_group, default_hooks.allreduce_hook)


def _check_against_replay(records: list[dict[str, Any]], expected: Any, k: int, atol: float) -> None:
    assert_matches_replay(records, expected, atol, k)
    for rank, rec in enumerate(records):
        assert len(rec["val_seen"]) == len(expected.epoch_centers)
        for epoch, seen in enumerate(rec["val_seen"]):
            assert_close(seen, expected.epoch_centers[epoch], atol, f"rank {rank} weights seen by validation")


@pytest.mark.parametrize(
    ("p", "k", "tau", "optimizer", "options"),
    [
        (2, 2, 1, "sgd", {}),
        (2, 2, 3, "nesterov", {"overlap": False}),
        (2, 2, 2, "sgd", {"center_device": "cpu"}),
        (2, 2, 2, "nesterov", {"exchange_dtype": "bfloat16"}),
        (3, 1, 2, "nesterov", {"center_device": "cpu"}),
        (2, 1, 2, "sgd", {"exchange_dtype": torch.bfloat16}),
    ],
)
def test_groups_match_replay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, p: int, k: int, tau: int,
                             optimizer: str, options: dict[str, Any]) -> None:
    momentum = {"sgd": {}, "nesterov": {"momentum": 0.9, "nesterov": True}}[optimizer]
    module, init = twins(ToyRegressor, 11, lr=0.1, weight_decay=1e-3, **momentum)
    dataset = make_dataset(48)
    count_collectives(monkeypatch)
    trainer, records = fit_fork(module, dataset, tmp_path, p=p * k, epochs=2, batch_size=2,
                                callbacks=[CountGradientReduction()],
                                strategy=EASGDStrategy(tau=tau, ranks_per_worker=k, start_method="fork", **options))
    wire = torch.bfloat16 if options.get("exchange_dtype") else None
    expected = replay_easgd(init, dataset, p=p, tau=tau, alpha=0.9 / p, epochs=2, batch_size=2, seed=SEED,
                            ranks_per_worker=k, exchange_dtype=wire)
    assert len(expected.exchanges) >= 3
    _check_against_replay(records, expected, k, ATOL)
    itemsize = 2 if wire else 8
    slice_bytes = -(-NUMEL // k) * itemsize  # the bucket padded to a multiple of k, cut into k slices
    for rank, rec in enumerate(records):
        assert rec["topology"] == (p, k, rank // k, rank % k)
        assert rec["wrapped"] == ("DistributedDataParallel" if k > 1 else "ToyRegressor")
        assert rec["bytes_per_exchange"] == slice_bytes
        worker_ranks = tuple(range(rank // k * k, rank // k * k + k))
        column = tuple(range(rank % k, p * k, k))
        gradients = [("all_reduce", worker_ranks, NUMEL * 8)] if k > 1 else []  # DDP's, inside the worker
        for step, traffic in rec["traffic"]:
            t = step - 1
            if not (t > 0 and t % tau == 0):
                assert traffic == gradients, f"rank {rank} step {t}: {traffic}"
                continue
            assert all(call in traffic for call in gradients)
            traffic = [call for call in traffic if call not in gradients]
            column_calls = [(name, b) for name, ranks, b in traffic if ranks == column and ranks != worker_ranks]
            # The bucket's slice (1/k of it) and the statistics vector, in that order.
            assert [name for name, _ in column_calls] == ["all_reduce", "all_reduce"], traffic
            assert column_calls[0][1] == slice_bytes
            if k > 1:
                in_worker = [(name, b) for name, ranks, b in traffic if ranks == worker_ranks]
                # The worker's ‖d‖² (a few float64 scalars) before the column reduction, the overflow check of the
                # summed slices (one float64, so every rank of the worker decides alike), then the gather of the
                # full-precision d slices for the pull (all_gather_into_tensor before torch has all_gather_single).
                gather = "all_gather_single" if hasattr(torch.distributed, "all_gather_single") else \
                    "all_gather_into_tensor"
                assert [name for name, _ in in_worker] == ["all_reduce", "all_reduce", gather], traffic
                assert in_worker[0][1] <= 8 * 3 and in_worker[1][1] == 8 and in_worker[2][1] == -(-NUMEL // k) * 8
    # Validation on the center with sync_dist: the mean loss over all samples (shards are equal-sized).
    x, y = dataset.tensors
    init.load_state_dict(expected.center, strict=False)
    with torch.no_grad():
        loss = torch.nn.functional.mse_loss(init(x), y).item()
    assert trainer.callback_metrics["val_loss"].item() == pytest.approx(loss, rel=1e-9)
    assert_close(module.state_dict(), expected.center, ATOL, "user's module after fit")


def test_groups_distance_monitor_is_per_worker(tmp_path: Path) -> None:
    module, init = twins(ToyRegressor, 12, momentum=0.9, nesterov=True)
    dataset = make_dataset(48)
    logger = CSVLogger(tmp_path, name="logs", version=0)
    fit_fork(module, dataset, tmp_path, p=4, epochs=1, batch_size=2, logger=logger,
             callbacks=[ElasticDistanceMonitor(per_layer=True, per_rank=True)],
             strategy=EASGDStrategy(tau=2, ranks_per_worker=2, per_tensor_distances=True, start_method="fork"))
    expected = replay_easgd(init, dataset, p=2, tau=2, alpha=0.45, epochs=1, batch_size=2, seed=SEED,
                            ranks_per_worker=2)
    rows: dict[int, dict[str, float]] = {}
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            values = {key: float(v) for key, v in row.items() if key.startswith("easgd/") and v != ""}
            if values:
                rows.setdefault(int(row["step"]), {}).update(values)
    assert sorted(rows) == [e["step"] for e in expected.exchanges] == [2, 4]
    for exchange in expected.exchanges:
        got = rows[exchange["step"]]
        assert "easgd/distance_rank2" not in got  # one entry per worker, not per rank
        for worker in range(2):
            assert got[f"easgd/distance_rank{worker}"] == pytest.approx(exchange["distances"][worker], rel=1e-9)
            for name, value in exchange["layers"][worker].items():
                assert got[f"easgd/layer/{name}/distance_rank{worker}"] == pytest.approx(value, rel=1e-9)
        assert got["easgd/center_norm"] == pytest.approx(exchange["center_norm"], rel=1e-9)


@pytest.mark.parametrize("policy", ["reset", "raise"])
def test_groups_divergence_guard_is_per_worker(tmp_path: Path, messages: Any, policy: str) -> None:
    """Rank 2's loss turns NaN at step 3: DDP spreads it over worker 1 (ranks 2 and 3), which the guard catches."""
    module, init = twins(NaNLossRegressor, 13, nan_rank=2, nan_step=3, momentum=0.9)
    init.nan_rank = 1  # the replay's position is (worker, step)
    dataset = make_dataset(48)
    strategy = EASGDStrategy(tau=2, ranks_per_worker=2, on_nonfinite=policy, start_method="fork")
    if policy == "raise":
        with pytest.raises(Exception, match=r"worker\(s\) 1 of 2 have non-finite parameters or buffers at optimizer "
                                            r"step 4"):
            fit_fork(module, dataset, tmp_path, p=4, epochs=1, batch_size=2, strategy=strategy)
        return
    _, records = fit_fork(module, dataset, tmp_path, p=4, epochs=1, batch_size=2, strategy=strategy)
    assert "worker(s) 1 had non-finite weights at optimizer step 4" in messages()
    expected = replay_easgd(init, dataset, p=2, tau=2, alpha=0.45, epochs=1, batch_size=2, seed=SEED,
                            ranks_per_worker=2, reset_nonfinite=True)
    for rank, rec in enumerate(records):
        assert all(v.isfinite().all() for v in rec["local"].values())
        assert_close(rec["local"], expected.workers[rank // 2], ATOL, f"rank {rank}")
        assert_close(rec["center"], expected.center, ATOL, "center")


def test_resume_with_other_worker_counts_and_group_sizes(tmp_path: Path, messages: Any) -> None:
    """Saved as 2 workers x 2 ranks; resumed as 4 x 1 and as 1 x 4: worker g restarts from saved worker g."""
    module = ToyRegressor(momentum=0.9)
    dataset = make_dataset(48)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last", save_top_k=1)
    _, saved = fit_fork(module, dataset, tmp_path / "a", p=4, epochs=1, batch_size=2, enable_checkpointing=True,
                        callbacks=[checkpoints], strategy=EASGDStrategy(tau=2, ranks_per_worker=2,
                                                                       start_method="fork"))
    path = str(tmp_path / "ckpt" / "last.ckpt")
    center = torch.load(path, weights_only=True)["state_dict"]
    assert_close(center, saved[0]["center"], 0.0, "checkpoint's center")
    for p, k in ((4, 1), (1, 4)):
        messages()
        _, resumed = fit_fork(ToyRegressor(momentum=0.9), dataset, tmp_path / f"b{k}", p=p * k, epochs=2,
                              batch_size=2, ckpt_path=path,
                              strategy=EASGDStrategy(tau=2, ranks_per_worker=k, start_method="fork"))
        if p == 4:
            assert "the checkpoint has 2 workers and this run has 4" in messages()
        for rank, rec in enumerate(resumed):
            worker = rank // k
            if worker < 2:  # saved worker g's first rank was 2g; its weights are those of the whole worker
                assert_close(rec["start_state"], saved[2 * worker]["local"], 0.0, f"resumed rank {rank}")
                assert rec["start_optim"][0]["state"], "the saved momentum was restored"
            else:
                assert_close(rec["start_state"], center, 0.0, f"new worker's rank {rank} starts from the center")
                assert rec["start_optim"][0]["state"] == {}


def test_ranks_per_worker_node_is_the_processes_per_node(tmp_path: Path, messages: Any) -> None:
    _, records = fit_fork(ToyRegressor(), make_dataset(8), tmp_path, p=2, epochs=1, batch_size=2,
                          strategy=EASGDStrategy(ranks_per_worker="node", start_method="fork"))
    assert [rec["topology"] for rec in records] == [(1, 2, 0, 0), (1, 2, 0, 1)]
    assert "EASGD needs at least 2 workers" in messages()


def test_world_size_not_divisible_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Exception, match=r"ranks_per_worker=2 does not divide the world size 3"):
        fit_fork(ToyRegressor(), make_dataset(12), tmp_path, p=3, epochs=1, batch_size=2,
                 strategy=EASGDStrategy(ranks_per_worker=2, start_method="fork"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ranks_per_worker": 0}, "ranks_per_worker=0 is invalid: it must be an integer >= 1 or 'node'"),
        ({"ranks_per_worker": "gpu"}, "ranks_per_worker='gpu' is invalid"),
        ({"ranks_per_worker": True}, "ranks_per_worker=True is invalid"),
        ({"center_device": "cuda"}, "center_device='cuda' is invalid: choose None .* or 'cpu'"),
        ({"exchange_dtype": "float16"}, "exchange_dtype='float16' is invalid: choose None"),
        ({"exchange_dtype": torch.float64}, "exchange_dtype=torch.float64 is invalid"),
        ({"center_device": "cpu", "overlap": True}, "overlap=True cannot be combined with center_device='cpu'"),
        ({"overlap": "yes"}, "overlap='yes' is invalid"),
    ],
)
def test_bad_group_options(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EASGDStrategy(**kwargs)


@pytest.mark.parametrize(
    "kwargs", [{"ranks_per_worker": 2}, {"center_device": "cpu"}, {"exchange_dtype": "bfloat16"}]
)
def test_async_refuses_what_only_the_synchronous_averager_does(kwargs: dict[str, Any]) -> None:
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"AsyncEASGDStrategy does not support {name}="):
        AsyncEASGDStrategy(**kwargs)


def test_center_device_cpu_default_overlap_is_off() -> None:
    assert EASGDStrategy(center_device="cpu").overlap is False
    assert EASGDStrategy().overlap is True


def test_groups_batchnorm_buffers_are_the_first_ranks(tmp_path: Path) -> None:
    """Each rank updates BatchNorm statistics from its own batch and DDP keeps the worker's first rank's; the
    exchange takes the first rank's too. Against a replay that runs every rank's batch apart (not their union)."""
    module, init = twins(ToyRegressor, 14, batchnorm=True, momentum=0.9)
    dataset = make_dataset(48)
    _, records = fit_fork(module, dataset, tmp_path, p=4, epochs=1, batch_size=2,
                          strategy=EASGDStrategy(tau=2, ranks_per_worker=2, start_method="fork"))
    expected = replay_easgd(init, dataset, p=2, tau=2, alpha=0.45, epochs=1, batch_size=2, seed=SEED,
                            ranks_per_worker=2, union_batches=False)
    for rank, rec in enumerate(records):
        assert_close(rec["center"], expected.center, ATOL, f"rank {rank} center")
        worker, first = divmod(rank, 2)
        params = {k: v for k, v in expected.workers[worker].items() if "running" not in k}
        assert_close(rec["local"], expected.workers[worker] if first == 0 else params, ATOL, f"rank {rank}")
    assert not torch.equal(records[0]["center"]["net.1.running_mean"], init.net[1].running_mean)


def test_groups_stalled_rank_fails_within_the_timeout(tmp_path: Path) -> None:
    """Rank 3 (worker 1) stalls: the other worker's exchange (or rank 2's DDP all-reduce, whichever fails first)
    fails after `timeout` instead of hanging."""
    import time

    class Stall(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
            if trainer.global_rank == 3 and trainer.global_step == 3:
                time.sleep(120)

    start = time.monotonic()
    with pytest.raises(Exception, match=r"(?s)(EASGD exchange at step 4 failed on rank [01] \(worker 0\)"
                                        r".*timeout 3 s)|[Tt]imed? ?out"):
        fit_fork(ToyRegressor(), make_dataset(48), tmp_path, p=4, epochs=1, batch_size=2, callbacks=[Stall()],
                 strategy=EASGDStrategy(tau=2, ranks_per_worker=2, timeout=timedelta(seconds=3),
                                        start_method="fork"))
    assert time.monotonic() - start < 60


def test_bf16_true_weights_keep_a_float32_center(tmp_path: Path) -> None:
    """bf16 weights (`bf16-true`): the center is float32 and equals a float32 replay of it; the workers' weights
    are the replay's pull rounded once into bf16."""
    module, init = twins(ToyRegressor, 15, dtype="bfloat16")
    dataset = make_dataset(48, dtype=torch.bfloat16)
    _, records = fit_fork(module, dataset, tmp_path, p=2, epochs=1, batch_size=4, precision="bf16-true",
                          strategy=EASGDStrategy(tau=2, start_method="fork"))
    expected = replay_easgd(init, dataset, p=2, tau=2, alpha=0.45, epochs=1, batch_size=4, seed=SEED)
    for rank, rec in enumerate(records):
        assert rec["center"]["net.0.weight"].dtype == torch.float32
        assert rec["local"]["net.0.weight"].dtype == torch.bfloat16
        assert_close(rec["center"], expected.center, 1e-6, f"rank {rank} center")  # fused multiply-add: 1 ulp
        assert_close(rec["local"], expected.workers[rank], 0.0, f"rank {rank} local weights")
    # A bf16 center would have lost some of the updates the float32 one kept.
    assert any(not torch.equal(v, v.bfloat16().float()) for v in records[0]["center"].values())


class UnusedParameterRegressor(ToyRegressor):
    """A parameter that gets no gradient: the DDP inside a worker needs find_unused_parameters=True for it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.unused = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))


def test_worker_ddp_options_are_passed_inside_groups_only(tmp_path: Path) -> None:
    _, records = fit_fork(UnusedParameterRegressor(), make_dataset(16), tmp_path, p=4, epochs=1, batch_size=2,
                          strategy=EASGDStrategy(tau=2, ranks_per_worker=2, find_unused_parameters=True,
                                                 start_method="fork"))
    for rank, rec in enumerate(records):
        for name, value in rec["local"].items():
            assert torch.equal(value, records[rank // 2 * 2]["local"][name])
    with pytest.raises(ValueError, match=r"find_unused_parameters=True: it is an option of DistributedDataParallel, "
                                         r"and with one rank per worker .* with ranks_per_worker > 1"):
        EASGDStrategy(find_unused_parameters=True)
    with pytest.raises(ValueError, match=r"broadcast_buffers=False: .* inside a worker group the strategy sets it"):
        EASGDStrategy(ranks_per_worker=2, broadcast_buffers=False)


def test_groups_checkpoint_saved_during_validation(tmp_path: Path) -> None:
    """With validation every second epoch, ModelCheckpoint saves at validation end, while the center is swapped in:
    every rank of a worker takes part in gathering its local values, and the worker files hold them."""
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last", save_top_k=1)
    _, records = fit_fork(ToyRegressor(momentum=0.9), make_dataset(48), tmp_path, p=4, epochs=2, batch_size=2,
                          enable_checkpointing=True, callbacks=[checkpoints], check_val_every_n_epoch=2,
                          strategy=EASGDStrategy(tau=2, ranks_per_worker=2, timeout=timedelta(seconds=60),
                                                 start_method="fork"))
    path = tmp_path / "ckpt" / "last.ckpt"
    section = torch.load(path, weights_only=True)["easgd"]
    assert section["clock"] == 12
    for g, name in enumerate(section["worker_files"]):
        mine = torch.load(path.parent / name, weights_only=True)
        assert_close(mine["state_dict"], records[2 * g]["local"], 0.0, f"worker {g}'s file")
    assert_close(torch.load(path, weights_only=True)["state_dict"], records[0]["center"], 0.0, "center")


def test_repeated_stages_do_not_add_process_groups(tmp_path: Path) -> None:
    """fit, validate, test, validate in the same processes: each stage builds its worker and column groups at setup
    and destroys them at teardown, so no stage leaves a group (on NCCL, a communicator) behind."""
    result = run_bounded([sys.executable, "tests/scripts/repeated_stages.py", str(tmp_path)], cwd=REPO, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:]
    for rank in range(4):
        counts = json.loads((tmp_path / f"groups{rank}.json").read_text())
        world = counts["after"][0][0]
        assert world == 1  # the default group only: the stage's two groups are gone
        assert [live for live, _ in counts["after"]] == [world] * 4
        # Each setup creates the worker groups and the column groups (2 + 2 calls of new_group), once.
        assert [created for _, created in counts["after"]] == [4, 8, 12, 16]
        # During a stage: the world plus this rank's worker group and column group (fit runs one validation).
        assert counts["during"] == [world + 2] * 5
