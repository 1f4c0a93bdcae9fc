"""What a run reports: metrics.jsonl, the window of steps between two log lines, progress.

- `MetricsLogger`: metrics.jsonl, one JSON object per logging step (TRL's metric names),
  trimmed on resume; `read_metrics` reads it back. Each record also goes to the logger's
  writers (`report_to`): `TensorBoardWriter`, `WandbWriter`, made by `report_writers`.
- `MetricWindow`: the sums of the steps since the last log line, averaged (over every rank)
  when the line is written.
- `Progress`: a tqdm bar over optimizer steps; `Throughput`: tokens per second.

Only rank 0 writes (`alignlib.distributed.is_main_process`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from alignlib.checkpoint import remove_stale_temporaries, write_text_atomic
from alignlib.distributed import SINGLE_PROCESS, Processes, is_main_process, sum_across

__all__ = ["MetricWindow", "MetricWriter", "MetricsLogger", "Progress", "TensorBoardWriter", "Throughput",
           "WandbWriter", "read_metrics", "report_writers"]


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


def _to_number(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().float().item() if value.numel() == 1 else value.detach().float().tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete record of a metrics.jsonl file (a torn last line is skipped)."""
    records = []
    with open(path) as handle:
        for line in handle:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


class MetricsLogger:
    """Append one JSON object per logging step to `output_dir/metrics.jsonl`.

    Each record is {"step": int, "epoch": float | None, **metrics}, with TRL's metric names
    (`loss`, `learning_rate`, `rewards/chosen`, `rewards/accuracies`, ...). Lines are flushed
    as they are written, so a crash loses at most the line being written.

    `resume_step`: None starts a fresh file (an existing one is replaced). An int keeps the
    records with step <= resume_step and drops the rest (the steps the resumed run will log
    again), plus any torn line. Only the main process writes.

    `writers` (`report_writers`) get every record after it is written, and are closed with the
    logger (also when it cannot start).
    """

    def __init__(self, output_dir: str | os.PathLike, *, resume_step: int | None = None,
                 filename: str = "metrics.jsonl", writers: Iterable[MetricWriter] = ()) -> None:
        self.path = Path(output_dir) / filename
        self._handle = None
        self.writers = list(writers)
        try:
            self._start(resume_step)
        except BaseException:
            self.close()
            raise

    def _start(self, resume_step: int | None) -> None:
        if not is_main_process():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and self.path.exists():
            kept = [record for record in read_metrics(self.path) if record.get("step", 0) <= resume_step]
        remove_stale_temporaries(self.path.parent, rf"^\.{re.escape(self.path.name)}\.tmp-")  # a killed rewrite
        try:
            write_text_atomic(self.path, "".join(json.dumps(record) + "\n" for record in kept))
            self._handle = open(self.path, "a")  # noqa: SIM115 - kept open for the run, closed in close()
        except OSError as exc:
            raise OSError(exc.errno or errno.EIO, f"could not write metrics to {self.path}: {exc.strerror or exc}") from exc

    def log(self, metrics: Mapping[str, Any], *, step: int, epoch: float | None = None) -> dict[str, Any]:
        """Write one record; tensors and numpy scalars become numbers. Returns the record.

        The line goes out in one write and is flushed at once: a process killed meanwhile leaves
        at most that line torn, which `read_metrics` skips and a resumed logger drops.
        """
        record = {"step": step, "epoch": epoch, **{key: _to_number(value) for key, value in metrics.items()}}
        if self._handle is not None:
            try:
                self._handle.write(json.dumps(record) + "\n")
                self._handle.flush()
            except OSError as exc:  # close now: a later flush of the stuck buffer would only fail again
                handle, self._handle = self._handle, None
                with contextlib.suppress(OSError):
                    handle.close()
                raise OSError(exc.errno or errno.EIO, f"could not write the metrics of step {step} to {self.path}: "
                              f"{exc.strerror or exc}") from exc
        for writer in self.writers:
            writer.write(record)
        return record

    def close(self) -> None:
        """Close metrics.jsonl and every writer (each one, even when another fails); closing twice does nothing."""
        writers, self.writers = self.writers, []
        try:
            if self._handle is not None:
                handle, self._handle = self._handle, None
                handle.close()
        finally:
            _close_all(writers)

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def plot(self, png_path: str | os.PathLike, keys: Iterable[str] | None = None) -> Path | None:
        """Plot each metric against step into one PNG (one panel per metric).

        matplotlib is optional (`pip install matplotlib`, or the `bench` extra): without it a
        warning is issued and None returned. `keys` defaults to `loss` and the `rewards/*`
        metrics found.
        """
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            warnings.warn("matplotlib is not installed; metrics not plotted (pip install matplotlib)", stacklevel=2)
            return None
        if self._handle is not None:
            self._handle.flush()
        records = read_metrics(self.path)
        if keys is None:
            seen = {key for record in records for key in record}
            keys = [key for key in ("loss", "rewards/accuracies", "rewards/margins") if key in seen]
        keys = list(keys)
        if not keys:
            raise ValueError(f"nothing to plot: none of the requested metrics is in {self.path}")
        figure, axes = plt.subplots(len(keys), 1, figsize=(6, 2.5 * len(keys)), squeeze=False)
        for axis, key in zip(axes[:, 0], keys, strict=True):
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            axis.plot([p[0] for p in points], [p[1] for p in points])
            axis.set_ylabel(key)
        axes[-1, 0].set_xlabel("step")
        figure.tight_layout()
        figure.savefig(png_path)
        plt.close(figure)
        return Path(png_path)


