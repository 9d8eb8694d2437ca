"""Counters and gauges in the Prometheus text exposition format (no client library needed)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable

Labels = tuple[tuple[str, str], ...]

PREFIX = "captcha_solver_"


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


class Metrics:
    """A tiny registry: labelled counters, plus gauges read from callbacks at scrape time."""

    def __init__(self) -> None:
        self._help: dict[str, tuple[str, str]] = {}
        self._counters: dict[str, defaultdict[Labels, float]] = {}
        self._gauges: dict[str, Callable[[], Iterable[tuple[Labels, float]]]] = {}

    def counter(self, name: str, help_text: str) -> None:
        self._help[name] = ("counter", help_text)
        self._counters.setdefault(name, defaultdict(float))

    def gauge(
        self, name: str, help_text: str, read: Callable[[], Iterable[tuple[Labels, float]]]
    ) -> None:
        self._help[name] = ("gauge", help_text)
        self._gauges[name] = read

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
            if kind == "counter":
                samples: Iterable[tuple[Labels, float]] = sorted(self._counters[name].items())
            else:
                samples = self._gauges[name]()
            lines.extend(f"{full}{_labels(lab)} {_number(val)}" for lab, val in samples)
        return "\n".join(lines) + "\n"


def new_metrics() -> Metrics:
    """The worker's counters (gauges are added by the service, which owns their sources)."""
    m = Metrics()
    m.counter("solves_total", "Solve requests finished, by outcome.")
    m.counter("provider_errors_total", "Error answers and failures from the provider, by code.")
    m.counter("provider_requests_total", "HTTP requests sent to the provider, by endpoint.")
    m.counter("vault_errors_total", "Failed Vault operations, by kind.")
    m.counter("key_refreshes_total", "Key reads from Vault, by reason and result.")
    return m
