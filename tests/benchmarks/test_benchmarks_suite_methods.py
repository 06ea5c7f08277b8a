"""The accuracy suite's methods with center momentum and warm-up (moved from tests/trainer/test_center_momentum.py):
a method string composes into the recipe's config and instantiates the strategy it names; bad method strings say
what is allowed; the suite's claims are checked on the whole EASGD family."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from benchmarks import accuracy
from lightning_easgd import AsyncEASGDStrategy, EASGDStrategy

REPO = Path(__file__).resolve().parents[2]


def _compose(overrides: list[str]) -> Any:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("cifar10", overrides=overrides)


@pytest.mark.parametrize(
    ("text", "fields", "strategy", "target"),
    [
        ("eamsgd:16:cm0.5", {"tau": 16, "center_momentum": 0.5},
         {"tau": 16, "center_momentum": 0.5, "center_nesterov": False, "warmup_steps": 0}, EASGDStrategy),
        ("eamsgd:16:cn0.9:warm500:lr0.01:seed1",
         {"tau": 16, "center_momentum": 0.9, "center_nesterov": True, "warmup_steps": 500, "lr": 0.01, "seed": 1},
         {"tau": 16, "center_momentum": 0.9, "center_nesterov": True, "warmup_steps": 500, "warmup_tau": 1},
         EASGDStrategy),
        ("easgd:16:lr0.05", {"tau": 16, "lr": 0.05}, {"tau": 16, "center_momentum": 0.0}, EASGDStrategy),
        ("eamsgd_async:8:warm100", {"tau": 8, "warmup_steps": 100}, {"tau": 8, "warmup_steps": 100},
         AsyncEASGDStrategy),
    ],
)
def test_suite_methods_compose_and_instantiate(text: str, fields: dict[str, Any], strategy: dict[str, Any],
                                               target: type) -> None:
    method = accuracy.Method.parse(text)
    assert method == accuracy.Method(method.name, **fields)
    assert method.label == text and accuracy.Method.parse(method.label) == method
    command = accuracy.recipe_command(method, processes=4, epochs=1, evals_per_epoch=1, batch_size=64,
                                      data_dir=Path("/data/cifar10"), run_dir=Path("/tmp/run"), extra=[])
    cfg = _compose([arg for arg in command[2:] if not arg.startswith("hydra.")])
    assert cfg.optimizer.lr == fields.get("lr", 0.05 if method.name == "easgd" else 0.01)
    assert cfg.seed == fields.get("seed", 0)
    built = instantiate(cfg.strategy)
    assert isinstance(built, target)
    for key, value in strategy.items():
        assert getattr(built, key) == value, key


def test_ddp_and_msgd_take_the_shared_options() -> None:
    assert accuracy.Method.parse("ddp:lr0.01:seed1").overrides()[-2:] == ["optimizer.lr=0.01", "seed=1"]
    assert accuracy.Method.parse("msgd:lr0.0005").label == "msgd:lr0.0005"


@pytest.mark.parametrize(
    "text",
    ["eamsgd:16:cm1", "eamsgd:16:cm0", "eamsgd_async:8:cm0.5", "ddp:16", "ddp:cm0.5", "eamsgd:cm0.5",
     "eamsgd:16:cm0.5:cn0.3", "average:16:warm5", "eamsgd:16:warm0", "eamsgd:16:lrx", "eamsgd:16:lr0",
     "eamsgd:16:foo", "eamsgd:16:seed-1", "eamsgd:16:lr0.01:lr0.02", "eamsgd:16:"],
)
def test_bad_options_are_refused_with_what_is_allowed(text: str) -> None:
    with pytest.raises(ValueError, match=r"method=.* is invalid: use msgd, ddp, or average:TAU.* options :OPTION.*"
                                         r"lrETA, seedN, cmMU or cnMU \(easgd, eamsgd, localsgd, slowmo, diloco; "
                                         r"0 < MU < 1\), warmW"):
        accuracy.Method.parse(text)


def _row(method: str, error: float, at_budget: float, sent_mb: float) -> dict[str, Any]:
    return {"rate_mbit": "100", "method": method, "epochs": 8, "test_error_after_epochs": error,
            "error_at_budget": at_budget, "sent_mb_per_worker": sent_mb, "seconds_to_ddp_error": math.nan}


def test_claims_check_the_issue_targets_on_the_whole_family() -> None:
    rows = [_row("ddp", 41.4, 60.0, 1000.0), _row("average:16", 43.5, 50.0, 60.0), _row("eamsgd:16", 44.2, 52.0, 60.0),
            _row("eamsgd:16:cm0.5", 42.0, 48.0, 60.0), _row("eamsgd:4:cm0.5", 41.0, 47.0, 240.0)]
    lines = accuracy.claims(rows)
    # The presets' claim sees eamsgd:16 only (not its momentum variant under the same tau).
    assert "EAMSGD τ=16 52.00% vs best baseline average:16 50.00%" in lines[0]
    assert ("best EASGD-family setting with τ >= 16 within 1 point of DDP after 8 epochs, sending >= 16x fewer "
            "bytes: holds (eamsgd:16:cm0.5 42.00% vs ddp 41.40%, +0.60 points, 16.7x fewer bytes)") in lines[1]
    assert ("beats DDP and periodic averaging at the budget: holds (eamsgd:16:cm0.5 48.00% vs average:16 50.00%)"
            in lines[2])
    rows[3] = _row("eamsgd:16:cm0.5", 42.5, 51.0, 60.0)
    lines = accuracy.claims(rows)
    assert "does not hold (eamsgd:16:cm0.5 42.50% vs ddp 41.40%, +1.10 points" in lines[1]
    assert "at the budget: does not hold (eamsgd:16:cm0.5 51.00% vs average:16 50.00%)" in lines[2]
