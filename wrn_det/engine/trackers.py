"""Experiment trackers: where a run's numbers go besides ``metrics.json`` (the ``LOGGERS`` key).

``LOGGERS`` names them, for both trainers (:func:`~wrn_det.engine.config.add_run_config`):

* ``"tensorboard"`` (the default): every number of a ``metrics.json`` row as a scalar of the
  TensorBoard event file in ``OUTPUT_DIR``.
* ``"mlflow"``: an MLflow run holding the config flattened to ``KEY: value`` params, every
  number of ``metrics.json`` as a metric at its step (iteration for detection, epoch for
  classification), and the final checkpoint's path as the tag ``final_checkpoint``. It goes
  where ``MLFLOW_TRACKING_URI`` points (a server, ``file:``, ``sqlite:``), by default into the
  SQLite store ``OUTPUT_DIR/mlflow.db`` (``mlflow ui --backend-store-uri sqlite:///OUTPUT_DIR/mlflow.db``),
  in the experiment ``MLFLOW_EXPERIMENT_NAME`` (default ``wrn_det``).
* ``"wandb"``: a Weights & Biases run with the same config, metrics and final checkpoint (in
  its summary), plus the evaluation's pictures as images; under ``OUTPUT_DIR/wandb``, in the
  project ``WANDB_PROJECT`` (default ``wrn_det``); ``WANDB_MODE=offline`` keeps it on disk
  for a later ``wandb sync``.

The step itself (``iteration``) is the x axis, not a metric. Only the main process logs. The
tracker run ids are kept in ``OUTPUT_DIR/tracker_runs.json``, so that a resumed run goes on
logging into the same MLflow and W&B runs. The packages are optional (``pip install -e
'.[trackers]'``) and imported only when ``LOGGERS`` names them.
"""
import importlib.util
import logging
import os
import re
import time
from typing import Dict, List, Optional, Sequence

from .errors import ConfigError
from .fileio import read_json, write_json

__all__ = ["LOGGER_NAMES", "RUNS_FILE", "Tracker", "TensorBoardTracker", "MLflowTracker", "WandbTracker",
           "check_loggers", "open_trackers", "flat_params"]

logger = logging.getLogger("wrn_det")

#: The tracker of each ``LOGGERS`` name, and the package it needs.
LOGGER_NAMES = ("tensorboard", "mlflow", "wandb")
_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}

#: The file of ``OUTPUT_DIR`` that keeps the tracker runs' ids for a resumed run.
RUNS_FILE = "tracker_runs.json"

# the run's final status, as the trainers say it; each tracker maps it to its own
STATUSES = ("finished", "failed", "preempted")


def check_loggers(names: Sequence[str]) -> tuple:
    """Return ``LOGGERS`` as a tuple, checked: every name known and its package installed (without importing it).

    Raises :class:`ConfigError` with one line naming ``LOGGERS``, the value and what to do.
    """
    if isinstance(names, str):
        names = (names,)
    names = tuple(names)
    for name in names:
        if name not in LOGGER_NAMES:
            raise ConfigError(f"LOGGERS: unknown logger {name!r}; expected some of {', '.join(LOGGER_NAMES)}, "
                              "e.g. LOGGERS \"('tensorboard', 'mlflow')\"")
    if len(set(names)) != len(names):
        raise ConfigError(f"LOGGERS {names}: a logger is named twice")
    for name in names:
        if importlib.util.find_spec(_PACKAGES[name]) is None:
            raise ConfigError(f"LOGGERS names {name!r} but the {_PACKAGES[name]} package is not installed: "
                              f"pip install {_PACKAGES[name]} (or pip install -e '.[trackers]')")
    return names


def flat_params(config) -> Dict[str, str]:
    """Return a config (CfgNode or nested dict) as ``{"MODEL.WRN.DEPTH": "34", ...}``, values as text."""
    from .config import flatten_config

    return {k: str(v) for k, v in flatten_config(config).items()}


def _chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]


