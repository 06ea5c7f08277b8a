"""Every option is validated in one place: the same bad value gives the same message from every entry point.

Entry points: the Trainer strategy, the Fabric strategy, both through Hydra's ``instantiate`` (what the recipes do), and
for the exchange's own options the core (:class:`ExchangeConfig`, the averagers built with keyword arguments).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import hydra
import pytest
import torch

from lightning_easgd import AsyncEASGDStrategy, EASGDFabricStrategy, EASGDStrategy
from lightning_easgd.core import ElasticAverager, ExchangeConfig
from lightning_easgd.core.async_averager import AsyncElasticAverager

EXCHANGE_BAD = [
    {"tau": 0}, {"tau": 2.5}, {"tau": True}, {"warmup_steps": -1}, {"tau": 4, "warmup_steps": 10, "warmup_tau": 5},
    {"alpha": 1.0}, {"alpha": 0}, {"alpha": "0.1"}, {"beta": 2.0}, {"beta": float("nan")}, {"overlap": "yes"},
    {"bucket_cap_mb": 0}, {"bucket_cap_mb": True}, {"bucket_cap_mb": float("inf")}, {"on_nonfinite": "ignore"},
    {"center_device": "cuda"}, {"center_device": "cpu", "overlap": True}, {"exchange_dtype": "float16"},
    {"center_momentum": 1.0}, {"center_momentum": 0.5, "center_nesterov": "yes"}, {"per_tensor_distances": 1},
    {"worker_pull": "nearest"}, {"sync_steps": -1}, {"sync_epochs": 1.5}, {"sync_steps": True},
    {"sync_steps": 4, "sync_epochs": 1}, {"warmup_steps": 4, "sync_steps": 2},
]
"""Bad values of the exchange's options (ExchangeConfig), each paired with what else it needs to be refused."""
ADAPTER_BAD = [{"save_worker_states": 1}, {"start_method": "thread"}, {"ranks_per_worker": 0},
               {"ranks_per_worker": "gpu"}]
"""Bad values of options only the adapters have."""
NOT_IN_YAML = [{"timeout": 30}, {"timeout": timedelta(0)}]
"""Bad values Hydra's configs cannot hold (OmegaConf refuses the types before the strategy sees them)."""


def _message(build: Callable[[], object]) -> str:
    with pytest.raises(ValueError) as error:  # the message is compared by the callers
        build()
    return str(error.value)


def _hydra(target: str, bad: dict[str, Any]) -> Callable[[], object]:
    def build() -> object:
        try:
            return hydra.utils.instantiate({"_target_": target, **bad})
        except hydra.errors.InstantiationException as error:  # Hydra wraps what the constructor raised
            raise (error.__cause__ or error) from None  # type: ignore[misc]

    return build


