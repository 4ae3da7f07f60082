"""raddraft's Prometheus metrics, in a registry of its own (nothing from other libraries leaks in).

Other modules record events with three calls: :func:`record_instance` (a DICOM instance arrived, by outcome),
:func:`observe_task` (a pipeline task took so many seconds) and :func:`record_delivery` (a DICOM or HL7
delivery succeeded or failed). Two gauges are read at scrape time through hooks: studies by episode state and
the broker's queue depths. :func:`configure` installs both: the episode states from a source the caller gives (the
state store: this module imports no stage package), the queue depths from the broker of the settings;
:func:`set_study_state_source` / :func:`set_queue_depth_source` replace them. ``raddraft serve`` calls it at start-up
(its ``/metrics`` is on the worklist port), so does ``raddraft worker --http-port`` (a gpu worker, which has no
index: the queue depths only).

Who records: the DICOM receiver (every arrival: ``stored``, ``duplicate``, ``replaced``, ``rejected``), the
Celery task signals of workers/tasks.py (every task's wall time, by the name after ``raddraft.``), the pipeline's
and the worklist's deliveries (every attempt, ``ok`` or ``failed``). Counters live in the process that records
them: ``raddraft serve`` serves its ``/metrics`` on the worklist port (``core.http``), with the embedded
broker its in-process workers' counts included. A separate ``raddraft worker`` process (Redis) records into its
own registry and serves it with ``--http-port``.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from core import probes
from core.settings import Settings
from core.states import EpisodeState

log = logging.getLogger(__name__)

DeliveryKind = Literal["dicom", "dicomweb", "hl7"]
StateSource = Callable[[], Mapping[str, int]]
DepthSource = Callable[[], Mapping[str, int]]

QUEUES: tuple[str, ...] = ("io", "gpu")  # workers.celery_app.IO_QUEUE / GPU_QUEUE
EPISODE_STATES: tuple[str, ...] = tuple(str(state) for state in EpisodeState)  # always exported, 0 when none
TASK_BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)
_LABEL_VALUE = re.compile(r"^[a-z][a-z0-9_.-]{0,47}$")  # keeps label values few and free of patient data

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)

INSTANCES = Counter("raddraft_instances_received", "DICOM instances received, by outcome (stored, duplicate, "
                    "replaced, rejected …)", ["outcome"], registry=REGISTRY)
TASK_SECONDS = Histogram("raddraft_task_seconds", "Wall time of pipeline tasks, by task name", ["task"],
                         buckets=TASK_BUCKETS, registry=REGISTRY)
DELIVERIES = Counter("raddraft_deliveries",
                     "Result deliveries, by kind (dicom, dicomweb, hl7) and outcome (ok, failed)",
                     ["kind", "outcome"], registry=REGISTRY)


def _label(value: str, what: str) -> str:
    if not _LABEL_VALUE.match(value):
        raise ValueError(f"metric label {what}={value!r} must be 1-48 lowercase letters, digits, '_', '.', '-' "
                         "starting with a letter")
    return value


def record_instance(outcome: str) -> None:
    """One DICOM instance arrived with *outcome* (e.g. ``stored``, ``duplicate``, ``rejected``)."""
    INSTANCES.labels(outcome=_label(outcome, "outcome")).inc()


def observe_task(name: str, seconds: float) -> None:
    """A pipeline task (``prepare``, ``infer``, ``report``, ``deliver`` …) took *seconds*."""
    if seconds < 0:
        raise ValueError(f"task duration {seconds} must not be negative")
    TASK_SECONDS.labels(task=_label(name, "task")).observe(seconds)


def record_delivery(kind: DeliveryKind, ok: bool) -> None:
    """One delivery of results over DICOM or HL7 ended."""
    if kind not in ("dicom", "dicomweb", "hl7"):
        raise ValueError(f"delivery kind {kind!r} must be 'dicom', 'dicomweb' or 'hl7'")
    DELIVERIES.labels(kind=kind, outcome="ok" if ok else "failed").inc()


class _ScrapeTimeGauges(Collector):
    """Studies by state and queue depths, read through the installed hooks when Prometheus scrapes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.states: StateSource | None = None
        self.depths: DepthSource | None = None

    def describe(self) -> list[Metric]:
        return []  # values come from hooks at scrape time; nothing to describe at registration

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            states, depths = self.states, self.depths
        if states is not None:
            try:
                counts = dict(states())
            except Exception as exc:  # a broken hook must not break the other metrics
                log.warning("studies-by-state gauge skipped: %s", exc)
            else:
                family = GaugeMetricFamily("raddraft_study_episodes", "Study episodes by state", labels=["state"])
                for state in sorted(set(EPISODE_STATES) | set(counts)):
                    family.add_metric([state], counts.get(state, 0))
                yield family
        if depths is not None:
            family = GaugeMetricFamily("raddraft_queue_depth", "Messages waiting in each broker queue; -1 when the "
                                       "broker cannot be read", labels=["queue"])
            try:
                values = dict(depths())
            except Exception as exc:
                log.warning("queue depths unavailable: %s", exc)
                values = dict.fromkeys(QUEUES, -1)
            for queue, depth in sorted(values.items()):
                family.add_metric([queue], depth)
            yield family


_GAUGES = _ScrapeTimeGauges()
REGISTRY.register(_GAUGES)


def set_study_state_source(source: StateSource | None) -> None:
    """Install the hook returning ``{state: number of episodes}`` (None removes the gauge)."""
    with _GAUGES._lock:
        _GAUGES.states = source


def set_queue_depth_source(source: DepthSource | None) -> None:
    """Install the hook returning ``{queue: messages waiting}`` (None removes the gauge)."""
    with _GAUGES._lock:
        _GAUGES.depths = source


def broker_depths(settings: Settings, queues: Sequence[str] = QUEUES,
                  timeout: float = probes.DEFAULT_TIMEOUT_S) -> DepthSource:
    """Queue depths read from the broker with a short timeout."""
    return lambda: probes.queue_depths(settings.effective_broker_url, queues, timeout)


def configure(settings: Settings, study_states: StateSource) -> None:
    """The hooks of a node process: episode states from *study_states* (the state store:
    ``state.store.episode_state_counts``), queue depths from its broker."""
    set_study_state_source(study_states)
    set_queue_depth_source(broker_depths(settings))


def exposition() -> bytes:
    """The registry in the Prometheus text format."""
    return generate_latest(REGISTRY)
