"""Experiment tracking: ``train.log_to: [tensorboard, mlflow]`` beside the run's own ``log.csv``.

The engine calls :meth:`Tracker.log_epoch` once per epoch with the row it already computed (training loss,
learning rate, img/s and the validation report, per level included) and :meth:`Tracker.finish` once with the
test metrics that go to ``metrics.json``; everything else lives here. Only rank 0 writes (under DDP the
other ranks get a tracker that does nothing), and a missing library is one line naming the key and the
extra before any data is read, on every rank alike.

TensorBoard events go to ``RUN/tensorboard``; MLflow to ``$MLFLOW_TRACKING_URI`` when set, else to a SQLite
file in the run folder (``RUN/mlflow.db``, artifacts in ``RUN/mlflow-artifacts``), so it works offline:
``mlflow ui --backend-store-uri sqlite:///RUN/mlflow.db``. (MLflow's plain-folder store is in maintenance mode
and refuses to open unless told otherwise; SQLite is the local store it recommends.)
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Protocol

from hiervision.config import ConfigError

__all__ = ["BACKENDS", "Tracker", "check_backends", "flatten_metrics", "log_locations", "open_tracker"]

#: backend → (module that must import, the extra that installs it)
BACKENDS: dict[str, tuple[str, str]] = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}
#: the MLflow experiment every run logs to (one store per run folder by default)
EXPERIMENT = "hiervision"


def check_backends(names: list[str]) -> list[str]:
    """``train.log_to`` checked before training: each backend known and its library importable."""
    for name in names:
        if name not in BACKENDS:
            raise ConfigError(f"config key 'train.log_to' has {name!r}: one of {', '.join(BACKENDS)}")
        module, extra = BACKENDS[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"config key 'train.log_to' has {name!r} but {module} is not installed: "
                              f"pip install 'hiervision[{extra}]'")
    return list(names)


def _key(name: str) -> str:
    """A name both tools accept (MLflow allows letters, digits, ``_ - . / :`` and spaces)."""
    return re.sub(r"[^\w./\- :]", "_", name)


def flatten_metrics(report: dict[str, Any], prefix: str) -> dict[str, float]:
    """Every finite number of a metrics report under ``prefix/``: lists per level (``level_1``, ...) or, for
    entries with a ``target`` (hedged answers), per target (``hedged/target_0.9``), mappings by their keys
    (``hdist@5`` → ``hdist_5``); text and other values are left out."""
    out: dict[str, float] = {}

    def walk(value: Any, name: str) -> None:
        if isinstance(value, bool):
            return
        if isinstance(value, (int, float)):
            if math.isfinite(value):
                out[_key(name)] = float(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{name}/{k}")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):  # hedged answers are named by their accuracy target, levels by depth
                target = v.get("target") if isinstance(v, dict) else None
                walk(v, f"{name}/target_{target:g}" if isinstance(target, (int, float)) else f"{name}/level_{i + 1}")

    for k, v in report.items():
        walk(v, f"{prefix}/{k}")
    return out


def _epoch_metrics(row: dict[str, Any]) -> tuple[int, dict[str, float]]:
    """The engine's epoch row → ``(epoch, metrics)``: ``train/loss``, ``train/lr``, ``train/images_per_s``
    and the whole validation report under ``val/``."""
    log = row["log"]
    scalars = {k.removeprefix("train_"): v for k, v in log.items() if k != "epoch" and not k.startswith("val_")}
    return int(log["epoch"]), {**flatten_metrics(scalars, "train"), **flatten_metrics(row.get("val", {}), "val")}


def _params(cfg: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """The config as ``section.key`` parameters (text values; lists and mappings as they print)."""
    out: dict[str, str] = {}
    for k, v in cfg.items():
        if isinstance(v, dict) and v:
            out.update(_params(v, f"{prefix}{k}."))
        else:
            out[_key(f"{prefix}{k}")] = str(v)
    return out


class _Backend(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self, finished: bool) -> None: ...


class _TensorBoard:
    def __init__(self, out: Path, cfg: dict[str, Any]) -> None:
        import yaml
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        text = yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)
        self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()), 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()  # an interrupted run keeps every finished epoch

    def close(self, finished: bool) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, out: Path, cfg: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        out = out.resolve()
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out / 'mlflow.db'}"
        # an unreachable server is one line now, not minutes of retries (a user's own settings win)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.client = client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(EXPERIMENT)
        exp_id = exp.experiment_id if exp else client.create_experiment(
            EXPERIMENT, artifact_location=(out / "mlflow-artifacts").as_uri())
        # a resumed run continues its unfinished MLflow run; anything else starts a new one
        # searched by a hash of the folder: any character in --out (a quote) is safe in the filter
        key = hashlib.sha256(str(out).encode()).hexdigest()[:32]
        running = client.search_runs([exp_id], f"tags.run_dir_key = '{key}' and attributes.status = 'RUNNING'",
                                     max_results=1)
        if running:
            self.run_id = running[0].info.run_id
        else:
            self.run_id = client.create_run(exp_id, run_name=out.name,  # the run folder: one name per run
                                            tags={"run_dir": str(out), "run_dir_key": key}).info.run_id
            params = [Param(k, v[:6000]) for k, v in _params(cfg).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
                client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def close(self, finished: bool) -> None:
        if finished:
            self.client.set_terminated(self.run_id)


class Tracker:
    """What the engine talks to: fans each epoch's row and the final metrics out to the chosen backends."""

    def __init__(self, backends: list[_Backend]) -> None:
        self.backends = backends

    def log_epoch(self, row: dict[str, Any]) -> None:
        """One epoch: the engine's row (``log``: loss, lr, img/s, ``val_*``; ``val``: the validation report)."""
        if not self.backends:
            return
        epoch, metrics = _epoch_metrics(row)
        self._each(lambda b: b.log(metrics, epoch))

    def finish(self, result: dict[str, Any]) -> None:
        """The run's test metrics (``metrics.json``) under ``test/``, logged at the last epoch; then close."""
        metrics = flatten_metrics(result, "test")
        self._each(lambda b: (b.log(metrics, int(result.get("epochs", 0))), b.close(finished=True)))
        self.backends = []

    def _each(self, call) -> None:
        """``call`` on every backend; one that fails is dropped with one warning line: a run never dies
        because its tracker did (the run folder keeps every metric in ``log.csv`` and ``metrics.json``)."""
        for b in list(self.backends):
            try:
                call(b)
            except Exception as e:  # noqa: BLE001 - any library's failure, reported in one line
                self.backends.remove(b)
                print(f"hiervision: warning: train.log_to: {_name(b)} stopped logging ({_line(e)}); training goes "
                      "on (log.csv and metrics.json keep everything)", file=sys.stderr)


