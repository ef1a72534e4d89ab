"""Prometheus text exposition (format 0.0.4) of the server's counters, gauges and summaries.

A tiny thread-safe registry plus an ``http.server`` in a daemon thread that serves ``GET /metrics``.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from fedhft.errors import FedHFTError

if TYPE_CHECKING:
    from fedhft.broker_server.federation import Federation

Labels = tuple[tuple[str, str], ...]

FAMILIES: dict[str, tuple[str, str]] = {
    "fedhft_updates_total": ("counter", "Updates received, by verdict (accepted|duplicate|rejected|error) and reason."),
    "fedhft_updates_clipped_total": ("counter", "Accepted updates whose ΔW norm was clipped to --clip-norm."),
    "fedhft_hellos_total": ("counter", "Hello messages, by status (accepted|rejected) and reason."),
    "fedhft_aggregation_seconds": ("summary", "Wall time of one aggregation (math and durable commit)."),
    "fedhft_publish_seconds": ("summary", "Wall time of factoring, signing and publishing one version's models."),
    "fedhft_model_version": ("gauge", "The current global model version."),
    "fedhft_pending_updates": ("gauge", "Accepted updates waiting for the next aggregation."),
    "fedhft_clients": ("gauge", "Registered clients, by the cluster of their largest membership."),
    "fedhft_clients_soft": ("gauge", "Registered clients' summed memberships, by cluster."),
    "fedhft_clusters": ("gauge", "Number of clusters."),
    "fedhft_rank_collapse_ratio": (
        "gauge",
        "Per cluster: energy of singular directions r_low..R-1 over the top r_low of its ΔW (mean over modules).",
    ),
    "fedhft_ready": ("gauge", "1 once the server is subscribed to its topics."),
    "fedhft_virtual_time": ("gauge", "--virtual-time: the simulated fleet's clock at the latest flush (seconds)."),
    "fedhft_virtual_dropped_total": ("counter", "--virtual-time: devices dropped (schedule or promise unanswered)."),
}


class MetricsError(FedHFTError):
    """The metrics endpoint cannot be served."""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


def _number(x: float) -> str:
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


@dataclass
class _Summary:
    total: float = 0.0
    count: int = 0


class Metrics:
    """Counters, gauges and summaries keyed by (family, labels)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, dict[Labels, float]] = {}
        self._summaries: dict[str, _Summary] = {}

    @staticmethod
    def _key(labels: dict[str, str] | None) -> Labels:
        return tuple(sorted((labels or {}).items()))

    def inc(self, name: str, labels: dict[str, str] | None = None, value: float = 1.0) -> None:
        with self._lock:
            family = self._values.setdefault(name, {})
            key = self._key(labels)
            family[key] = family.get(key, 0.0) + value

    def set(self, name: str, value: float, labels: dict[str, str] | None = None) -> None:
        with self._lock:
            self._values.setdefault(name, {})[self._key(labels)] = float(value)

    def replace(self, name: str, values: dict[Labels, float]) -> None:
        """Replace every sample of a gauge family (e.g. per-cluster gauges when K changes)."""
        with self._lock:
            self._values[name] = dict(values)

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            s = self._summaries.setdefault(name, _Summary())
            s.total += value
            s.count += 1

    def get(self, name: str, labels: dict[str, str] | None = None) -> float:
        with self._lock:
            return self._values.get(name, {}).get(self._key(labels), 0.0)

    def render(self) -> str:
        """The exposition text of every family."""
        lines: list[str] = []
        with self._lock:
            for name, (kind, help_text) in FAMILIES.items():
                lines.append(f"# HELP {name} {help_text}")
                lines.append(f"# TYPE {name} {kind}")
                if kind == "summary":
                    s = self._summaries.get(name, _Summary())
                    lines.append(f"{name}_sum {_number(s.total)}")
                    lines.append(f"{name}_count {s.count}")
                    continue
                for labels, value in sorted(self._values.get(name, {}).items()):
                    lines.append(f"{name}{_labels(labels)} {_number(value)}")
        return "\n".join(lines) + "\n"


def refresh_gauges(metrics: Metrics, federation: Federation) -> None:
    """Set the gauges that describe the federation now: version, pending updates, clusters and their clients."""
    f = federation
    metrics.set("fedhft_model_version", f.version)
    metrics.set("fedhft_pending_updates", len(f.pending))
    metrics.set("fedhft_clusters", f.num_clusters)
    figures = f.cluster_figures()
    metrics.replace("fedhft_clients", {(("cluster", str(c)),): float(n) for c, n in enumerate(figures.hard)})
    metrics.replace("fedhft_clients_soft", {(("cluster", str(c)),): n for c, n in enumerate(figures.soft)})
    if f.version > 0:
        ratios = f.collapse_ratios()
        metrics.replace("fedhft_rank_collapse_ratio", {(("cluster", str(c)),): r for c, r in enumerate(ratios)})


class MetricsServer:
    """Serves ``metrics.render()`` on http://host:port/metrics from a daemon thread."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        registry = metrics

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server naming
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404)
                    return
                body = registry.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
                return

        try:
            self.httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise MetricsError(f"cannot serve metrics on {host}:{port} ({exc.strerror or exc})") from exc
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="fedhft-metrics", daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> MetricsServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def parse_metrics(text: str) -> dict[str, float]:
    """``{'name{labels}': value}`` of an exposition text (for tests and tools)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        out[key] = float(value)
    return out
