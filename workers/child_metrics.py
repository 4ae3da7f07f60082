"""``raddraft serve``'s ``/metrics`` with its worker processes' counts (the embedded broker, workers/supervisor.py).

Task times and deliveries are recorded where they happen, in the io and gpu worker processes (core/metrics.py);
each child serves its own ``/metrics`` on a loopback port serve gave it. :func:`include_children` takes those
families out of serve's registry (serve itself records none of them when its workers are processes) and puts in a
collector that reads them from every child at scrape time and sums them, so serve's one ``/metrics`` counts what
the whole gateway did, as it did with in-process workers. A child that does not answer (restarting) is left out of
that scrape; a child's counts start again from zero when it is restarted, as any process's counters do.
"""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Callable, Iterator, Sequence

from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from core import metrics

log = logging.getLogger(__name__)

SCRAPE_TIMEOUT_S = 1.0


class ChildMetrics(Collector):
    """The families named *names*, read from each ``/metrics`` URL *urls* returns, summed sample by sample."""

    def __init__(self, urls: Callable[[], Sequence[str]], names: Sequence[str]) -> None:
        self._urls = urls
        self._names = set(names)

    def describe(self) -> list[Metric]:
        return []  # nothing to check at registration: the families are read at scrape time

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        sums: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        for url in self._urls():
            try:
                with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
                    text = response.read().decode()
            except OSError as exc:
                log.debug("worker metrics %s not read: %s", url, exc)
                continue
            for family in text_string_to_metric_families(text):
                if family.name not in self._names:
                    continue
                families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                samples = sums.setdefault(family.name, {})
                for sample in family.samples:
                    if sample.name.endswith("_created"):
                        continue  # a creation time, not a count: not summed
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    samples[key] = samples.get(key, 0.0) + sample.value
        for name, family in families.items():
            for (sample_name, labels), value in sums[name].items():
                family.add_sample(sample_name, dict(labels), value)
            yield family


def include_children(urls: Callable[[], Sequence[str]]) -> ChildMetrics:
    """Serve's registry gets the worker processes' task and delivery families instead of its own (empty) ones."""
    for own in (metrics.TASK_SECONDS, metrics.DELIVERIES):
        metrics.REGISTRY.unregister(own)
    collector = ChildMetrics(urls, ["raddraft_task_seconds", "raddraft_deliveries"])
    metrics.REGISTRY.register(collector)
    return collector
