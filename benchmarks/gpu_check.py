"""The device check: one command that proves lightning-easgd's GPU paths and measures them in a short device window.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 -m benchmarks.gpu_check            # budget 480 s, results to $OUT
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 -m benchmarks.gpu_check --only a_fake_world d_exchange_memory

It runs from a plain checkout on the device's own stack (torch, lightning; no install step, no hydra) and refuses,
in one line on stderr with exit status 2, where no CUDA device is visible or torch is older than it supports.

Two parts, each step a subprocess in its own process group, bounded by what is left of ``--budget``:

- Correctness: the checks in ``tests/gpu/device_checks.py`` and the other ``cuda``-marked tests (``tests/gpu``,
  the asynchronous staging), through pytest with a JUnit report per step where pytest is importable; where it is
  not, the device checks run directly (same functions) and the pytest-only tests are SKIPped, saying so.
- Measurements (this file): (d) the device memory the exchange adds with the center in host memory, two workers
  in one process with real (1-rank) NCCL all-reduces paired between them, at most 8 GiB of pinned host memory;
  (e) step time of ResNet-50 with an exchange every τ = 1, 4, 16 steps against none.

A step that does not fit in what is left of the budget is SKIPped with the reason; one that runs out of its time
is killed with its whole process group and reported as FAIL. The CSV and JSON results are rewritten after every
step in ``--out`` (default: ``$OUT`` when set, else ``runs/gpu_check/<date>``), so a window cut short still brings
back everything that finished. Exit status 1 if any step failed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import torch
import torch.distributed as dist
from torch import Tensor, nn

from benchmarks.procs import run_bounded, write_csv

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "gpu"))  # the correctness checks, importable as `device_checks`
import device_checks  # noqa: E402

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
MIN_TORCH = (2, 11)
"""Oldest torch the check runs on (the lower bound in pyproject.toml; docs/gpu.md says what is tested where)."""
DEFAULT_BUDGET = 480.0
METRICS_ENV = "EASGD_GPU_CHECK_METRICS"
"""Where ``tests/gpu/test_device_checks.py`` writes each check's metrics (a folder), so pytest runs report them."""


@dataclass(frozen=True)
class Sizes:
    """How big the measurements run: :data:`FULL` on the GPU, :data:`TINY` for the CPU tests of this script."""

    d_parameters: int = 330_000_000  # per worker: 2 workers x (center, d_i, sum) x 1.32 GB = 7.4 GiB pinned
    d_tensor_numel: int = 25_000_000
    e_model: str = "resnet50"
    e_batch: int = 64
    e_warmup: int = 10
    e_steps: int = 48
    e_rounds: int = 2
    e_taus: tuple[int, ...] = (1, 4, 16)


FULL = Sizes()
TINY = Sizes(d_parameters=20_000, d_tensor_numel=5_000, e_model="mlp", e_batch=8, e_warmup=1, e_steps=4, e_rounds=1,
             e_taus=(1, 4))
SIZES = {"full": (FULL, device_checks.FULL), "tiny": (TINY, device_checks.TINY)}
PINNED_LIMIT = 8 << 30
"""Most host memory check (d) may pin."""

OVERHEAD_LIMITS = {1: 1.20, 4: 1.10, 16: 1.05}
"""Largest step-time ratio (exchange every τ steps / no exchange) that passes check (e), per τ."""


@dataclass
class Result:
    """One step's outcome: ``status`` is PASS, FAIL or SKIP; ``detail`` says why in one line."""

    check: str
    status: str
    detail: str
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------------- (d)