class Tracker:
    """One experiment tracker of a run (see the module docstring); the default methods do nothing.

    :meth:`resume_info` returns what a resumed run needs to reopen the same tracker run.
    """

    name = ""

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        """Record the finite numbers ``metrics`` at ``step``; returns None."""

    def log_images(self, images: Dict[str, str], step: int) -> None:
        """Record the pictures ``{name: path of a PNG}`` at ``step``; returns None."""

    def log_final_checkpoint(self, path: str) -> None:
        """Record the path of the run's final checkpoint; returns None."""

    def resume_info(self) -> Optional[dict]:
        """Return what reopens this tracker's run after a resume (kept in ``tracker_runs.json``), or None."""
        return None

    def close(self, status: str = "finished") -> None:
        """End the tracker's run with ``status`` (``"finished"``, ``"failed"``, ``"preempted"``); returns None."""


class TensorBoardTracker(Tracker):
    """Scalars into the TensorBoard event file of ``output_dir`` (TensorBoard's ``SummaryWriter``)."""

    name = "tensorboard"

    def __init__(self, output_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(log_dir=output_dir)

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self._tb.add_scalar(k, v, step)
        self._tb.flush()

    def close(self, status: str = "finished") -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


# MLflow takes names of letters, digits, '_', '-', '.', ' ' and '/' (per-class AP keys carry class names)
_MLFLOW_BAD = re.compile(r"[^\w\-. /]")


class MLflowTracker(Tracker):
    """An MLflow run, through ``MlflowClient`` (the caller's active run, if any, is left alone)."""

    name = "mlflow"
    _STATUS = {"finished": "FINISHED", "failed": "FAILED", "preempted": "KILLED"}

    def __init__(self, output_dir: str, config=None, previous: Optional[dict] = None):
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        default_store = os.path.join(os.path.abspath(output_dir), "mlflow.db")
        self.tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///" + default_store
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self.run_id = None
        if previous and previous.get("tracking_uri") == self.tracking_uri and previous.get("run_id"):
            try:
                self.client.get_run(previous["run_id"])
                self.run_id = previous["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
                logger.info("mlflow: continuing run %s at %s", self.run_id, self.tracking_uri)
            except MlflowException as e:
                logger.warning("mlflow: run %s of %s cannot be continued (%s); starting a new run",
                               previous["run_id"], self.tracking_uri, str(e).splitlines()[0])
        elif previous:
            logger.warning("mlflow: the run was tracked at %s, MLFLOW_TRACKING_URI is now %s; starting a new run",
                           previous.get("tracking_uri"), self.tracking_uri)
        if self.run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "wrn_det"
            exp = self.client.get_experiment_by_name(name)
            if exp is not None:
                exp_id = exp.experiment_id
            else:  # the default store keeps its artifacts beside it, not in the working directory
                where = None if "MLFLOW_TRACKING_URI" in os.environ else \
                    "file://" + os.path.join(os.path.abspath(output_dir), "mlartifacts")
                exp_id = self.client.create_experiment(name, artifact_location=where)
            run = self.client.create_run(exp_id, run_name=os.path.basename(os.path.abspath(output_dir)),
                                         tags={"output_dir": os.path.abspath(output_dir)})
            self.run_id = run.info.run_id
            logger.info("mlflow: run %s at %s", self.run_id, self.tracking_uri)
        if config is not None:
            self._log_params(flat_params(config))

    def _log_params(self, params: Dict[str, str]) -> None:
        from mlflow.entities import Param

        try:
            from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
        except ImportError:  # older MLflow
            MAX_PARAM_VAL_LENGTH = 500
        params = {_MLFLOW_BAD.sub("_", k): v[:MAX_PARAM_VAL_LENGTH] for k, v in params.items()}
        # a param cannot change once logged: a resumed run adds the new keys and says which ones differ
        logged = self.client.get_run(self.run_id).data.params
        changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
        if changed:
            logger.warning("mlflow: run %s keeps its first values of %s (changed since)", self.run_id, ", ".join(changed))
        todo = [Param(k, v) for k, v in params.items() if k not in logged]
        for part in _chunks(todo, 100):  # the tracking API's limit of params per batch
            self.client.log_batch(self.run_id, params=part)

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(_MLFLOW_BAD.sub("_", k), float(v), now, int(step)) for k, v in metrics.items()]
        for part in _chunks(rows, 1000):
            self.client.log_batch(self.run_id, metrics=part)

    def log_final_checkpoint(self, path: str) -> None:
        self.client.set_tag(self.run_id, "final_checkpoint", os.path.abspath(path))

    def resume_info(self) -> Optional[dict]:
        return {"run_id": self.run_id, "tracking_uri": self.tracking_uri}

    def close(self, status: str = "finished") -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, self._STATUS.get(status, "FAILED"))
            self.run_id = None


