"""MLflow tracking for rank 0: parameters, metrics and artifacts of one run.

    tracker = Tracker.start(cfg.to_dict(), ds_config, output_dir=run_dir, run_name=cfg.run.name,
                            uri=cfg.tracking.uri, experiment=cfg.tracking.experiment, resume=False)
    tracker.log_many([(step, {"loss/math": 1.23, "lr": 2e-3}), ...])   # once per log interval
    tracker.log_artifact(os.path.join(run_dir, "summary.json"))
    tracker.finish("FINISHED")                                         # or "FAILED" / "KILLED"

API (every method is safe to call on a disabled tracker, where it does nothing):

- ``Tracker()`` -- a disabled tracker: other ranks, ``tracking.mlflow: false``.
- ``Tracker.start(cfg_dict, ds_config, *, output_dir, run_name, uri=None, experiment="desmoe",
  resume=False, tags=None, warn=None) -> Tracker`` -- opens the MLflow run. ``uri`` None means
  the embedded store ``sqlite:///<parent of output_dir>/mlflow.db`` (its artifacts go to
  ``<that folder>/mlartifacts``). Logs the flattened config as params (``train.lr``, ...) and
  ``ds_config`` with a ``ds.`` prefix (``ds.zero_optimization.stage``, ...), tags
  ``desmoe.output_dir`` and ``desmoe.mode`` (plus ``tags``), and ``config.yaml`` /
  ``ds_config.json`` from ``output_dir`` as artifacts. Writes ``output_dir/mlflow_run.json``
  (run id, experiment id, URI); with ``resume=True`` a run id found there on the same URI is
  continued instead of starting a new run.
- ``log_metrics(metrics, step)`` / ``log_many([(step, metrics), ...])`` -- numeric values only
  (others are skipped); queued and sent by a background thread in batches.
- ``log_artifact(path, artifact_path=None)`` -- a file or a folder, queued like metrics.
- ``finish(status="FINISHED")`` -- sends what is queued, marks the run ended, waits a bounded
  time (FINISH_WAIT_S); afterwards every call does nothing.
- ``enabled``, ``run_id``, ``uri`` -- attributes.

Tracking never stops or slows training: only ``start`` talks to MLflow on the caller's thread;
everything after it goes through a queue. The first failure (server unreachable at start or
gone mid-run, a locked or unwritable sqlite file, ...) prints ONE warning naming the URI and
disables the tracker; metrics.jsonl in the run directory still has every metric. MLflow's HTTP
client would retry a dead server for minutes; unless the environment says otherwise this
module caps it (MLFLOW_HTTP_REQUEST_MAX_RETRIES=2, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1,
MLFLOW_HTTP_REQUEST_TIMEOUT=5 s), so a dead server costs a few seconds once.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import sys
import threading
import time
import typing

RUN_FILE = "mlflow_run.json"
START_ARTIFACTS = ("config.yaml", "ds_config.json")
STATUSES = ("FINISHED", "FAILED", "KILLED")
FINISH_WAIT_S = 30.0
"""How long finish() waits for the queue to drain before giving up (the run keeps training data
in metrics.jsonl either way)."""

# NOTE: read by MLflow at every request, so setting them before the first one is enough.
# setdefault: a user's own values win.
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    # no "🏃 View run ... at" lines on stdout
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}

# MLflow's own limits (mlflow/utils/validation.py)
MAX_KEY_LENGTH = 250
MAX_PARAM_LENGTH = 6000
MAX_TAG_LENGTH = 8000
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

_BAD_KEY_CHARS = re.compile(r"[^\w.\- /]")


def default_uri(output_dir: str) -> str:
    """The embedded store beside the run directory: sqlite:///<parent of output_dir>/mlflow.db."""
    parent = os.path.dirname(os.path.abspath(output_dir))
    return f"sqlite:///{os.path.join(parent, 'mlflow.db')}"


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """Nested mapping -> {"a.b.c": str(value)}; lists as JSON, empty mappings as "{}"."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple, dict)):
            out[key] = json.dumps(v, default=str)
        else:
            out[key] = str(v)
    return out


def clean_key(key: str) -> str:
    """A key MLflow accepts: letters, digits, ``_ - . / space`` only, no empty or dot path segments."""
    key = _BAD_KEY_CHARS.sub("_", key)
    key = "/".join(s if s not in ("", ".", "..") else "_" for s in key.split("/"))
    return key[:MAX_KEY_LENGTH]


def _clip(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[:limit - 3] + "..."


def _chunks(items: list, n: int) -> typing.Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _short(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


def _as_float(value) -> float | None:
    """A metric value as float; None for what is not a number (strings such as the phase, bools)."""
    if isinstance(value, (str, bytes, bool)):
        return None
    try:
        return float(value)  # int, float, numpy and one-element torch scalars
    except (TypeError, ValueError, RuntimeError):
        return None


def _print_warning(msg: str) -> None:
    print(f"desmoe: warning: {msg}", file=sys.stderr, flush=True)


def _import_mlflow():
    """Import MLflow (about a second) with its INFO chatter (table creation, migrations) silenced."""
    for name, value in HTTP_LIMITS.items():
        os.environ.setdefault(name, value)
    from mlflow.tracking import MlflowClient

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient


class Tracker:
    """One MLflow run, written from rank 0. ``Tracker()`` is disabled: every call does nothing."""

    def __init__(self):
        self.enabled = False
        self.run_id: str | None = None
        self.uri: str | None = None
        self.output_dir: str | None = None
        self._client = None
        self._warn: typing.Callable[[str], None] = _print_warning
        self._queue: queue.Queue | None = None
        self._worker: threading.Thread | None = None
        self._finished = False
        self._warned = False

    # -- start -----------------------------------------------------------------------------

    @classmethod
    def start(cls, cfg_dict: dict, ds_config: dict, *, output_dir: str, run_name: str, uri: str | None = None,
              experiment: str = "desmoe", resume: bool = False, tags: dict[str, str] | None = None,
              warn: typing.Callable[[str], None] | None = None) -> Tracker:
        """Open (or with ``resume`` continue) the MLflow run of ``output_dir``; disabled on any failure.

        ``warn`` prints the one warning (default: stderr); pass the progress bar's writer to keep
        the bar intact."""
        tracker = cls()
        tracker.output_dir = os.path.abspath(output_dir)
        tracker.uri = uri or default_uri(tracker.output_dir)
        if warn is not None:
            tracker._warn = warn
        try:
            tracker._open(cfg_dict, ds_config, run_name, experiment, resume, tags or {})
        except Exception as e:  # noqa: BLE001 -- tracking must never stop training
            tracker._fail(e)
            return tracker
        tracker.enabled = True
        tracker._queue = queue.Queue()
        tracker._worker = threading.Thread(target=tracker._serve, name="desmoe-mlflow", daemon=True)
        tracker._worker.start()
        for name in START_ARTIFACTS:
            path = os.path.join(tracker.output_dir, name)
            if os.path.isfile(path):
                tracker.log_artifact(path)
        return tracker

    def _open(self, cfg_dict, ds_config, run_name, experiment, resume, tags) -> None:
        client_cls = _import_mlflow()
        self._client = client = client_cls(tracking_uri=self.uri)
        run = self._resumable_run() if resume else None
        if run is None:
            exp = client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp is not None else self._create_experiment(experiment)
            run = client.create_run(exp_id, run_name=run_name)
        else:
            client.update_run(run.info.run_id, status="RUNNING")
        self.run_id = run.info.run_id

        params = flatten(cfg_dict)
        params.update(flatten(ds_config, "ds."))
        params = {clean_key(k): _clip(v, MAX_PARAM_LENGTH) for k, v in params.items()}
        logged = run.data.params  # empty for a new run
        changed = sorted(k for k in params if k in logged and logged[k] != params[k])
        all_tags = {"desmoe.output_dir": self.output_dir, **tags}
        mode = cfg_dict.get("method", {}).get("mode")
        if mode is not None:
            all_tags["desmoe.mode"] = str(mode)
        if changed:
            # MLflow params are immutable: keep the first values, note what the resumed run changed
            all_tags["desmoe.resume_changed_params"] = ", ".join(f"{k}={params[k]}" for k in changed)
        from mlflow.entities import Param, RunTag

        new = [Param(k, v) for k, v in params.items() if k not in logged]
        for batch in _chunks(new, MAX_PARAMS_PER_BATCH):
            client.log_batch(self.run_id, params=batch)
        tag_list = [RunTag(clean_key(k), _clip(str(v), MAX_TAG_LENGTH)) for k, v in all_tags.items()]
        for batch in _chunks(tag_list, MAX_PARAMS_PER_BATCH):
            client.log_batch(self.run_id, tags=batch)

        os.makedirs(self.output_dir, exist_ok=True)
        with open(os.path.join(self.output_dir, RUN_FILE), "w", encoding="utf-8") as f:
            json.dump({"run_id": self.run_id, "experiment_id": run.info.experiment_id, "tracking_uri": self.uri}, f,
                      indent=2)

    def _resumable_run(self):
        """The run named by output_dir/mlflow_run.json if it is on this URI and not deleted, else None."""
        try:
            with open(os.path.join(self.output_dir, RUN_FILE), encoding="utf-8") as f:
                saved = json.load(f)
        except (OSError, ValueError):
            return None
        if saved.get("tracking_uri") != self.uri or not saved.get("run_id"):
            return None
        from mlflow.exceptions import MlflowException

        try:
            run = self._client.get_run(saved["run_id"])
        except MlflowException as e:
            if getattr(e, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise  # the store itself is unreachable: the caller warns once
        return run if run.info.lifecycle_stage == "active" else None

    def _create_experiment(self, name: str) -> str:
        artifact_location = None
        if self.uri.startswith("sqlite:///"):
            # NOTE: MLflow's default for a sqlite store is ./mlruns under the current directory;
            # keep artifacts beside the database instead.
            db = self.uri[len("sqlite:///"):]
            artifact_location = "file://" + os.path.join(os.path.dirname(os.path.abspath(db)), "mlartifacts")
        from mlflow.exceptions import MlflowException

        try:
            return self._client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:
            exp = self._client.get_experiment_by_name(name)  # another run created it meanwhile
            if exp is None:
                raise
            return exp.experiment_id

    # -- logging ---------------------------------------------------------------------------

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue one step's metrics (non-numeric values are skipped)."""
        self.log_many([(step, metrics)])

    def log_many(self, records: list[tuple[int, dict[str, float]]]) -> None:
        """Queue several steps' metrics, e.g. every step of one log interval: ``[(step, {name: value})]``."""
        if self.enabled and records:
            records = [(step, dict(values)) for step, values in records]  # the caller may reuse its dicts
            self._queue.put((self._send_metrics, (records, int(time.time() * 1000))))

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        """Queue a local file or folder to be copied into the run's artifacts (under ``artifact_path``).

        A path that does not exist is reported and skipped; tracking stays on."""
        if not self.enabled:
            return
        if not os.path.exists(path):
            self._warn(f"MLflow: {path} does not exist; not logged as an artifact.")
            return
        send = self._client.log_artifacts if os.path.isdir(path) else self._client.log_artifact
        self._queue.put((send, (self.run_id, path, artifact_path)))

    def finish(self, status: str = "FINISHED") -> None:
        """Send what is queued, end the run with ``status`` (FINISHED / FAILED / KILLED), stop the thread.

        Waits at most FINISH_WAIT_S; later calls do nothing."""
        if status not in STATUSES:
            raise ValueError(f"Tracker.finish: status {status!r} is not one of {', '.join(STATUSES)}")
        if self._finished or self._worker is None:
            return
        self._finished = True
        self._queue.put((self._client.set_terminated, (self.run_id, status)))
        self._queue.put(None)  # also ends a thread that stopped sending after a failure
        self._worker.join(FINISH_WAIT_S)
        if self._worker.is_alive():
            self._fail(TimeoutError(f"MLflow did not answer within {FINISH_WAIT_S:.0f} s at the end of the run"))
        self.enabled = False  # the run is over: later calls do nothing

    # -- the background thread -------------------------------------------------------------

    def _send_metrics(self, records, timestamp_ms: int) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(clean_key(name), number, timestamp_ms, int(step))
                   for step, values in records for name, value in values.items()
                   if (number := _as_float(value)) is not None]
        for batch in _chunks(metrics, MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=batch)

    def _serve(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if not self.enabled:
                continue  # failed earlier: drain without sending
            fn, args = item
            try:
                fn(*args)
            except Exception as e:  # noqa: BLE001 -- tracking must never stop training
                self._fail(e)

    def _fail(self, err: BaseException) -> None:
        """Disable the tracker and say so, once."""
        self.enabled = False
        if not self._warned:
            self._warned = True
            where = os.path.join(self.output_dir, "metrics.jsonl")
            self._warn(f"MLflow tracking at {self.uri} failed ({_short(err)}). MLflow logging is off for the rest "
                       f"of this run; {where} still has every metric.")
