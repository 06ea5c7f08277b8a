"""Every config group option and every experiment composes and instantiates; bad overrides fail readably."""

from __future__ import annotations

import math
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from omegaconf import DictConfig, OmegaConf, open_dict

from helpers.recipes import CONF_DIR, REPO, experiments, group_options
from lightning_easgd import EASGDStrategy, ElasticDistanceMonitor
from lightning_easgd.core.family import steps_for_epochs
from lightning_easgd.recipes.classifier import ImageClassifier, LRSchedulerSpec
from lightning_easgd.recipes.schedulers import DivideOnPlateau
from lightning_easgd.recipes.train import _check_checkpoints, train
from lightning_easgd.trainer.async_strategy import AsyncEASGDStrategy

Compose = Callable[..., DictConfig]


@pytest.fixture
def fake_cifar10(tmp_path: Path) -> Path:
    """A CIFAR-10 root whose files exist but are empty: enough for the layout check (with verify_integrity off)."""
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"):
        (folder / name).touch()
    (folder / "batches.meta").touch()
    return folder.parent


@pytest.fixture
def fake_imagenet(tmp_path: Path) -> Path:
    """An ImageFolder root with 1000 empty class folders in train/ and val/: enough for the layout check."""
    root = tmp_path / "imagenet"
    for split in ("train", "val"):
        for index in range(1000):
            (root / split / f"n{index:08d}").mkdir(parents=True)
    return root


@pytest.fixture
def compose_cfg(tmp_path: Path) -> Iterator[Callable[..., DictConfig]]:
    """Compose ``conf/<config_name>.yaml`` with overrides, as ``@hydra.main`` would, outputs under tmp_path.

    HydraConfig is set so that ``${hydra:...}`` interpolations resolve, and cleared afterwards.
    """

    def _compose(config_name: str, overrides: list[str] | None = None) -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name, overrides=list(overrides or []), return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(tmp_path / "run")
            cfg.hydra.job.num = 0
        HydraConfig.instance().set_config(cfg)
        return cfg

    yield _compose
    GlobalHydra.instance().clear()
    HydraConfig.instance().cfg = None  # type: ignore[assignment]


def _data_overrides(fake_cifar10: Path, fake_imagenet: Path) -> tuple[list[str], list[str]]:
    """Overrides pointing data=cifar10 and data=imagenet at fake trees (only their layout is checked on build)."""
    return [f"data.data_dir={fake_cifar10}", "data.verify_integrity=false"], [f"data.data_dir={fake_imagenet}"]


def _build(cfg: DictConfig) -> pl.Trainer:
    """Instantiate everything ``train`` would, without fitting."""
    datamodule = instantiate(cfg.data)
    assert isinstance(datamodule, pl.LightningDataModule)
    module = instantiate(cfg.module)
    assert isinstance(module, ImageClassifier)
    optimizers = module.configure_optimizers()
    assert optimizers is not None
    callbacks = [instantiate(node) for node in cfg.callbacks.values()]
    loggers = [instantiate(node) for node in cfg.logger.values()]
    return instantiate(cfg.trainer, strategy=instantiate(cfg.strategy), callbacks=callbacks, logger=loggers)


@pytest.mark.parametrize("config_name", ["cifar10", "imagenet"])
def test_primary_config_instantiates(
    config_name: str, compose_cfg: Compose, fake_cifar10: Path, fake_imagenet: Path
) -> None:
    cifar, imagenet = _data_overrides(fake_cifar10, fake_imagenet)
    cfg = compose_cfg(config_name, cifar if config_name == "cifar10" else imagenet)
    trainer = _build(cfg)
    assert isinstance(trainer.strategy, EASGDStrategy)
    assert any(isinstance(cb, ElasticDistanceMonitor) for cb in trainer.callbacks)
    assert isinstance(trainer.checkpoint_callback, ModelCheckpoint)
    assert trainer.checkpoint_callback.monitor == "val/acc"


