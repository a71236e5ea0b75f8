"""The one settings object, built from the environment in one place (SPEC §9)."""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from cgrid.errors import ConfigError
from cgrid.redis_url import check_url as check_redis_url
from cgrid.redis_url import mask_url
from cgrid.routing import DELIVER_QUEUE, RETRY_QUEUE, Routing, check_queue_name, check_routing, parse_buyer_queues

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DAY_S = 86_400
REDIS_SOCKET_TIMEOUT_S = 5.0  # the long-lived Redis clients (cgrid/redis_conn.py)


def _number(env: Mapping[str, str], name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not a number") from None
    if not math.isfinite(value) or value < minimum:
        raise ConfigError(f"{name}: {raw!r} must be a finite number >= {minimum}")
    return value


def _integer(env: Mapping[str, str], name: str, default: int, *, minimum: int = 1) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not a whole number") from None
    if value < minimum:
        raise ConfigError(f"{name}: {raw!r} must be >= {minimum}")
    return value


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in {"1", "on", "true", "yes"}:
        return True
    if raw in {"0", "off", "false", "no"}:
        return False
    raise ConfigError(f"{name}: {raw!r} is not on/off")


def default_wait_replicas(env: Mapping[str, str]) -> int:
    """Behind Sentinel an accepted event must be on a replica before it counts, unless the
    operator says otherwise: a failover must not lose it."""
    if env.get("CGRID_REDIS_URL", "").strip().startswith("sentinel://"):
        return 1
    return 1 if _flag(env, "CGRID_REDIS_CLUSTER", False) else 0


def parse_networks(raw: str, name: str = "CGRID_ALLOWED_NETWORKS") -> tuple[IPNetwork, ...]:
    """Comma-separated CIDRs (``127.0.0.0/8, ::1/128``) into network objects."""
    networks = []
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ConfigError(f"{name}: {part!r} is not a CIDR network") from None
    return tuple(networks)


@dataclass(frozen=True)
class Settings:
    """Every knob of the fleet. Names of the SPEC §9 variables are fixed; the rest are ours."""

    redis_url: str = "redis://localhost:6379/0"
    # CGRID_BROKER_URL: Celery's broker (and Flower's); '' = the ledger's Redis, CGRID_REDIS_URL
    broker_url: str = ""
    # CGRID_REDIS_CLUSTER: CGRID_REDIS_URL names a node of a Redis Cluster; the ledger is spread
    # over its primaries in partitions (cgrid/ledger/partitions.py)
    redis_cluster: bool = False
    # How Redis is reached beyond the URL (cgrid/redis_conn.py):
    redis_master_name: str = "mymaster"  # CGRID_REDIS_MASTER_NAME: the primary's name in Sentinel
    redis_sentinel_password: str = ""  # CGRID_REDIS_SENTINEL_PASSWORD: the sentinels' own password
    redis_sentinel_tls: bool = False  # CGRID_REDIS_SENTINEL_TLS: TLS to the sentinels and the nodes
    redis_ca_file: str = ""  # CGRID_REDIS_CA_FILE: CA bundle for TLS (else the system's)
    redis_cert_file: str = ""  # CGRID_REDIS_CERT_FILE: client certificate for rediss://
    redis_key_file: str = ""  # CGRID_REDIS_KEY_FILE: its private key
    # CGRID_REDIS_WAIT_REPLICAS: replicas that must hold an accepted event before it counts
    # (Redis WAIT), so a failover loses none (docs/redis.md). Unset: 1 with a sentinel:// URL,
    # else 0.
    redis_wait_replicas: int = 0
    redis_wait_timeout_ms: int = 500
    timeout_s: float = 2.0
    retry_delay_s: float = 10.0
    allowed_networks: tuple[IPNetwork, ...] = ()
    # 45 minutes: at 500 M events a day the hot window fits a 32 GB Redis (docs/scaling.md);
    # older final records are in the archive (docs/archive.md). Also the duplicate window.
    ledger_ttl_s: int = 2700
    # Ours, beyond SPEC §9:
    report_ttl_s: int = 90 * DAY_S
    event_max_age_s: float = 1800.0  # below CGRID_LEDGER_TTL_S: a record must outlive the wait
    batch_size: int = 500
    linger_ms: float = 20.0
    # CGRID_SHARED_TRIGGERS: publishers share triggers through the ledger's pending lists
    # (worker/batch.py); off: each sends triggers carrying its ids (while workers that take no
    # shared trigger still run: docs/hosts.md, upgrading)
    shared_triggers: bool = True
    # CGRID_CLAIM_RUN_MS: a worker that took a shared trigger goes on claiming its queue's new
    # events itself, while they keep coming, for this long (worker/follow.py); 0: one claim
    # per trigger
    claim_run_ms: float = 200.0
    call_concurrency: int = 1000
    buyer_max_concurrency: int = 100
    lane_wait_s: float = 0.25
    ca_file: str = ""
    park_revive_s: float = 10.0
    prefetch_multiplier: int = 0  # 0: by pool (cgrid.broker.prefetch_multiplier)
    buyers_file: str = ""  # CGRID_BUYERS_FILE: per-buyer settings (cgrid/buyers.py)
    metrics_port: int = 0  # CGRID_METRICS_PORT: Prometheus /metrics of the worker; 0 = off
    visibility_timeout_s: int = 3600
    sweep_interval_s: float = 0.5
    attempt_grace_s: float = 10.0
    redeliver_after_s: float = 30.0
    publish_timeout_s: float = 2.0
    # CGRID_PUBLISH_MAX_MEMORY_SHARE: new events are refused once Redis's used memory passes
    # this share of its maxmemory, so the accepted ones keep room to end (docs/troubleshooting.md)
    publish_max_memory_share: float = 0.9
    log_level: str = "INFO"
    data_dir: str = "data"
    archive_dir: str = ""  # CGRID_ARCHIVE_DIR; '' = <CGRID_DATA_DIR>/archive
    archive_claim_idle_s: float = 900.0
    queue: str = field(default=DELIVER_QUEUE)  # first attempts of buyers in no group
    retry_queue: str = RETRY_QUEUE  # CGRID_RETRY_QUEUE: retries of buyers in no group
    # CGRID_BUYER_QUEUES: (queue, buyers) per group of buyers with queues of their own
    buyer_queues: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def broker(self) -> str:
        """The broker's URL: CGRID_BROKER_URL, else the ledger's Redis."""
        return self.broker_url or self.redis_url

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        settings = cls(
            redis_url=env.get("CGRID_REDIS_URL", "").strip() or cls.redis_url,
            broker_url=env.get("CGRID_BROKER_URL", "").strip(),
            redis_cluster=_flag(env, "CGRID_REDIS_CLUSTER", cls.redis_cluster),
            shared_triggers=_flag(env, "CGRID_SHARED_TRIGGERS", cls.shared_triggers),
            redis_master_name=env.get("CGRID_REDIS_MASTER_NAME", "").strip() or cls.redis_master_name,
            redis_sentinel_password=env.get("CGRID_REDIS_SENTINEL_PASSWORD", ""),
            redis_sentinel_tls=_flag(env, "CGRID_REDIS_SENTINEL_TLS", cls.redis_sentinel_tls),
            redis_ca_file=env.get("CGRID_REDIS_CA_FILE", "").strip(),
            redis_cert_file=env.get("CGRID_REDIS_CERT_FILE", "").strip(),
            redis_key_file=env.get("CGRID_REDIS_KEY_FILE", "").strip(),
            redis_wait_replicas=_integer(env, "CGRID_REDIS_WAIT_REPLICAS", default_wait_replicas(env), minimum=0),
            redis_wait_timeout_ms=_integer(env, "CGRID_REDIS_WAIT_TIMEOUT_MS", cls.redis_wait_timeout_ms),
            timeout_s=_number(env, "CGRID_TIMEOUT_S", cls.timeout_s, minimum=0.01),
            retry_delay_s=_number(env, "CGRID_RETRY_DELAY_S", cls.retry_delay_s),
            allowed_networks=parse_networks(env.get("CGRID_ALLOWED_NETWORKS", "")),
            ledger_ttl_s=_integer(env, "CGRID_LEDGER_TTL_S", cls.ledger_ttl_s, minimum=60),
            report_ttl_s=_integer(env, "CGRID_REPORT_TTL_S", cls.report_ttl_s, minimum=60),
            event_max_age_s=_number(env, "CGRID_EVENT_MAX_AGE_S", cls.event_max_age_s, minimum=1),
            batch_size=_integer(env, "CGRID_BATCH_SIZE", cls.batch_size),
            linger_ms=_number(env, "CGRID_LINGER_MS", cls.linger_ms),
            claim_run_ms=_number(env, "CGRID_CLAIM_RUN_MS", cls.claim_run_ms),
            call_concurrency=_integer(env, "CGRID_CALL_CONCURRENCY", cls.call_concurrency),
            buyer_max_concurrency=_integer(env, "CGRID_BUYER_MAX_CONCURRENCY", cls.buyer_max_concurrency),
            lane_wait_s=_number(env, "CGRID_LANE_WAIT_MS", cls.lane_wait_s * 1000) / 1000,
            ca_file=env.get("CGRID_CA_FILE", "").strip(),
            park_revive_s=_number(env, "CGRID_PARK_REVIVE_S", cls.park_revive_s, minimum=1),
            prefetch_multiplier=_integer(env, "CGRID_PREFETCH_MULTIPLIER", cls.prefetch_multiplier, minimum=0),
            buyers_file=env.get("CGRID_BUYERS_FILE", "").strip(),
            metrics_port=_integer(env, "CGRID_METRICS_PORT", cls.metrics_port, minimum=0),
            visibility_timeout_s=_integer(
                env, "CGRID_VISIBILITY_TIMEOUT_S", cls.visibility_timeout_s, minimum=10
            ),
            sweep_interval_s=_number(env, "CGRID_SWEEP_INTERVAL_S", cls.sweep_interval_s, minimum=0.05),
            attempt_grace_s=_number(env, "CGRID_ATTEMPT_GRACE_S", cls.attempt_grace_s, minimum=1),
            redeliver_after_s=_number(env, "CGRID_REDELIVER_AFTER_S", cls.redeliver_after_s, minimum=1),
            publish_timeout_s=_number(env, "CGRID_PUBLISH_TIMEOUT_S", cls.publish_timeout_s, minimum=0.1),
            publish_max_memory_share=_number(env, "CGRID_PUBLISH_MAX_MEMORY_SHARE", cls.publish_max_memory_share,
                                             minimum=0.1),
            log_level=env.get("CGRID_LOG_LEVEL", "").strip().upper() or cls.log_level,
            data_dir=env.get("CGRID_DATA_DIR", "").strip() or cls.data_dir,
            archive_dir=env.get("CGRID_ARCHIVE_DIR", "").strip(),
            archive_claim_idle_s=_number(env, "CGRID_ARCHIVE_CLAIM_IDLE_S", cls.archive_claim_idle_s, minimum=10),
            retry_queue=check_queue_name(env.get("CGRID_RETRY_QUEUE", "").strip() or cls.retry_queue,
                                         "CGRID_RETRY_QUEUE"),
            buyer_queues=parse_buyer_queues(env.get("CGRID_BUYER_QUEUES", "")),
        )
        settings.validate()
        return settings

    def __repr__(self) -> str:
        """Every field, with the passwords masked (a repr can end up in a log or a traceback)."""
        shown = []
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name == "redis_url":
                value = mask_url(value)
            elif item.name == "redis_sentinel_password" and value:
                value = "***"
            shown.append(f"{item.name}={value!r}")
        return f"Settings({', '.join(shown)})"

    @property
    def archive_path(self) -> str:
        """Where the archiver writes its daily files (CGRID_ARCHIVE_DIR)."""
        return self.archive_dir or os.path.join(self.data_dir, "archive")

    @property
    def routing(self) -> Routing:
        """Which queue each trigger goes to (cgrid/routing.py, docs/hosts.md)."""
        return Routing(self.queue, self.retry_queue, self.buyer_queues)

    @property
    def attempt_lease_s(self) -> float:
        """Longest time a claimed attempt may take before it counts as lost: a process
        claims at most CGRID_CALL_CONCURRENCY + CGRID_BATCH_SIZE attempts, so one may wait
        behind one batch's worth of calls, and in its full lane CGRID_LANE_WAIT_MS before it
        is parked, before its own call is made."""
        return self.lease_for(self.timeout_s)

    def lease_for(self, longest_timeout_s: float) -> float:
        """The lease when the longest deadline of any buyer is ``longest_timeout_s``."""
        waves = 1 + math.ceil(self.batch_size / self.call_concurrency)
        return max(self.timeout_s, longest_timeout_s) * waves + self.lane_wait_s + self.attempt_grace_s

    def validate(self) -> None:
        """Refuse combinations that would break the one-retry and nothing-lost guarantees."""
        if self.log_level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ConfigError(f"CGRID_LOG_LEVEL: {self.log_level!r} is not DEBUG/INFO/WARNING/ERROR")
        if self.redis_cluster:
            if not self.broker_url:
                raise ConfigError("CGRID_REDIS_CLUSTER is on but CGRID_BROKER_URL is not set: Celery's broker cannot "
                                  "use a Redis Cluster; give it a Redis of its own (redis://, rediss:// or "
                                  "sentinel://), docs/redis.md")
            if self.broker_url == self.redis_url:
                raise ConfigError("CGRID_BROKER_URL names the cluster: Celery's broker needs a Redis of its own")
            if not self.redis_url.startswith(("redis://", "rediss://")):
                raise ConfigError("CGRID_REDIS_CLUSTER is on: CGRID_REDIS_URL must be a redis:// or rediss:// URL "
                                  "of any node of the cluster")
        for name, url in (("CGRID_REDIS_URL", self.redis_url), ("CGRID_BROKER_URL", self.broker_url)):
            try:
                check_redis_url(url or self.redis_url, master_name=self.redis_master_name,
                                sentinel_tls=self.redis_sentinel_tls,
                                tls_files=bool(self.redis_ca_file or self.redis_cert_file or self.redis_key_file),
                                cert_file=self.redis_cert_file, key_file=self.redis_key_file)
            except ConfigError as e:  # the same forms and TLS settings: the message names the variable
                raise ConfigError(str(e).replace("CGRID_REDIS_URL", name)) from None
        # A WAIT that outlasts the client's socket timeout is cut off after its script ran:
        # the caller would try the claim again, find it taken, and the attempt be lost.
        wait_limit_ms = min(self.publish_timeout_s, REDIS_SOCKET_TIMEOUT_S) * 1000 / 2
        if self.redis_wait_replicas and self.redis_wait_timeout_ms > wait_limit_ms:
            raise ConfigError(f"CGRID_REDIS_WAIT_TIMEOUT_MS = {self.redis_wait_timeout_ms} must stay at or below "
                              f"{wait_limit_ms:g} (half of CGRID_PUBLISH_TIMEOUT_S, and of the workers' "
                              f"{REDIS_SOCKET_TIMEOUT_S:g} s Redis socket timeout)")
        files = (("CGRID_CA_FILE", self.ca_file), ("CGRID_REDIS_CA_FILE", self.redis_ca_file),
                 ("CGRID_REDIS_CERT_FILE", self.redis_cert_file), ("CGRID_REDIS_KEY_FILE", self.redis_key_file))
        for name, path in files:
            if path and not os.path.isfile(path):
                raise ConfigError(f"{name}: {path!r} is not a readable file")
        # A task that is still running when the visibility timeout passes is handed to a
        # second worker by the broker; a retry due after it would come from a redelivered task.
        if self.attempt_lease_s >= self.visibility_timeout_s:
            raise ConfigError(
                "CGRID_TIMEOUT_S x (1 + ceil(CGRID_BATCH_SIZE / CGRID_CALL_CONCURRENCY)) + CGRID_LANE_WAIT_MS + "
                f"CGRID_ATTEMPT_GRACE_S = {self.attempt_lease_s:g}s must stay below "
                f"CGRID_VISIBILITY_TIMEOUT_S = {self.visibility_timeout_s}s"
            )
        if self.retry_delay_s >= self.visibility_timeout_s:
            raise ConfigError(
                f"CGRID_RETRY_DELAY_S = {self.retry_delay_s:g}s must stay below "
                f"CGRID_VISIBILITY_TIMEOUT_S = {self.visibility_timeout_s}s"
            )
        if self.publish_max_memory_share > 1:
            raise ConfigError(f"CGRID_PUBLISH_MAX_MEMORY_SHARE: {self.publish_max_memory_share:g} must be a share of "
                              "Redis's maxmemory between 0.1 and 1 (1: refuse new events only when Redis does)")
        if self.metrics_port > 65535:
            raise ConfigError(f"CGRID_METRICS_PORT: {self.metrics_port} is not a port (1-65535, or 0 for off)")
        if self.event_max_age_s >= self.ledger_ttl_s:
            raise ConfigError(
                f"CGRID_EVENT_MAX_AGE_S = {self.event_max_age_s:g}s must stay below CGRID_LEDGER_TTL_S = "
                f"{self.ledger_ttl_s}s: an event's record must outlive the wait for its call"
            )
        if self.retry_delay_s >= self.ledger_ttl_s:
            raise ConfigError("CGRID_RETRY_DELAY_S must stay below CGRID_LEDGER_TTL_S")
        check_routing(self.routing)