ENTRY_POINTS: dict[str, Callable[[dict[str, Any]], Callable[[], object]]] = {
    "Trainer": lambda bad: lambda: EASGDStrategy(**bad),
    "Fabric": lambda bad: lambda: EASGDFabricStrategy(**bad),
    "Hydra (Trainer)": lambda bad: _hydra("lightning_easgd.EASGDStrategy", bad),
    "Hydra (Fabric)": lambda bad: _hydra("lightning_easgd.EASGDFabricStrategy", bad),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("bad", EXCHANGE_BAD + ADAPTER_BAD, ids=repr)
def test_one_message_from_every_entry_point(entry: str, bad: dict[str, Any]) -> None:
    reference = _message(lambda: EASGDStrategy(**bad))
    # The offending option comes last in each case (the others are what it needs to be refused).
    assert reference.startswith(f"{list(bad)[-1]}=") or f" {list(bad)[-1]}=" in reference, reference
    assert _message(ENTRY_POINTS[entry](bad)) == reference


@pytest.mark.parametrize("bad", EXCHANGE_BAD + NOT_IN_YAML, ids=repr)
def test_the_core_gives_the_strategies_message(bad: dict[str, Any]) -> None:
    reference = _message(lambda: EASGDStrategy(**bad))
    assert _message(lambda: ExchangeConfig(**bad)) == reference
    assert _message(lambda: ElasticAverager([("w", torch.zeros(3))], **bad)) == reference
    assert _message(lambda: EASGDFabricStrategy(**bad)) == reference


@pytest.mark.parametrize("bad", [b for b in EXCHANGE_BAD if not {"center_device", "exchange_dtype", "center_momentum"}
                                 & set(b)] + NOT_IN_YAML, ids=repr)
def test_the_asynchronous_strategy_gives_the_same_message(bad: dict[str, Any]) -> None:
    assert _message(lambda: AsyncEASGDStrategy(**bad)) == _message(lambda: EASGDStrategy(**bad))


def test_the_overlap_rule_has_one_remedy() -> None:
    messages = {_message(lambda: EASGDStrategy(center_device="cpu", overlap=True)),
                _message(lambda: EASGDFabricStrategy(center_device="cpu", overlap=True)),
                _message(lambda: ElasticAverager([("w", torch.zeros(3))], center_device="cpu", overlap=True))}
    assert len(messages) == 1 and "leave overlap unset (False with center_device='cpu')" in messages.pop()


def test_config_normalises_once() -> None:
    config = ExchangeConfig(tau=4, warmup_steps=6, warmup_tau=2, exchange_dtype="bfloat16", center_device="cpu",
                            bucket_cap_mb=3)
    assert config.exchange_dtype is torch.bfloat16 and config.center_device == torch.device("cpu")
    assert config.overlap is False and config.bucket_cap_mb == 3.0 and isinstance(config.bucket_cap_mb, float)
    assert [t for t in range(12) if config.schedule.due(t)] == [2, 4, 8]
    assert ExchangeConfig().overlap is True
    with pytest.raises(AttributeError):
        config.tau = 5  # type: ignore[misc]  # frozen: an option cannot change behind the averager's back
    assert ExchangeConfig.from_options({"tau": 3, "start_method": "fork", "self": None}) == ExchangeConfig(tau=3)
    assert config.moving_rate(3) == pytest.approx(0.3) and ExchangeConfig(alpha=0.2).moving_rate(3) == 0.2


def test_averagers_take_the_config_whole() -> None:
    config = ExchangeConfig(tau=3, alpha=0.25, on_nonfinite="reset", per_tensor_distances=True)
    averager = ElasticAverager([("w", torch.zeros(3))], config)
    assert averager.config is config and (averager.tau, averager.alpha, averager.on_nonfinite) == (3, 0.25, "reset")
    with pytest.raises(TypeError, match="either as one ExchangeConfig or as keyword arguments, not both; got config "
                                        "and tau"):
        ElasticAverager([("w", torch.zeros(3))], config, tau=2)
    with pytest.raises(TypeError, match="ElasticAverager got unexpected keyword argument.*: taux"):
        ElasticAverager([("w", torch.zeros(3))], taux=2)
    with pytest.raises(ValueError, match=r"AsyncElasticAverager does not support center_momentum=0.5: "):
        AsyncElasticAverager([("w", torch.zeros(3))], ExchangeConfig(center_momentum=0.5))


@pytest.mark.parametrize(("name", "value"), [("center_device", "cpu"), ("exchange_dtype", "bfloat16"),
                                             ("center_momentum", 0.5), ("worker_pull", "reset"), ("sync_steps", 3),
                                             ("sync_epochs", 1)])
def test_the_asynchronous_averager_refuses_what_it_does_not_implement(name: str, value: object) -> None:
    """Every ExchangeConfig field only the synchronous averager implements is refused, not ignored."""
    config = ExchangeConfig(**{name: value})
    with pytest.raises(ValueError, match=rf"AsyncElasticAverager does not support {name}=.*; use the synchronous "
                                         "averager"):
        AsyncElasticAverager([("w", torch.zeros(3))], config)


@pytest.mark.parametrize("strategy", [EASGDStrategy, EASGDFabricStrategy, AsyncEASGDStrategy])
def test_every_option_is_a_constructor_argument_and_an_attribute(strategy: type) -> None:
    """Adding a field to ExchangeConfig is the whole change: each strategy forwards it (its ``locals()``) and
    exposes it; this fails if a strategy's signature misses one."""
    names = ExchangeConfig.option_names()
    signature = inspect.signature(strategy.__init__).parameters
    missing = [n for n in names if n not in signature and strategy is not AsyncEASGDStrategy]
    assert not missing, f"{strategy.__name__} does not take {missing}"
    instance = strategy(tau=3, warmup_steps=4, warmup_tau=1, beta=0.8, bucket_cap_mb=7, on_nonfinite="reset",
                        timeout=timedelta(seconds=9), per_tensor_distances=True)
    for name in names:
        assert getattr(instance, name) == getattr(instance.config, name), name
    assert (instance.tau, instance.beta, instance.bucket_cap_mb, instance.per_tensor_distances) == (3, 0.8, 7.0, True)
    assert instance.config.timeout == timedelta(seconds=9)


def test_options_cannot_drift_from_the_config() -> None:
    strategy = EASGDStrategy(tau=3)
    with pytest.raises(AttributeError, match=r"EASGDStrategy.tau is read-only: .* pass tau=... to the constructor"):
        strategy.tau = 5
    assert strategy.tau == strategy.config.tau == 3