@pytest.mark.parametrize("name", experiments())
def test_experiment_composes_and_instantiates(
    name: str, compose_cfg: Compose, fake_cifar10: Path, fake_imagenet: Path
) -> None:
    config_name = name.split("_")[0]
    cifar, imagenet = _data_overrides(fake_cifar10, fake_imagenet)
    cfg = compose_cfg(config_name, [f"experiment={name}", *(cifar if config_name == "cifar10" else imagenet)])
    trainer = _build(cfg)
    if "msgd" in name.split("_"):
        assert isinstance(trainer.strategy, SingleDeviceStrategy)
        assert trainer.world_size == 1
    else:
        assert isinstance(trainer.strategy, EASGDStrategy)
        tuned = "center_momentum" in name or "local_sgd" in name
        assert trainer.strategy.beta == (1.0 if "local_sgd" in name else 0.9)
        assert trainer.strategy.tau == (16 if tuned else 10)
    if "_sweep" in name:
        assert cfg.hydra.sweeper.params, "sweep presets carry their sweep"
        if "msgd" not in name.split("_"):
            assert cfg.strategy.start_method != "popen", "multirun needs fork/spawn workers"


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("cifar10_paper_eamsgd_tau_sweep", {"strategy.tau": "1,4,16,64", "optimizer.lr": "0.01,0.005,0.001"}),
        ("cifar10_paper_easgd_tau_sweep", {"strategy.tau": "1,4,16,64", "optimizer.lr": "0.05,0.01,0.005"}),
        ("cifar10_paper_eamsgd_p_sweep", {"trainer.devices": "4,8,16", "optimizer.lr": "0.01,0.005,0.001"}),
        ("cifar10_paper_easgd_p_sweep", {"trainer.devices": "4,8,16", "optimizer.lr": "0.05,0.01,0.005"}),
        ("cifar10_paper_msgd_lr_sweep", {"optimizer.lr": "1.0e-3,5.0e-4,1.0e-4"}),
        ("imagenet_paper_eamsgd_p_sweep", {"trainer.devices": "4,8"}),
        ("imagenet_paper_easgd_p_sweep", {"trainer.devices": "4,8"}),
    ],
)
def test_sweeps_are_the_papers(name: str, params: dict[str, str], compose_cfg: Compose) -> None:
    cfg = compose_cfg(name.split("_")[0], [f"experiment={name}"])
    assert OmegaConf.to_container(cfg.hydra.sweeper.params) == params


def test_paper_hyperparameters(compose_cfg: Compose) -> None:
    eamsgd = compose_cfg("cifar10", ["experiment=cifar10_paper_eamsgd"])
    assert eamsgd.optimizer.momentum == 0.99 and eamsgd.optimizer.nesterov
    assert eamsgd.optimizer.weight_decay == 1e-4 and eamsgd.data.batch_size == 128
    assert eamsgd.data.preprocessing == "paper" and eamsgd.trainer.devices == 4
    assert "lr_scheduler" not in eamsgd or eamsgd.lr_scheduler is None  # constant learning rate
    easgd = compose_cfg("cifar10", ["experiment=cifar10_paper_easgd"])
    assert "momentum" not in easgd.optimizer and easgd.optimizer.lr == 0.05  # the best of the grid, tuned
    assert eamsgd.optimizer.lr == 0.01
    tuned = compose_cfg("cifar10", ["experiment=cifar10_eamsgd_center_momentum"])
    assert (tuned.strategy.tau, tuned.strategy.center_momentum, tuned.strategy.center_nesterov) == (16, 0.2, False)
    assert tuned.optimizer.lr == 0.01 and tuned.optimizer.momentum == 0.99 and tuned.strategy.beta == 0.9
    slow_network = compose_cfg("cifar10", ["experiment=cifar10_local_sgd"])
    assert (slow_network.strategy.worker_pull, slow_network.strategy.beta,
            slow_network.strategy.tau) == ("reset", 1, 16)
    assert slow_network.strategy.center_momentum == 0 and slow_network.optimizer.lr == 0.005
    assert slow_network.optimizer.momentum == 0.99 and slow_network.trainer.max_epochs == 80
    assert slow_network.lr_scheduler.scheduler.T_max == 80  # the cosine decays over the whole run
    assert (slow_network.strategy.sync_epochs, slow_network.strategy.sync_steps) == (5, 0)
    imagenet = compose_cfg("imagenet", ["experiment=imagenet_paper_easgd"])
    assert imagenet.optimizer.lr == 0.1 and imagenet.optimizer.weight_decay == 1e-5
    assert imagenet.data.resize == 256 and imagenet.data.crop_size == 221
    assert list(imagenet.lr_scheduler.scheduler.divisors) == [5.0, 2.0]
    assert imagenet.lr_scheduler.monitor == "train/loss_epoch"


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_train_runs_the_measured_slow_network_setting(compose_cfg: Compose) -> None:
    """`make train` is documented with the benchmark's numbers, so it must compose to the setting that was measured."""
    dry_run = subprocess.run(["make", "-n", "-C", str(REPO), "train"], capture_output=True, text=True, timeout=60,
                             check=True).stdout
    words = shlex.split(next(line for line in dry_run.replace("\\\n", " ").splitlines()
                             if "recipes/cifar10.py" in line))
    overrides = words[words.index("recipes/cifar10.py") + 1 :]
    cfg = compose_cfg("cifar10", overrides)
    assert (cfg.strategy.worker_pull, cfg.strategy.beta, cfg.strategy.tau) == ("reset", 1, 16)
    assert cfg.optimizer.lr == 0.005 and cfg.trainer.accelerator == "cpu" and cfg.trainer.devices == 4
    assert cfg.trainer.max_epochs == cfg.lr_scheduler.scheduler.T_max == 80
    assert cfg.data.data_dir == "../shared/data/cifar10" and cfg.data.num_workers == 0
    # The benchmark ran 490 synchronous steps: 5 epochs of 98, each rank's ⌈12,500 images / 128⌉ batches (the
    # distributed sampler deals each of the 4 ranks ⌈training images / 4⌉ of CIFAR-10's 50,000 less val_size).
    per_rank = math.ceil((50_000 - cfg.data.val_size) / cfg.trainer.devices)
    steps_per_epoch = math.ceil(per_rank / cfg.data.batch_size)
    assert cfg.strategy.sync_steps == 0 and steps_for_epochs(cfg.strategy.sync_epochs, steps_per_epoch) == 490


