"""Counters, gauges and histograms in the Prometheus text exposition format (no client library)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable

Labels = tuple[tuple[str, str], ...]

PREFIX = "captcha_solver_"
# Solve durations: an image captcha takes seconds, a reCAPTCHA 10 s to a minute or two, and a
# task gives up at provider.task_timeout (180 s by default).
SOLVE_DURATION_BUCKETS = (
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    45.0,
    60.0,
    90.0,
    120.0,
    180.0,
    300.0,
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(int(value)) if float(value).is_integer() else repr(float(value))


class _Histogram:
    """One labelled histogram: per label set, a count per bucket (not cumulative), sum, count."""

    def __init__(self, buckets: Iterable[float]) -> None:
        bounds = sorted(float(b) for b in buckets)
        if not bounds or len(set(bounds)) != len(bounds) or any(math.isinf(b) for b in bounds):
            raise ValueError("histogram buckets must be distinct finite numbers")
        self.bounds = bounds
        self.series: dict[Labels, tuple[list[int], list[float]]] = {}

    def observe(self, labels: Labels, value: float) -> None:
        counts, totals = self.series.setdefault(labels, ([0] * (len(self.bounds) + 1), [0.0]))
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                counts[i] += 1
                break
        else:
            counts[-1] += 1  # only +Inf holds it
        totals[0] += value

    def samples(self, full: str) -> Iterable[str]:
        for labels, (counts, totals) in sorted(self.series.items()):
            cumulative = 0
            for bound, count in zip([*self.bounds, math.inf], counts, strict=True):
                cumulative += count
                le = (("le", _number(bound)),)
                yield f"{full}_bucket{_labels(labels + le)} {cumulative}"
            yield f"{full}_sum{_labels(labels)} {_number(totals[0])}"
            yield f"{full}_count{_labels(labels)} {cumulative}"


class Metrics:
    """A tiny registry: labelled counters and histograms, plus gauges read from callbacks at
    scrape time."""

    def __init__(self) -> None:
        self._help: dict[str, tuple[str, str]] = {}
        self._counters: dict[str, defaultdict[Labels, float]] = {}
        self._gauges: dict[str, Callable[[], Iterable[tuple[Labels, float]]]] = {}
        self._histograms: dict[str, _Histogram] = {}

    def counter(self, name: str, help_text: str) -> None:
        self._help[name] = ("counter", help_text)
        self._counters.setdefault(name, defaultdict(float))

    def gauge(
        self, name: str, help_text: str, read: Callable[[], Iterable[tuple[Labels, float]]]
    ) -> None:
        self._help[name] = ("gauge", help_text)
        self._gauges[name] = read

    def histogram(self, name: str, help_text: str, buckets: Iterable[float]) -> None:
        """A histogram with these upper bounds (``+Inf`` is added); observe with labels."""
        self._help[name] = ("histogram", help_text)
        self._histograms.setdefault(name, _Histogram(buckets))

    def observe(self, name: str, value: float, **labels: str) -> None:
        if "le" in labels:
            raise ValueError("'le' is the bucket label of a histogram")
        self._histograms[name].observe(tuple(sorted(labels.items())), float(value))

    def histogram_count(self, name: str, **labels: str) -> int:
        """How many observations a histogram's label set holds (0: none)."""
        series = self._histograms[name].series.get(tuple(sorted(labels.items())))
        return 0 if series is None else sum(series[0])

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        self._counters[name][tuple(sorted(labels.items()))] += amount

    def value(self, name: str, **labels: str) -> float:
        return self._counters[name].get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> str:
        lines: list[str] = []
        for name, (kind, help_text) in self._help.items():
            full = PREFIX + name
            lines.append(f"# HELP {full} {help_text}")
            lines.append(f"# TYPE {full} {kind}")
            if kind == "histogram":
                lines.extend(self._histograms[name].samples(full))
                continue
            if kind == "counter":
                samples: Iterable[tuple[Labels, float]] = sorted(self._counters[name].items())
            else:
                samples = self._gauges[name]()
            lines.extend(f"{full}{_labels(lab)} {_number(val)}" for lab, val in samples)
        return "\n".join(lines) + "\n"


def new_metrics() -> Metrics:
    """The worker's counters and histogram (gauges are added by the service, which owns their
    sources)."""
    m = Metrics()
    m.counter("solves_total", "Solve requests finished, by outcome.")
    m.counter("provider_errors_total", "Error answers and failures from the provider, by code.")
    m.counter("provider_requests_total", "HTTP requests sent to the provider, by endpoint.")
    m.counter("vault_errors_total", "Failed Vault operations, by kind.")
    m.counter("key_refreshes_total", "Key reads from Vault, by reason and result.")
    m.histogram(
        "solve_duration_seconds",
        "Wall time of POST /solve requests, by method and outcome.",
        SOLVE_DURATION_BUCKETS,
    )
    return m
