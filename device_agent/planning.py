"""Fresh inputs for the partitioner on a running device agent, and the plan per request.

`Planner` holds the device's cost profile (measured at start-up, cached), a `LinkEstimator`
fed by every transfer, and what it last heard from the edge (its profile once, its load
every `describe_interval_seconds`). A background thread polls the edge's load (each poll
is also an RTT sample) and probes the link when no transfer has taught it for a while and
no request is running. `plan()` is then a pure function call over these numbers.

It takes the planner and energy settings groups, which `coinfer plan` shares, so the what-if
prices cuts as the agent does; of the edge connection only the few numbers it polls by.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from coinfer import codec_accuracy
from coinfer import profile as profiles
from coinfer.config_values import split_list
from coinfer.planning import partitioner as part
from coinfer.planning.cost_profile import CostProfile
from coinfer.planning.link import LinkEstimator, probe_plan
from coinfer.planning.settings import EnergySettings, PlannerSettings, objective_of
from device_agent.config import ConnectionSettings
from device_agent.edge.client import EdgeError, Exchange
from device_agent.edge.pool import EdgePool
from device_agent.metrics import AgentMetrics

log = logging.getLogger("coinfer.device")


@dataclass
class EdgeLoad:
    active_sessions: int = 0
    queue_seconds: float = 0.0
    busy_fraction: float = 0.0
    at: float = 0.0  # monotonic time of the Describe it came from


class Planner:
    def __init__(
        self,
        settings: PlannerSettings,
        energy: EnergySettings,
        device: CostProfile,
        edge: EdgePool | None,
        metrics: AgentMetrics | None = None,
        fingerprint: str = "",
        *,
        model_dir: str | None = None,
        connection: ConnectionSettings | None = None,
    ) -> None:
        """model_dir: where `coinfer calibrate` left the codecs' accuracy (None: no accuracy budget can
        admit a lossy codec); connection: the edge connection's settings, of which the planner reads
        how often to poll the edge, when to probe the link and how long a refresh for a plan may take."""
        self.settings, self.energy, self.device, self.edge = settings, energy, device, edge
        self.fingerprint = fingerprint
        self.connection = connection or ConnectionSettings.model_validate({})  # its defaults
        # accuracy of each lossy codec at each cut, calibrated into the model dir (coinfer calibrate)
        table = codec_accuracy.load(model_dir, fingerprint or None) if model_dir is not None else None
        self.agreement = table.agreements() if table else None
        self.metrics = metrics or AgentMetrics()
        self.link = LinkEstimator()
        self.edge_profile: CostProfile | None = None
        self.load = EdgeLoad()
        self.reachable = False
        self.active = 0  # requests in flight (no probing while they use the link); begin() / end()
        self._epoch = 0  # bumped whenever a request starts or ends: a sample spanning a bump overlapped one
        self.skipped = 0  # exchanges not learned from because other traffic shared the link
        self._generation = 0  # the edge pool's generation the edge profile belongs to
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- background refresh -------------------------------------------------------------------
    def start(self) -> None:
        if self.edge is not None and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="edge-monitor", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while True:
            self.refresh()
            if self.reachable and self.active == 0 and self.link.stale(self.connection.link_max_age_seconds):
                self.probe()
            if self._stop.wait(self.connection.describe_interval_seconds):
                return

    def refresh(self, timeout: float | None = None) -> bool:
        """Describe the edge: load always, its cost profile until we have it. False when unreachable."""
        edge = self.edge
        if edge is None:  # no edge configured: nothing to describe
            return False
        quiet = self.quiet(0)
        generation = edge.generation  # the pool failed over since: a new edge, whose profile we need
        try:
            reply, ex = edge.describe_timed(self.edge_profile is None or generation != self._generation, timeout)
        except EdgeError as e:
            if self.reachable:
                log.warning("edge %s unreachable for planning (%s)", edge.address, e.code.name)
            self.reachable = False
            return False
        self.observe(ex, quiet)
        with self._lock:
            self.load = EdgeLoad(
                reply.load.active_sessions, reply.load.queue_seconds, reply.load.busy_fraction, time.monotonic()
            )
            if reply.HasField("profile"):
                try:
                    self.edge_profile = profiles.from_pb(reply.profile)
                    self._generation = generation
                except ValueError as e:
                    log.warning("edge sent an unusable cost profile: %s", e)
            # an edge with other weights cannot take a session: plan as if it were not there
            self.reachable = not self.fingerprint or reply.fingerprint == self.fingerprint
        self.metrics.edge_queue.set(self.load.queue_seconds)
        return self.reachable

    def probe(self) -> None:
        """Active measurement: a tiny echo (RTT) and one per direction sized to the current estimate."""
        edge = self.edge
        if edge is None:  # no edge configured: no link to measure
            return
        try:
            for up, down in probe_plan(self.link.estimate()):
                quiet = self.quiet(0)
                self.observe(edge.probe(up, down), quiet)
        except EdgeError as e:
            log.info("link probe failed: %s", e)

    def begin(self) -> None:
        with self._lock:
            self.active += 1
            self._epoch += 1

    def end(self) -> None:
        with self._lock:
            self.active -= 1
            self._epoch += 1

    def quiet(self, own: int) -> int | None:
        """A token for an exchange about to start, when exactly `own` requests use the link (else None).
        Why: bytes of another transfer ahead on the same connection (a prefill, another session)
        would be taken for RTT or a slow link: a Describe stuck behind a 4 s prefill is no RTT sample."""
        with self._lock:
            return self._epoch if self.active == own else None

    def observe(self, ex: Exchange, quiet: int | None) -> None:
        """Learn from an exchange that started with `quiet` = self.quiet(...), if nothing overlapped it."""
        with self._lock:
            if quiet is None or quiet != self._epoch:
                self.skipped += 1
                return
        self.link.observe(ex.bytes_up, ex.bytes_down, ex.wall, ex.edge_seconds)
        log.debug(
            "link sample: up %d B, down %d B, wall %.4f s, edge %.4f s -> %s",
            ex.bytes_up,
            ex.bytes_down,
            ex.wall,
            ex.edge_seconds,
            self.link.estimate(),
        )
        est = self.link.estimate()
        self.metrics.link_bandwidth.labels("up").set(est.up_bytes_per_second)
        self.metrics.link_bandwidth.labels("down").set(est.down_bytes_per_second)
        self.metrics.link_rtt.set(est.rtt_seconds)
        self.metrics.link_changes.set(self.link.snapshot()["changes"])

    # -- planning ---------------------------------------------------------------------------
    def edge_view(self) -> part.EdgeView | None:
        if self.edge is None:
            return None
        if self.edge_profile is None or not self.reachable:
            self.refresh(timeout=min(1.0, self.connection.connect_timeout_seconds))
        with self._lock:
            if self.edge_profile is None or not self.reachable:
                return None
            return part.EdgeView(self.edge_profile, self.load.queue_seconds)

    def constraints(self, codec: str | None = None, min_agreement: float | None = None) -> part.Constraints:
        s = self.settings
        codecs = (codec,) if codec else tuple(split_list(s.plan_codecs))
        budget = s.min_agreement if min_agreement is None else min_agreement
        return part.Constraints(
            min_device_layers=s.min_device_layers,
            max_device_layers=self.device.stop,
            codecs=codecs,
            min_agreement=budget,
            agreement=self.agreement,
        )

    def objective(self) -> part.Objective:
        return objective_of(self.settings, self.energy)

    def plan(
        self,
        prompt_tokens: int,
        new_tokens: int,
        codec: str | None = None,
        min_agreement: float | None = None,
        cached: dict[int, int] | None = None,
    ) -> part.Plan:
        """The plan for one request from the freshest estimates. Raises partitioner.PlanError.

        cached: per split, prompt positions the edge probably holds from an earlier turn.
        """
        edge = self.edge_view()
        p = part.plan(
            self.device,
            edge,
            self.link.estimate(),
            prompt_tokens,
            new_tokens,
            self.constraints(codec, min_agreement),
            self.objective(),
            cached,
        )
        self.metrics.plan_predicted.set(p.best.total)
        return p

    def snapshot(self) -> dict:
        with self._lock:
            load = self.load
        return {
            "link": {**self.link.snapshot(), "skipped_overlapping": self.skipped},
            "edge": None
            if self.edge is None
            else {
                "address": self.edge.address,
                "reachable": self.reachable,
                "profile": self.edge_profile is not None,
                "active_sessions": load.active_sessions,
                "queue_seconds": load.queue_seconds,
                "busy_fraction": load.busy_fraction,
                "load_age_seconds": time.monotonic() - load.at if load.at else None,
            },
            "device": {
                "layers": self.device.stop,
                "precision": self.device.precision,
                "slowdown": self.device.slowdown,
            },
        }