@pytest.mark.parametrize("group", ["model", "data", "optimizer", "lr_scheduler", "module"])
def test_every_option_of_the_model_side_groups_instantiates(
    group: str, compose_cfg: Compose, fake_cifar10: Path, fake_imagenet: Path
) -> None:
    cifar, imagenet = _data_overrides(fake_cifar10, fake_imagenet)
    for option in group_options(group):
        data = {"imagenet": imagenet, "synthetic": []}.get(option, cifar) if group == "data" else cifar
        cfg = compose_cfg("cifar10", [f"{group}={option}", *data])
        obj = instantiate(cfg[group])
        if group == "model":
            size = 221 if option == "paper_imagenet" else 28 if option == "paper_cifar10" else 32
            assert obj(torch.randn(2, 3, size, size)).shape == (2, cfg.data.num_classes)
        elif group == "data":
            assert isinstance(obj, pl.LightningDataModule)
        elif group == "optimizer":
            assert isinstance(obj([torch.nn.Parameter(torch.zeros(1))]), torch.optim.Optimizer)
        elif group == "lr_scheduler":
            assert isinstance(obj, LRSchedulerSpec)
            built = obj.build(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
            assert built["interval"] == "epoch"
            if option == "divide_on_plateau":
                assert isinstance(built["scheduler"], DivideOnPlateau)
        else:
            assert isinstance(obj, ImageClassifier)


@pytest.mark.parametrize("group", ["strategy", "trainer", "logger", "callbacks"])
def test_every_option_of_the_training_side_groups_instantiates(
    group: str, compose_cfg: Compose, fake_cifar10: Path, fake_imagenet: Path
) -> None:
    cifar, _ = _data_overrides(fake_cifar10, fake_imagenet)
    expected = {
        "easgd": EASGDStrategy,
        "eamsgd": EASGDStrategy,
        "easgd_async": AsyncEASGDStrategy,
        "eamsgd_async": AsyncEASGDStrategy,
        "ddp": DDPStrategy,
        "msgd": SingleDeviceStrategy,
        "local_sgd": EASGDStrategy,
        "slowmo": EASGDStrategy,
        "diloco": EASGDStrategy,
    }
    for option in group_options(group):
        cfg = compose_cfg("cifar10", [f"{group}={option}", *cifar])
        if group == "strategy":
            strategy = instantiate(cfg.strategy)
            assert type(strategy) is expected[option]
            has_monitor = "elastic_distance" in cfg.callbacks
            assert has_monitor == (option not in ("ddp", "msgd")), "distance monitor on exactly with EASGD"
            # The EASGD variants pick their local optimizer, msgd its momentum SGD; ddp keeps the recipe's.
            assert cfg.optimizer.get("nesterov", False) == (not option.startswith("easgd"))
        elif group == "trainer":
            if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
                continue  # composes (checked above); a GPU Trainer cannot be built on this machine
            trainer = instantiate(cfg.trainer, strategy=instantiate(cfg.strategy), logger=False)
            assert isinstance(trainer, pl.Trainer)
        else:
            objects = [instantiate(node) for node in cfg[group].values()]
            assert objects, f"{group}={option} is empty"


@pytest.mark.parametrize(
    ("preset", "beta", "momentum", "nesterov"),
    [("local_sgd", 1.0, 0.0, False), ("slowmo", 1.0, 0.2, False), ("diloco", 0.7, 0.9, True)],
)
def test_family_presets_compose(compose_cfg: Compose, preset: str, beta: float, momentum: float,
                                nesterov: bool) -> None:
    """strategy=local_sgd | slowmo | diloco: the reset rule with the published outer step, tau = 16; a synchronous
    start composes on top of any of them."""
    cfg = compose_cfg("cifar10", [f"strategy={preset}", "strategy.sync_steps=196"])
    strategy = instantiate(cfg.strategy)
    assert type(strategy) is EASGDStrategy
    assert (strategy.worker_pull, strategy.tau, strategy.beta) == ("reset", 16, beta)
    assert (strategy.center_momentum, strategy.center_nesterov) == (momentum, nesterov)
    assert (strategy.sync_steps, strategy.sync_epochs, strategy.warmup_steps) == (196, 0, 0)
    # The elastic presets keep the paper's pull.
    assert instantiate(compose_cfg("cifar10", ["strategy=eamsgd"]).strategy).worker_pull == "elastic"


def test_family_preset_refuses_a_bad_pull_readably(compose_cfg: Compose) -> None:
    cfg = compose_cfg("cifar10", ["strategy=local_sgd", "strategy.worker_pull=average"])
    with pytest.raises(InstantiationException, match=r"worker_pull='average' is invalid"):
        instantiate(cfg.strategy)


def test_eamsgd_local_optimizer_is_nesterov_099(compose_cfg: Compose) -> None:
    cfg = compose_cfg("cifar10", ["strategy=eamsgd"])
    optimizer = instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(1))])
    assert optimizer.defaults["momentum"] == 0.99 and optimizer.defaults["nesterov"]
    # An explicit optimizer choice on the command line wins over the strategy's default.
    cfg = compose_cfg("cifar10", ["strategy=eamsgd", "optimizer=sgd"])
    assert "momentum" not in cfg.optimizer


