"""The elastic family in one exchange: the workers' pull rule, a synchronous start, and their checks.

Two options turn synchronous EASGD into its best-known relatives without a second code path:

``worker_pull="reset"``: at an exchange every worker lands on the new center plus its own update of this step,
x_i ← x̃_new + (x_i' − x_i), instead of being pulled by α·d_i. The center still takes s = α·Σ_i d_i (α = β/p) through
the center momentum, so β is the outer learning rate and the workers' drift d_i the outer "gradient":

    periodic averaging (local SGD)   reset, β = 1, μ = 0
    SlowMo (Wang et al., ICLR 2020)  reset, heavy-ball μ
    DiLoCo (Douillard et al. 2023)   reset, Nesterov μ = 0.9, β = 0.7

``sync_steps=N``: optimizer steps t < N average the gradients over all workers (DDP's rule; post-local SGD, Lin et
al., ICLR 2020), so the workers stay identical and the center follows them; exchanges then start at t = N + τ.

Stability of the reset rule (docs/family.md derives it). When the workers' local steps bring them from the center to
x̃ + c·(x* − x̃) in one period (c ∈ (0, 1]; c = 1 when they reach the minimum x*), the outer step sees
s = −β·c·e with e = x̃ − x*: the center's iteration of :mod:`~lightning_easgd.core.center_momentum` with βc in
place of β. It is stable for every such c iff β is below the same bound, 2·(1 + μ) (heavy ball; 2 at μ = 0) and
2·(1 + μ)/(1 + 2μ) (Nesterov). The bound is that worst case, not a guarantee: with short periods the outer
momentum multiplies the local learning rate by about β/(1 − μ) (SlowMo's effective rate), which the local optimizer
must tolerate too.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_easgd.core.center_momentum import CenterMomentum, center_momentum_bound

WorkerPull = Literal["elastic", "reset"]
WORKER_PULLS: tuple[WorkerPull, ...] = ("elastic", "reset")


def validate_worker_pull(worker_pull: object) -> WorkerPull:
    """Return ``worker_pull``, or raise unless it is "elastic" (the paper's pull) or "reset"."""
    if worker_pull not in WORKER_PULLS:
        raise ValueError(
            f"worker_pull={worker_pull!r} is invalid: choose 'elastic' (the paper's pull x_i -= alpha*d_i) or "
            "'reset' (workers land on the new center plus their own update: local SGD, SlowMo, DiLoCo)"
        )
    return worker_pull  # type: ignore[return-value]


def validate_steps(value: object, name: str, unit: str) -> int:
    """Return ``value`` as an int, or raise unless it is a whole number ≥ 0 (``name`` and ``unit`` for the message)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name}={value!r} is invalid: it must be an integer >= 0 ({unit}; 0 = no synchronous start)")
    return int(value)


def check_sync_start(sync_steps: int, sync_epochs: int, warmup_steps: int) -> None:
    """Refuse a synchronous start given in both units, or together with a warm-up (the values are checked ints).

    Raises:
        ValueError: for both options given, or either with a warm-up: a warm-up and a synchronous start both
            communicate more at the beginning, and composing them would leave open whether ``warmup_steps`` counts
            from step 0 or from the hand-over.
    """
    if sync_steps and sync_epochs:
        raise ValueError(
            f"sync_steps={sync_steps} and sync_epochs={sync_epochs} were both given: the synchronous start has one "
            "length; pass one of them"
        )
    if (sync_steps or sync_epochs) and warmup_steps:
        given = f"sync_steps={sync_steps}" if sync_steps else f"sync_epochs={sync_epochs}"
        raise ValueError(
            f"{given} cannot be combined with warmup_steps={warmup_steps}: both make the start communicate more "
            "(the synchronous start every step, the warm-up every warmup_tau steps), and composed it would be "
            "ambiguous whether the warm-up counts from step 0 or from the hand-over; use one of them"
        )


def steps_for_epochs(sync_epochs: int, steps_per_epoch: int) -> int:
    """The synchronous start in optimizer steps: ``sync_epochs`` epochs of ``steps_per_epoch`` steps each."""
    if steps_per_epoch < 1:
        raise ValueError(
            f"sync_epochs={sync_epochs} needs the number of optimizer steps per epoch, but it is {steps_per_epoch}; "
            "pass sync_steps instead"
        )
    return sync_epochs * steps_per_epoch


def reset_beta_bound(momentum: float, nesterov: bool) -> float:
    """The largest β (exclusive) for which ``worker_pull="reset"`` is stable with center momentum μ (module doc)."""
    return center_momentum_bound(momentum, nesterov) if momentum > 0.0 else 2.0


def check_reset_beta(beta: float, momentum: float, nesterov: bool) -> None:
    """Refuse a β = p·α (the outer learning rate) at or beyond :func:`reset_beta_bound`.

    With the reset rule a β above 1 is a choice (an outer learning rate above 1), not the elastic rule's overshoot
    of the workers' mean, so it is not warned about.

    Raises:
        ValueError: naming β, μ, the form and the bound.
    """
    bound = reset_beta_bound(momentum, nesterov)
    if not 0.0 < beta < bound:
        form = ("Nesterov" if nesterov else "heavy-ball") if momentum > 0.0 else "no"
        formula = ("2*(1 + mu)/(1 + 2*mu)" if nesterov else "2*(1 + mu)") if momentum > 0.0 else "2"
        raise ValueError(
            f"beta = p*alpha = {beta:g} (the outer learning rate of worker_pull='reset') with {form} center "
            f"momentum (center_momentum={momentum:g}) is unstable: the outer step diverges unless 0 < beta < "
            f"{formula} = {bound:g}; lower beta (or alpha)"
        )


def subtract_center_step(diffs: list[Tensor], sums: list[Tensor], alpha: float,
                         momentum: CenterMomentum | None) -> None:
    """``diffs −= x̃_new − x̃_old``, the step the center just took from ``sums`` (Σ_i d_i): α·Σ_i d_i, the velocity
    v (heavy ball) or μ·v + α·Σ_i d_i (Nesterov). Turns d_i into what the reset rule subtracts from the updated
    worker. ``sums`` may be ``diffs`` itself (one worker): the Σ-term is subtracted first, while it is still intact."""
    if momentum is None or momentum.nesterov:
        torch._foreach_add_(diffs, sums, alpha=-alpha)
    if momentum is not None:
        torch._foreach_add_(diffs, momentum.velocity, alpha=-momentum.momentum if momentum.nesterov else -1.0)


class GradientAverage:
    """The synchronous phase's collective: the gradients and floating-point buffers averaged over all workers.

    Gradients are averaged as DDP averages them (a SUM all-reduce divided by the number of workers). Buffers (e.g.
    BatchNorm's running statistics, updated by each worker's forward pass) are averaged too, so that every worker
    holds the same values after the step: for running means that is the running mean of the workers' batch means.
    A parameter that requires a gradient but has none on this worker counts as a zero gradient (every worker must
    send the same tensors). The tensors travel in one flat buffer per dtype, allocated for the call: one transient
    copy of the gradients and buffers.

    With worker groups of k ranks (whose DDP has already averaged the gradients inside the worker, so its ranks hold
    the same values), rank j all-reduces only slice j of each flat buffer with rank j of the other workers (its column)
    and the worker then all-gathers the averaged slices, as the exchange does with d_i: each rank sends 1/k of the
    gradients across workers.

    Args:
        buffers: the floating-point buffers to average (the exchange's tensors that are not parameters).
        group: the workers' process group (the column group with worker groups).
        world_size: the number of workers in ``group``.
        wait: waits on the started collectives (the exchange's, which turns failures into its errors).
        ranks_per_worker, rank_in_worker: k and this rank's j in its worker.
        gather: starts the all-gather of the slices inside the worker, ``gather(output, input)`` (needed for k > 1).
    """

    def __init__(self, buffers: Sequence[Tensor], group: dist.ProcessGroup | None, world_size: int,
                 wait: Callable[[list[dist.Work]], None], ranks_per_worker: int = 1, rank_in_worker: int = 0,
                 gather: Callable[[Tensor, Tensor], dist.Work] | None = None) -> None:
        if ranks_per_worker > 1 and gather is None:
            raise ValueError("GradientAverage with ranks_per_worker > 1 needs the worker's all-gather (gather=...)")
        self.buffers = list(buffers)
        self.group = group
        self.world_size = world_size
        self.ranks_per_worker = ranks_per_worker
        self.rank_in_worker = rank_in_worker
        self._wait = wait
        self._gather = gather

    def __call__(self, parameters: Sequence[Tensor]) -> None:
        """Average the gradients of ``parameters`` (those that require one) and the buffers, in place."""
        params = [p for p in parameters if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.world_size < 2:
            return
        groups = self._by_dtype([p.grad for p in params] + self.buffers)  # type: ignore[misc]
        k, j = self.ranks_per_worker, self.rank_in_worker
        with torch.no_grad():
            flats, slices = [], []
            for tensors in groups:
                n = sum(t.numel() for t in tensors)
                size = -(-n // k)  # padded to k equal slices
                flat = torch.empty(size * k, dtype=tensors[0].dtype, device=tensors[0].device)
                torch.cat([t.reshape(-1) for t in tensors], out=flat[:n])
                flat[n:].zero_()
                flats.append(flat)
                slices.append(flat[j * size : (j + 1) * size])
            self._wait([dist.all_reduce(part, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
                        for part in slices])
            for flat, part in zip(flats, slices):
                part.div_(self.world_size)
                if k > 1:
                    assert self._gather is not None
                    self._wait([self._gather(flat, part.clone())])
            for flat, tensors in zip(flats, groups):
                values = flat[: sum(t.numel() for t in tensors)].split([t.numel() for t in tensors])
                torch._foreach_copy_(tensors, [v.view_as(t) for v, t in zip(values, tensors)])

    def nbytes(self, parameters: Sequence[Tensor]) -> int:
        """Bytes each rank sends into the workers' all-reduce of one call with ``parameters`` (0 without peers; 1/k of
        the gradients and buffers with worker groups, as :attr:`ElasticAverager.bytes_per_exchange` counts)."""
        if self.world_size < 2:
            return 0
        groups = self._by_dtype([p for p in parameters if p.requires_grad] + self.buffers)
        k = self.ranks_per_worker
        return sum(-(-sum(t.numel() for t in ts) // k) * ts[0].element_size() for ts in groups)

    @staticmethod
    def _by_dtype(tensors: list[Tensor]) -> list[list[Tensor]]:
        """``tensors`` grouped by dtype and device, in first-seen order (one flat buffer each)."""
        groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for t in tensors:
            groups.setdefault((t.dtype, t.device), []).append(t)
        return list(groups.values())