def log_locations(cfg: dict[str, Any], out: str | os.PathLike) -> list[str]:
    """Where ``train.log_to`` wrote, as the commands that show it (for the screen a run ends with)."""
    out = Path(out).resolve()
    shown = {"tensorboard": f"tensorboard --logdir {out / 'tensorboard'}",
             "mlflow": (f"mlflow ui (at {os.environ['MLFLOW_TRACKING_URI']})" if os.environ.get("MLFLOW_TRACKING_URI")
                        else f"mlflow ui --backend-store-uri sqlite:///{out / 'mlflow.db'}")}
    return [shown[n] for n in dict.fromkeys(cfg["train"].get("log_to") or []) if n in shown]


def open_tracker(cfg: dict[str, Any], out: str | os.PathLike, is_main: bool = True) -> Tracker:
    """The tracker of ``cfg['train']['log_to']`` for run folder ``out`` (a silent one off rank 0 or when empty).

    Checks the libraries on every rank first, so a missing one stops all ranks with the same one line.
    """
    names = check_backends(cfg["train"].get("log_to") or [])
    if not is_main or not names:
        return Tracker([])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kinds = {"tensorboard": _TensorBoard, "mlflow": _MLflow}
    backends = []
    for n in dict.fromkeys(names):  # a tracker that cannot start stops the run before any training, in one line
        try:
            backends.append(kinds[n](out, cfg))
        except Exception as e:  # noqa: BLE001 - a bad URI, an unreachable server, an unwritable folder
            where = os.environ.get("MLFLOW_TRACKING_URI", "the run folder") if n == "mlflow" else out / "tensorboard"
            raise ConfigError(f"train.log_to: {n} cannot start at {where} ({_line(e)})") from None
    return Tracker(backends)


def _name(backend: _Backend) -> str:
    return "mlflow" if isinstance(backend, _MLflow) else "tensorboard"


def _line(e: BaseException) -> str:
    """An exception as one short line (library messages can run to many)."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}{'…' if len(text) > 200 else ''}"