def test_unknown_model_names_the_group_and_the_options(compose_cfg: Compose) -> None:
    with pytest.raises(ConfigCompositionException) as error:
        compose_cfg("cifar10", ["model=resnet9000"])
    message = str(error.value)
    assert "model" in message and "resnet9000" in message and "paper_cifar10" in message


def test_negative_tau_names_the_parameter(compose_cfg: Compose) -> None:
    cfg = compose_cfg("cifar10", ["strategy.tau=-1"])
    with pytest.raises(InstantiationException, match="tau"):
        instantiate(cfg.strategy)


def test_missing_data_dir_says_which_layout_is_expected(compose_cfg: Compose, tmp_path: Path) -> None:
    cfg = compose_cfg("cifar10", [f"data.data_dir={tmp_path / 'nowhere'}"])
    with pytest.raises(InstantiationException, match="cifar-10-batches-py"):
        instantiate(cfg.data)
    cfg = compose_cfg("imagenet", [f"data.data_dir={tmp_path / 'nowhere'}"])
    with pytest.raises(InstantiationException, match=r"train/<class>/<image>"):
        instantiate(cfg.data)


def test_single_worker_strategy_refuses_several_devices(compose_cfg: Compose, fake_cifar10: Path) -> None:
    cifar, _ = _data_overrides(fake_cifar10, fake_cifar10)
    cfg = compose_cfg("cifar10", ["strategy=msgd", "trainer.devices=4", "logger=csv", *cifar])
    with pytest.raises(ValueError, match="trainer.devices=4"):
        train(cfg)


def test_unknown_test_ckpt_is_refused(compose_cfg: Compose) -> None:
    cfg = compose_cfg("cifar10", ["test_ckpt=middle"])
    with pytest.raises(ValueError, match="test_ckpt"):
        train(cfg)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["~callbacks.last_checkpoint", "~callbacks.last_checkpoint_steps"], "test_ckpt=last needs"),
        (["~callbacks.model_checkpoint", "test_ckpt=best"], "test_ckpt=best needs"),
    ],
)
def test_callbacks_that_cannot_write_the_tested_checkpoint_are_refused_before_fit(
    overrides: list[str], message: str, compose_cfg: Compose, fake_cifar10: Path
) -> None:
    cifar, _ = _data_overrides(fake_cifar10, fake_cifar10)
    cfg = compose_cfg("cifar10", ["strategy=msgd", "trainer=cpu", "logger=csv", *cifar, *overrides])
    with pytest.raises(TypeError, match=message):
        train(cfg)


