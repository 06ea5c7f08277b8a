"""The bfloat16 exchange's error benchmark: the sum is rounded like a ring all-reduce's, and the errors are of the
size bfloat16's 8-bit significand allows."""

from __future__ import annotations

import pytest
import torch

from benchmarks.bf16_exchange_error import main, relative_errors, ring_sum_bf16


def test_ring_sum_rounds_inputs_and_every_partial_sum() -> None:
    # 256 + 1 is not a bfloat16 (spacing 2 there): each partial sum rounds back to 256 (ties to even).
    diffs = torch.tensor([[256.0], [1.0], [1.0], [1.0]])
    assert ring_sum_bf16(diffs).tolist() == [256.0]
    assert ring_sum_bf16(diffs[1:]).tolist() == [3.0]  # small sums stay exact


@pytest.mark.parametrize("kind", ["independent", "shared"])
def test_errors_are_of_bfloat16_size_and_grow_with_p(kind: str) -> None:
    two, inputs_two = relative_errors(2, 20_000, kind)
    many, _ = relative_errors(32, 20_000, kind)
    assert 2**-12 < inputs_two <= two < 2**-7 and two < many < 2**-5


def test_cli_prints_one_row_per_p(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--workers", "2", "4", "--numel", "1000"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == 4 and rows[2].startswith("| 2 | ") and rows[3].startswith("| 4 | ")
    with pytest.raises(SystemExit):
        main(["--workers", "1"])