def check_exchange_memory(device: torch.device, sizes: Sizes = FULL) -> Result:
    """Peak device memory the exchange adds with the center in host memory: two workers (threads, paired 1-rank
    all-reduces) of ``d_parameters`` each, two exchanges."""
    from lightning_easgd.core import ElasticAverager

    device = device_checks.indexed(device)
    n, chunk = sizes.d_parameters, sizes.d_tensor_numel
    models = [[torch.zeros(min(chunk, n - i), device=device) for i in range(0, n, chunk)] for _ in range(2)]
    model_bytes = sum(t.numel() * t.element_size() for t in models[0])
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    errors: list[BaseException] = []
    with device_checks.single_process_group(device):
        groups = [dist.new_group([0]), dist.new_group([0])]
        with device_checks.FakeTwoRanks(groups) as fake:
            averagers = [ElasticAverager([(f"t{i}", t) for i, t in enumerate(tensors)], tau=1, alpha=0.5,
                                         group=group, center_device="cpu") for tensors, group in zip(models, groups)]

            def worker(r: int) -> None:
                try:
                    for _ in range(3):  # exchanges at steps 1 and 2
                        with averagers[r].step(), torch.no_grad():
                            torch._foreach_add_(models[r], 1e-3 * (r + 1))
                except BaseException as error:  # noqa: BLE001 - re-raised by the main thread
                    errors.append(error)
                    fake.abort()

            threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    if errors:
        raise errors[0]
    bucket = max(b.numel * torch.empty((), dtype=b.dtype).element_size() for b in averagers[0].layout.buckets)
    pinned = sum(a.buffer_bytes - a.device_buffer_bytes for a in averagers)
    metrics: dict[str, Any] = {"parameters_per_worker": n, "model_bytes": model_bytes, "bucket_bytes": bucket,
                               "buckets": len(averagers[0].layout.buckets),
                               "host_buffer_bytes": pinned, "all_reduces_paired": fake.paired,
                               "device_buffer_bytes": averagers[0].device_buffer_bytes}
    problems = []
    if fake.paired == 0:
        problems.append("no all-reduce ran")
    if pinned > PINNED_LIMIT:
        problems.append(f"{pinned / 2**30:.2f} GiB of host buffers, more than the {PINNED_LIMIT / 2**30:g} GiB allowed")
    text = (f"2 workers x {model_bytes / 2**30:.2f} GiB, host buffers {pinned / 2**30:.2f} GiB, "
            f"{fake.paired} all-reduces")
    if cuda:
        torch.cuda.synchronize(device)
        extra = torch.cuda.max_memory_allocated(device) - base  # base: after both models were allocated
        metrics["peak_extra_bytes"] = extra
        metrics["peak_extra_over_model"] = extra / model_bytes
        limit = 2 * (2 * bucket) + (64 << 20)  # per worker: its staging bucket, plus as much slack; 64 MiB overall
        text += f"; peak exchange memory {extra / 2**20:.0f} MiB = {extra / model_bytes:.3f} x one model"
        if extra > limit:
            problems.append(f"the exchange added {extra / 2**20:.0f} MiB on the device, more than 2 buckets per "
                            f"worker + 64 MiB ({limit / 2**20:.0f} MiB)")
    else:
        text += "; device memory is measured on CUDA only"
    return Result("d_exchange_memory", FAIL if problems else PASS, "; ".join(problems) or text, metrics)


# ---------------------------------------------------------------------------------------------------- (e)


def _overhead_model(name: str) -> tuple[nn.Module, Callable[[int, torch.device], tuple[Tensor, Tensor]]]:
    if name == "resnet50":
        import torchvision

        def batch(size: int, device: torch.device) -> tuple[Tensor, Tensor]:
            return torch.randn(size, 3, 224, 224, device=device), torch.randint(0, 1000, (size,), device=device)

        return torchvision.models.resnet50(weights=None), batch
    if name == "mlp":
        def small(size: int, device: torch.device) -> tuple[Tensor, Tensor]:
            return torch.randn(size, 32, device=device), torch.randint(0, 10, (size,), device=device)

        return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)), small
    raise ValueError(f"model={name!r} is invalid: choose 'resnet50' or 'mlp'")


def overhead_verdict(ratios: dict[int, float]) -> tuple[str, str]:
    """PASS when every τ's step-time ratio is within :data:`OVERHEAD_LIMITS` (τ without a limit: that of the
    nearest smaller τ that has one)."""
    over = []
    for tau, ratio in sorted(ratios.items()):
        limit = OVERHEAD_LIMITS[max([t for t in OVERHEAD_LIMITS if t <= tau], default=min(OVERHEAD_LIMITS))]
        if ratio > limit:
            over.append(f"tau={tau}: {ratio:.3f} > {limit:.2f}")
    text = ", ".join(f"tau={t}: {r:.3f}" for t, r in sorted(ratios.items()))
    return (FAIL, f"step-time ratios {text}; too slow at {'; '.join(over)}") if over else \
        (PASS, f"step-time ratios vs no exchange: {text}")