class WandbTracker(Tracker):
    """A Weights & Biases run under ``output_dir/wandb`` (``WANDB_MODE``, ``WANDB_PROJECT`` and the rest of wandb's
    environment apply)."""

    name = "wandb"

    def __init__(self, output_dir: str, config=None, previous: Optional[dict] = None):
        import wandb

        self._wandb = wandb
        run_id = (previous or {}).get("run_id")
        settings = {}
        if "WANDB_CONSOLE" not in os.environ:
            # the run's log is log.txt; wandb's capture of stdout would also wrap the caller's streams
            settings["console"] = "off"
        from .config import flatten_config

        params = flatten_config(config) if config is not None else {}  # W&B keeps numbers as numbers
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "wrn_det",
                              name=os.path.basename(os.path.abspath(output_dir)), dir=output_dir,
                              config=params, id=run_id, resume="allow" if run_id else None,
                              settings=wandb.Settings(**settings))
        if run_id:
            self.run.config.update(params, allow_val_change=True)
        logger.info("wandb: %s run %s in %s", "continuing" if run_id else "started", self.run.id, self.run.dir)

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=int(step))

    def log_images(self, images: Dict[str, str], step: int) -> None:
        if images:
            self.run.log({k: self._wandb.Image(p) for k, p in images.items()}, step=int(step))

    def log_final_checkpoint(self, path: str) -> None:
        self.run.summary["final_checkpoint"] = os.path.abspath(path)

    def resume_info(self) -> Optional[dict]:
        return {"run_id": self.run.id}

    def close(self, status: str = "finished") -> None:
        if self.run is None:
            return
        if status == "preempted" and hasattr(self.run, "mark_preempting"):
            self.run.mark_preempting()  # the run is expected back
        self.run.finish(exit_code=0 if status == "finished" else 1)
        self.run = None


def open_trackers(names: Sequence[str], output_dir: str, config=None, resume: bool = False) -> List[Tracker]:
    """Return the trackers ``names`` (``LOGGERS``) of the run in ``output_dir``, opened; call on the main process only.

    ``config`` (the run's config) becomes the params; with ``resume`` the MLflow and W&B runs
    named in ``output_dir/tracker_runs.json`` are continued, else new ones start. The file is
    then (re)written with the runs' ids. Raises :class:`ConfigError` for a bad ``LOGGERS``.
    """
    names = check_loggers(names)
    runs_file = os.path.join(output_dir, RUNS_FILE)
    previous = {}
    if resume and os.path.isfile(runs_file):
        previous = read_json(runs_file, "the tracker runs of the resumed run") or {}
    trackers: List[Tracker] = []
    try:
        for name in names:
            if name == "tensorboard":
                trackers.append(TensorBoardTracker(output_dir))
            elif name == "mlflow":
                trackers.append(MLflowTracker(output_dir, config, previous.get("mlflow")))
            elif name == "wandb":
                trackers.append(WandbTracker(output_dir, config, previous.get("wandb")))
    except BaseException:
        for t in trackers:
            t.close("failed")
        raise
    info = {t.name: t.resume_info() for t in trackers if t.resume_info() is not None}
    if info:
        write_json(runs_file, info, indent=1)
    return trackers