def test_last_ckpt_is_written_by_monitorless_checkpoints_and_the_best_one_keeps_its_metric(
    compose_cfg: Compose, fake_cifar10: Path
) -> None:
    cifar, _ = _data_overrides(fake_cifar10, fake_cifar10)
    cfg = compose_cfg("cifar10", [*cifar, "callbacks.last_checkpoint_steps.every_n_train_steps=500"])
    trainer = _build(cfg)
    best = trainer.checkpoint_callback
    assert isinstance(best, ModelCheckpoint) and best.monitor == "val/acc" and not best.save_last
    lasts = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.filename == "last"]
    assert [(cb.monitor, cb.every_n_epochs, cb._every_n_train_steps) for cb in lasts] == [(None, 1, 0), (None, 0, 500)]
    assert {cb.dirpath for cb in trainer.checkpoint_callbacks} == {str(Path(cfg.paths.output_dir) / "checkpoints")}


def test_a_monitored_checkpoint_that_saves_last_is_warned_about(compose_cfg: Compose, fake_cifar10: Path) -> None:
    cifar, _ = _data_overrides(fake_cifar10, fake_cifar10)
    trainer = _build(compose_cfg("cifar10", [*cifar, "callbacks.model_checkpoint.save_last=true"]))
    with pytest.warns(UserWarning, match="monitoring 'val/acc' has save_last=True: Lightning rewrites its last.ckpt"):
        _check_checkpoints(trainer, "last")


@pytest.mark.parametrize(("momentum", "plain"), [("eamsgd", "easgd"), ("eamsgd_async", "easgd_async")])
def test_eamsgd_strategy_is_easgd_with_a_nesterov_optimizer(momentum: str, plain: str, compose_cfg: Compose) -> None:
    """The EAMSGD configs reuse the EASGD ones through Hydra's defaults: the same strategy, another optimizer."""
    eamsgd, easgd = compose_cfg("cifar10", [f"strategy={momentum}"]), compose_cfg("cifar10", [f"strategy={plain}"])
    assert eamsgd.strategy == easgd.strategy and eamsgd.callbacks == easgd.callbacks
    assert eamsgd.optimizer.nesterov and eamsgd.optimizer.momentum == 0.99 and "momentum" not in easgd.optimizer
@pytest.mark.parametrize(("sync", "asynchronous"), [("easgd", "easgd_async"), ("eamsgd", "eamsgd_async")])
def test_async_configs_have_every_key_of_the_sync_ones(sync: str, asynchronous: str, compose_cfg: Compose) -> None:
    """Overriding a sync-only key must reach AsyncEASGDStrategy's own refusal, not Hydra's "not in struct"."""
    keys = {name: set(OmegaConf.load(CONF_DIR / "strategy" / f"{name}.yaml")) - {"defaults"}
            for name in (sync, asynchronous)}
    assert keys[sync] <= keys[asynchronous], f"missing in {asynchronous}.yaml: {keys[sync] - keys[asynchronous]}"
    assert isinstance(instantiate(compose_cfg("cifar10", [f"strategy={asynchronous}"]).strategy), AsyncEASGDStrategy)
    cfg = compose_cfg("cifar10", [f"strategy={asynchronous}", "strategy.center_momentum=0.5"])
    with pytest.raises(InstantiationException, match=r"AsyncEASGDStrategy does not accept center_momentum=0\.5: the "
                       "asynchronous center"):
        instantiate(cfg.strategy)


@pytest.mark.parametrize("kept", [False, True], ids=["fresh-run-dir", "run-dir-with-checkpoints"])
def test_a_refused_run_removes_only_a_run_dir_holding_hydras_files(kept: bool, compose_cfg: Compose,
                                                                     tmp_path: Path) -> None:
    cfg = compose_cfg("cifar10", ["data=synthetic", "strategy.tau=0"])
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (run_dir / f"{cfg.hydra.job.name}.log").write_text("")
    if kept:  # a run being resumed: its checkpoints stay whatever the new attempt does
        (run_dir / "checkpoints").mkdir()
    with pytest.raises(InstantiationException, match="tau"):
        train(cfg)
    assert run_dir.exists() == kept


@pytest.mark.parametrize("devices", ["0", "-2", "'0'"])
def test_devices_below_one_are_refused_with_the_allowed_values(devices: str, compose_cfg: Compose) -> None:
    cfg = compose_cfg("cifar10", ["data=synthetic", f"trainer.devices={devices}"])
    with pytest.raises(ValueError, match=r"trainer.devices=.* is invalid: give the number of devices per node \(an "
                       r"integer >= 1; on CPU each is one worker process\), -1 or 'auto' for all of a node's GPUs"):
        train(cfg)