def check_resnet_overhead(device: torch.device, sizes: Sizes = FULL) -> Result:
    """Step time with an exchange every τ steps against none (one rank: device work and host waits only)."""
    from lightning_easgd.core import ElasticAverager

    torch.manual_seed(0)
    model, make_batch = _overhead_model(sizes.e_model)
    model = model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = make_batch(sizes.e_batch, device)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def one_step(averager: Any) -> None:
        with averager.step() if averager is not None else contextlib.nullcontext():
            opt.zero_grad(set_to_none=False)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    for _ in range(sizes.e_warmup):  # first-use costs (allocator, cuDNN autotuning) before any timing
        one_step(None)
    configs: list[int | None] = [None, *sizes.e_taus]
    times: dict[int | None, list[float]] = {c: [] for c in configs}
    for round_ in range(sizes.e_rounds):
        for tau in configs if round_ % 2 == 0 else reversed(configs):
            averager = None if tau is None else ElasticAverager(list(model.named_parameters()), tau=tau, alpha=0.5)
            for _ in range(sizes.e_warmup):
                one_step(averager)
            sync()
            start = time.perf_counter()
            for _ in range(sizes.e_steps):
                one_step(averager)
            sync()
            times[tau].append((time.perf_counter() - start) / sizes.e_steps)
    base = statistics.median(times[None])
    ratios = {tau: statistics.median(times[tau]) / base for tau in sizes.e_taus}
    metrics: dict[str, Any] = {"model": sizes.e_model, "batch": sizes.e_batch, "seconds_per_step_none": base,
                               **{f"ratio_tau{t}": r for t, r in ratios.items()}}
    status, text = overhead_verdict(ratios)
    return Result("e_resnet50_overhead", status, f"{sizes.e_model}, batch {sizes.e_batch}: {text}", metrics)


MEASUREMENTS: dict[str, Callable[[torch.device, Sizes], Result]] = {
    "d_exchange_memory": check_exchange_memory,
    "e_resnet50_overhead": check_resnet_overhead,
}


# ---------------------------------------------------------------------------------------------------- one step