# ----------------------------------------------------------------------------------------------
# Where else the records go (report_to): TensorBoard, wandb
# ----------------------------------------------------------------------------------------------


class MetricWriter(Protocol):
    """Somewhere a MetricsLogger's records also go: `write(record)` for each record logged, `close()` at the end."""

    def write(self, record: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def _scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """A record's numbers but its step (None, lists and text are left out), under metrics.jsonl's names."""
    return {key: value for key, value in record.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


def _close_all(writers: Iterable[MetricWriter]) -> None:
    """Close each writer; the first error is raised once all have been tried."""
    error = None
    for writer in writers:
        try:
            writer.close()
        except Exception as exc:  # noqa: BLE001 - the others are still closed
            error = error or exc
    if error is not None:
        raise error


class TensorBoardWriter:
    """Each record's numbers as TensorBoard scalars at the record's step (torch's SummaryWriter),
    under metrics.jsonl's names (transformers renames them train/loss, eval/loss), in `log_dir`.
    `epoch` is written once per step. Flushed after each record, as metrics.jsonl is.

    Each start of a run writes a new event file that begins with TensorBoard's purge marker:
    at resume_step + 1 for a resumed run, so TensorBoard hides the steps the interrupted run
    logged after its checkpoint (metrics.jsonl drops the same lines) and each step shows once;
    at step 0 for a fresh start, so events an earlier start left in `log_dir` are hidden.
    """

    def __init__(self, log_dir: str | os.PathLike, *, resume_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=0 if resume_step is None else resume_step + 1)
        self._epoch_step: int | None = None

    def write(self, record: Mapping[str, Any]) -> None:
        step = record["step"]
        for key, value in _scalars(record).items():
            if key == "epoch":
                if step == self._epoch_step:
                    continue
                self._epoch_step = step
            self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbWriter:
    """Each record's numbers logged to an offline Weights & Biases run at the record's step, under
    metrics.jsonl's names: wandb.init(mode="offline", dir=output_dir) (files in output_dir/wandb/;
    upload them later with `wandb sync`), project $WANDB_PROJECT or "alignlib", named `run_name`,
    with `config` as its config.

    Offline runs cannot be resumed: a resumed run is a new wandb run holding the steps after the
    checkpoint, its config saying `resumed_from_step`; the interrupted run's folder keeps what it
    logged, including any steps after its checkpoint.
    """

    def __init__(self, output_dir: str | os.PathLike, *, run_name: str | None = None,
                 config: Mapping[str, Any] | None = None, resume_step: int | None = None) -> None:
        import wandb

        settings = dict(config or {})
        if resume_step is not None:
            settings["resumed_from_step"] = resume_step
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(mode="offline", dir=str(output_dir), project=os.environ.get("WANDB_PROJECT", "alignlib"),
                               name=run_name, config=settings)

    def write(self, record: Mapping[str, Any]) -> None:
        self._run.log(_scalars(record), step=record["step"])

    def close(self) -> None:
        self._run.finish()


def report_writers(integrations: Iterable[str], output_dir: str | os.PathLike, *,
                   logging_dir: str | os.PathLike | None = None, run_name: str | None = None,
                   config: Mapping[str, Any] | None = None, resume_step: int | None = None) -> list[MetricWriter]:
    """The writers of `integrations` ("tensorboard", "wandb": alignlib.configs.report_integrations)
    for MetricsLogger(writers=...): TensorBoard's event files in `logging_dir` (default
    output_dir/runs), an offline wandb run in output_dir/wandb. None but on the main process;
    `resume_step` as MetricsLogger's."""
    if not is_main_process():
        return []
    writers: list[MetricWriter] = []
    try:
        for name in integrations:
            if name == "tensorboard":
                writers.append(TensorBoardWriter(logging_dir or Path(output_dir) / "runs", resume_step=resume_step))
            elif name == "wandb":
                writers.append(WandbWriter(output_dir, run_name=run_name, config=config, resume_step=resume_step))
            else:
                raise ValueError(f"report_to: no writer for {name!r} (known: tensorboard, wandb)")
    except BaseException:
        _close_all(writers)
        raise
    return writers


# ----------------------------------------------------------------------------------------------
# Progress and throughput
# ----------------------------------------------------------------------------------------------


class Progress:
    """A tqdm bar over optimizer steps with the latest metrics in its postfix.

        with Progress(total=num_steps, initial=resumed_step) as bar:
            ...
            bar.update(loss=loss.item(), acc=accuracy)

    Hidden on every process but the main one (and when `disable`).
    """

    def __init__(self, total: int, *, initial: int = 0, desc: str = "train", disable: bool = False) -> None:
        self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                        disable=disable or not is_main_process())

    def update(self, n: int = 1, **metrics: Any) -> None:
        if metrics:
            values = {key: _to_number(value) for key, value in metrics.items()}
            shown = {key: f"{value:.4g}" if isinstance(value, float) else value for key, value in values.items()}
            self.bar.set_postfix(shown, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Throughput:
    """Tokens per second between resets: `add(n_tokens)` after each step, read `rate()`."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.tokens, self.start = 0, time.perf_counter()

    def add(self, tokens: int | torch.Tensor) -> None:
        self.tokens += int(tokens)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def rate(self) -> float:
        elapsed = self.elapsed()
        return self.tokens / elapsed if elapsed > 0 else 0.0


class MetricWindow:
    """The optimizer steps since the last log line: metric sums, the loss, pairs and tokens.

    Every step that updated the weights is `add`ed: its metric sums (this rank's, e.g. the sum
    over its pairs of `rewards/chosen`), its loss and pair count (over every rank), this rank's
    pair count, the gradient norm. `summary` turns the window into the log line's means, the
    sums added over ranks first, and starts a new window. Skipped steps are never added, so a
    line averages the steps that trained.

        window.add(metric_sums, loss=0.69, pairs=8, local_pairs=4, grad_norm=1.3)
        window.tokens.add(n)      # per micro-batch, for tokens_per_second
        record = window.summary(processes, learning_rate=...)   # None if no step was added
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}  # this rank's metric sums
        self.loss_sum = 0.0  # sum over steps of the step's loss times its pairs (all ranks)
        self.pairs = 0  # over all ranks
        self.local_pairs = 0  # this rank's
        self.grad_norm = math.nan
        self.tokens = Throughput()

    def add(self, metric_sums: Mapping[str, float], *, loss: float, pairs: int, local_pairs: int,
            grad_norm: float) -> None:
        for key, value in metric_sums.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.loss_sum += loss * pairs
        self.pairs += pairs
        self.local_pairs += local_pairs
        self.grad_norm = grad_norm

    def local_mean(self, key: str) -> float:
        """This rank's running mean of a metric over its pairs (for the progress bar)."""
        return self.sums.get(key, 0.0) / max(self.local_pairs, 1)

    def summary(self, processes: Processes = SINGLE_PROCESS, *,
                means: Callable[[dict[str, float], float], dict[str, float]] | None = None,
                **extra: float) -> dict[str, float] | None:
        """The window's means over every rank's examples, with `extra` values added; None when no
        step was added. `means(sums, examples)` turns the summed metrics into the logged ones
        (default: each divided by the examples). Every rank must call it (the sums are gathered).
        Resets the window."""
        record = None
        if self.pairs:
            sums = sum_across(self.sums, processes)
            record = means(sums, self.pairs) if means else {key: value / self.pairs for key, value in sums.items()}
            record["loss"] = self.loss_sum / self.pairs
            record.update(extra)
            record["grad_norm"] = self.grad_norm
            record["tokens_per_second"] = sum_across({"rate": self.tokens.rate()}, processes)["rate"]
        self.__init__()
        return record