def run_check(name: str, device: torch.device, size: str = "full") -> Result:
    """Run one correctness check or measurement in this process; an exception is a FAIL that names it."""
    sizes, check_sizes = SIZES[size]
    start = time.perf_counter()
    try:
        if name in MEASUREMENTS:
            result = MEASUREMENTS[name](device, sizes)
        else:
            detail, metrics = device_checks.CHECKS[name](device, check_sizes)
            result = Result(name, PASS, detail, metrics)
    except device_checks.CheckFailed as failed:
        result = Result(name, FAIL, failed.detail, failed.metrics)
    except Exception as error:  # noqa: BLE001 - every failure is reported, not raised
        result = Result(name, FAIL, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
    result.seconds = time.perf_counter() - start
    return result


@dataclass(frozen=True)
class Step:
    """One bounded subprocess of the plan: ``need`` seconds it is expected to take at most on the device (a step
    that does not fit in what is left is skipped), ``cap`` seconds it may take."""

    name: str
    command: list[str]
    need: float
    cap: float
    junit: Path | None = None  # a pytest step's report
    skip: str | None = None  # why this step cannot run here (reported as SKIP without running)


NEEDS: dict[str, tuple[float, float]] = {  # name: (need, cap) in seconds on one H100, start-up included
    "a_fake_world": (20, 90),
    "gpu_tests": (25, 90),
    "async_staging_tests": (25, 90),
    "b_shared_gpu_gloo": (45, 150),
    "f_fabric_bf16_resume": (30, 120),
    "c_trainer_precisions": (100, 240),
    "d_exchange_memory": (45, 150),
    "e_resnet50_overhead": (45, 150),
}
PYTEST_TARGETS = {  # the cuda-marked tests that exist only as pytest tests
    "gpu_tests": ["tests/gpu/test_groups_cuda.py", "tests/gpu/test_pinned_cuda.py"],
    "async_staging_tests": ["tests/async/test_async_transfers.py"],
}
ORDER = ["a_fake_world", "gpu_tests", "async_staging_tests", "b_shared_gpu_gloo", "f_fabric_bf16_resume",
         "c_trainer_precisions", "d_exchange_memory", "e_resnet50_overhead"]


def plan(names: list[str], device: str, size: str, out: Path, use_pytest: bool) -> list[Step]:
    """The steps for ``names``: correctness checks through pytest (``use_pytest`` on CUDA) or directly, the
    pytest-only targets (SKIP without pytest), the measurements directly."""
    python = sys.executable
    steps = []
    for name in names:
        need, cap = NEEDS[name]
        junit = out / "junit" / f"{name}.xml"
        pytest_cmd = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", f"--junitxml={junit}"]
        if name in PYTEST_TARGETS:
            skip = None if use_pytest else ("pytest is not importable here: carry it in (docs/gpu.md) to run "
                                            f"{' '.join(PYTEST_TARGETS[name])}")
            steps.append(Step(name, pytest_cmd + PYTEST_TARGETS[name], need, cap, junit, skip))
        elif name in device_checks.CHECKS and use_pytest and device == "cuda":  # the wrappers run on CUDA only
            steps.append(Step(name, [*pytest_cmd, f"tests/gpu/test_device_checks.py::test_device_check[{name}]"],
                              need, cap, junit))
        else:
            result = out / "steps" / f"{name}.json"
            steps.append(Step(name, [python, "-m", "benchmarks.gpu_check", "--one", name, "--device", device,
                                     "--size", size, "--result", str(result)], need, cap))
    return steps


def _junit_result(name: str, path: Path, returncode: int, output: str) -> Result:
    """PASS, FAIL or SKIP from a pytest step's JUnit report (or its exit status and output where it wrote none)."""
    if not path.exists():
        tail = output.strip().splitlines()[-1:] or ["no output"]
        return Result(name, FAIL, f"pytest exited with status {returncode} and no report: {tail[0]}")
    cases = ElementTree.parse(path).getroot().iter("testcase")
    counts = {PASS: 0, FAIL: 0, SKIP: 0}
    first: dict[str, str] = {}
    for case in cases:
        status, message = PASS, ""
        for child in case:
            if child.tag in ("failure", "error"):
                status, message = FAIL, child.get("message") or (child.text or "").strip()
            elif child.tag == "skipped" and status != FAIL:
                status, message = SKIP, child.get("message") or ""
        counts[status] += 1
        if message:
            first.setdefault(status, f"{case.get('name')}: {message.splitlines()[0] if message else ''}")
    total = sum(counts.values())
    summary = f"{counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped of {total} tests"
    if counts[FAIL] or returncode not in (0, 5) or total == 0:
        why = first.get(FAIL) or ("no test collected" if total == 0 else f"pytest exit status {returncode}")
        return Result(name, FAIL, f"{summary}; {why}")
    if counts[PASS] == 0:
        return Result(name, SKIP, f"{summary}; {first.get(SKIP, '')}")
    return Result(name, PASS, summary)


def run_step(step: Step, timeout: float, out: Path) -> Result:
    """Run ``step`` bounded by ``timeout`` seconds and turn what it left into a :class:`Result`."""
    if step.skip is not None:
        return Result(step.name, SKIP, step.skip)
    metrics_dir = out / "metrics"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", METRICS_ENV: str(metrics_dir),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    returncode, output = run_bounded(step.command, timeout, env=env, cwd=REPO)
    seconds = time.perf_counter() - start
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "logs" / f"{step.name}.log").write_text(output)
    if returncode is None:
        result = Result(step.name, FAIL, f"did not finish within {timeout:.0f} s; killed with its process group")
    elif step.junit is not None:
        result = _junit_result(step.name, step.junit, returncode, output)
        metrics = metrics_dir / f"{step.name}.json"
        if metrics.exists():
            result.metrics = json.loads(metrics.read_text())
    else:
        path = Path(step.command[step.command.index("--result") + 1])
        if returncode != 0 or not path.exists():
            tail = output.strip().splitlines()[-1:] or ["no output"]
            result = Result(step.name, FAIL, f"the check's process exited with status {returncode}: {tail[0]}")
        else:
            result = Result(**json.loads(path.read_text()))
    result.seconds = seconds
    return result


# ---------------------------------------------------------------------------------------------------- the plan


def table(results: list[Result]) -> str:
    """One line per step: name, status, seconds, what it found."""
    width = max(len(r.check) for r in results)
    lines = [f"{'check':<{width}}  status  seconds  detail", f"{'-' * width}  ------  -------  ------"]
    lines += [f"{r.check:<{width}}  {r.status:<6}  {r.seconds:7.1f}  {r.detail}" for r in results]
    counts = {s: sum(r.status == s for r in results) for s in (PASS, FAIL, SKIP)}
    lines.append(f"{counts[PASS]} PASS, {counts[FAIL]} FAIL, {counts[SKIP]} SKIP")
    return "\n".join(lines)


def save_results(results: list[Result], out: Path, header: str) -> None:
    """``gpu_check.csv`` (one row per step, metrics as JSON in the last column) and ``gpu_check.json`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"check": r.check, "status": r.status, "seconds": f"{r.seconds:.1f}", "detail": r.detail,
             "metrics": json.dumps(r.metrics, sort_keys=True)} for r in results]
    if rows:
        write_csv(out / "gpu_check.csv", rows)
    (out / "gpu_check.json").write_text(json.dumps({"environment": header, "results": [asdict(r) for r in results]},
                                                   indent=1))


def run_plan(steps: list[Step], budget: float, out: Path, header: str,
             report: Callable[[Result], None] = lambda r: None) -> list[Result]:
    """Run ``steps`` in order within ``budget`` seconds from now, saving the results after every step."""
    deadline = time.monotonic() + budget
    results: list[Result] = []
    for step in steps:
        left = deadline - time.monotonic()
        if step.skip is None and left < step.need:
            result = Result(step.name, SKIP, f"needs about {step.need:.0f} s, {max(left, 0):.0f} s of the "
                            f"{budget:.0f} s budget left")
        else:
            result = run_step(step, min(step.cap, left), out)
        results.append(result)
        save_results(results, out, header)
        report(result)
    return results


def environment() -> str:
    """The one line that says what ran the check."""
    import lightning

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return (f"{gpu}; torch {torch.__version__}, CUDA {torch.version.cuda}, lightning {lightning.__version__}, "
            f"Python {sys.version.split()[0]}; {when}")


def refusal(device: str) -> str | None:
    """Why the check cannot run here (one line), or None."""
    version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    if version < MIN_TORCH:
        return (f"gpu_check: refused: torch {torch.__version__} is older than {'.'.join(map(str, MIN_TORCH))}, the "
                "oldest version lightning-easgd supports (docs/gpu.md)")
    if device == "cuda" and not torch.cuda.is_available():
        return ("gpu_check: refused: no CUDA device is visible (torch.cuda.is_available() is False); run it on a "
                "machine with an NVIDIA GPU")
    return None


def default_out() -> Path:
    """``$OUT`` when the variable is set (a device window's folder that comes back), else today's run folder."""
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    return Path("runs") / "gpu_check" / time.strftime("%Y-%m-%d", time.gmtime())


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """SIGTERM (a window's time limit) unwinds like an exception, so the running step's group is killed."""
    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=ORDER, help="run these steps only (in the usual order)")
    parser.add_argument("--out", type=Path, default=None, help="where the results go (default: $OUT, else "
                        "runs/gpu_check/<date>)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="seconds for the whole run; each "
                        f"step's limit is capped at what is left (default {DEFAULT_BUDGET:g})")
    parser.add_argument("--no-pytest", action="store_true", help="run the device checks directly even where pytest "
                        "is importable (the pytest-only tests are then skipped)")
    parser.add_argument("--one", choices=sorted([*device_checks.CHECKS, *MEASUREMENTS]), help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: the tiny CPU rehearsal of the tests (with --size tiny)")
    parser.add_argument("--size", choices=sorted(SIZES), default="full",
                        help="tiny: the sizes of the CPU rehearsal (with --device cpu)")
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        if args.result is None:
            parser.error("--one needs --result")
        result = run_check(args.one, torch.device(args.device), args.size)
        args.result.parent.mkdir(parents=True, exist_ok=True)
        args.result.write_text(json.dumps(asdict(result)))
        return 0
    why = refusal(args.device)
    if why is not None:
        print(why, file=sys.stderr)
        return 2
    if args.budget <= 0:
        parser.error(f"--budget={args.budget:g} is invalid: it must be > 0 seconds")
    out = (args.out or default_out()).resolve()
    header = environment()
    use_pytest = not args.no_pytest and importlib.util.find_spec("pytest") is not None
    names = [n for n in ORDER if args.only is None or n in args.only]
    steps = plan(names, args.device, args.size, out, use_pytest)
    print(f"gpu_check on {header}; budget {args.budget:g} s; correctness through "
          f"{'pytest' if use_pytest else 'direct calls (pytest not importable or --no-pytest)'}; results in {out}",
          flush=True)
    with _terminate_as_exit():
        results = run_plan(steps, args.budget, out, header,
                           lambda r: print(f"{r.check}: {r.status} ({r.seconds:.0f} s) {r.detail}", flush=True))
    print(table(results))
    return 1 if any(r.status == FAIL for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
