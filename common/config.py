"""Typed configuration, built once per process from flags > environment > ``~/.llmlb/.env`` > defaults.

Each program has one settings schema here (``BalancerSchema``, ``NodeSchema`` with the pool's
``NodePoolSchema``, ``ClientSchema``; ``common.settings`` is the machinery): every setting is declared
once, with its variables, flag, parser and description, and ``--help``, ``llmlb config``, ``xllm config``
and docs/configuration.md are generated from it. The loaders turn a checked schema into the plain
dataclasses the rest of the code reads (``BalancerConfig``, ``NodeConfig``, ``PoolSettings``), adding the
values computed from several settings (the bulk address beside the gRPC one, the models dir, the
origin allowlist from the endpoint).

Over 400 lines on purpose: a setting's declaration, its parser and the config field it fills sit in one
file, so adding a setting is one change in one place.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Protocol
from urllib.parse import urlsplit

from pydantic import BeforeValidator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from common.secret import Secret
from common.settings import INTERNAL, Layers, layered_sources, load, parsed, setting
from common.settings import SettingError as SettingError
from common.settings import read_env_file as read_env_file
from common.types import Backend

DEFAULT_HF_ENDPOINT = "https://huggingface.co"


def llmlb_home(env: Mapping[str, str] | None = None) -> Path:
    """``LLMLB_HOME`` or ``~/.llmlb``: where the .env file, the database and keys live by default."""
    env = os.environ if env is None else env
    return Path(env.get("LLMLB_HOME") or Path.home() / ".llmlb").expanduser()


def parse_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true/false")


def parse_list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def normalize_origin(url: str) -> str:
    """``scheme://host[:port]`` in lower case, the form origins are compared in."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"origin {url!r} is not an http(s) URL")
    default_port = {"http": 80, "https": 443}[parts.scheme]
    port = parts.port
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{port}" if port and port != default_port else "")


def origin_listed(origin: str, allowed: tuple[str, ...]) -> bool:
    """Whether ``origin`` is one of ``allowed``, compared as ``scheme://host[:port]``."""
    try:
        return normalize_origin(origin) in {normalize_origin(o) for o in allowed}
    except ValueError:
        return False


def parse_balancers(value: str) -> tuple[str, ...]:
    """A comma-separated list of balancer addresses, each ``host:port``, in the order to try them.

    One entry may be a DNS name that resolves to several addresses: gRPC resolves it and its default
    ``pick_first`` policy tries each address in turn, so that case needs no list. ``unix:`` targets
    pass as they are.
    """
    entries = tuple(item.strip() for item in value.split(","))
    if not value.strip():
        raise ValueError("expected host:port[,host:port...]")
    for entry in entries:
        if not entry:
            raise ValueError("an empty entry in the list; expected host:port[,host:port...]")
        if entry.startswith("unix:"):
            continue
        host, sep, port = entry.rpartition(":")
        if not sep or not host or not port.isdigit() or not (0 < int(port) < 65536):
            raise ValueError(f"{entry!r} is not host:port")
    return entries


def parse_listen(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not (0 <= int(port) < 65536):
        raise ValueError("expected host:port")
    return f"{host or '0.0.0.0'}:{int(port)}"


def parse_port(value: str) -> int:
    """A TCP port, 0 (any free one) to 65535."""
    if not value.strip().isdigit() or int(value) > 65535:
        raise ValueError("expected a port from 0 to 65535")
    return int(value)


# The bulk paths' fixed default ports, one above each gRPC default, so that a firewall rule between
# hosts can name them: the balancer's bulk proxy and a node's bulk (peer file) server.
BALANCER_BULK_PORT = 50052
NODE_BULK_PORT = 50062


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """What one HTTP/1.1 port lets any caller, authorized or not, hold before its request is read.

    Applied alike to the balancer's HTTP door and bulk port and to a node's bulk and metrics ports.
    """

    max_header_bytes: int = 64 * 1024  # request line and headers together; over it: 431, then closed
    header_timeout_s: float = 10.0  # from the connection (or a request's first byte) to its last header
    keepalive_timeout_s: float = 5.0  # an idle kept-alive connection is closed after this
    max_connections: int = 1024  # open connections per port; more are closed as soon as they connect


DEFAULT_HTTP_LIMITS = HttpLimits()


OTEL_ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
OTEL_PROTOCOLS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")


def load_otel(s: Layers) -> tuple[tuple[str, str], ...]:
    """The standard ``OTEL_*`` variables (environment over ``.env``), for ``common.tracing``.

    The OpenTelemetry SDK reads them itself; here they are only gathered, and the few that decide
    whether and how traces leave the process are checked, so a bad value stops the start.
    """
    otel = {k: v for source in (s.file_values, s.env) for k, v in source.items() if k.startswith("OTEL_")}
    if traces_wanted(otel):
        exporter = otel.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
        if exporter != "otlp":
            raise ValueError(f"OTEL_TRACES_EXPORTER={exporter!r}: expected otlp or none")
        protocol = otlp_protocol(otel)
        if protocol not in ("grpc", "http/protobuf"):
            raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: expected grpc or http/protobuf")
    return tuple(sorted(otel.items()))


def traces_wanted(otel: Mapping[str, str]) -> bool:
    """Whether the ``OTEL_*`` variables ask for traces: an OTLP endpoint set, the SDK and exporter on."""
    if otel.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if otel.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return any(otel.get(name, "").strip() for name in OTEL_ENDPOINTS)


def otlp_protocol(otel: Mapping[str, str]) -> str:
    """The OTLP protocol for traces; ``grpc`` unless set."""
    return next((otel[n].strip() for n in OTEL_PROTOCOLS if otel.get(n, "").strip()), "grpc")


@dataclass(frozen=True, slots=True)
class BalancerConfig:
    """Everything the balancer process is told, resolved once at start."""

    home: Path
    grpc_listen: str = "127.0.0.1:50051"
    database_url: str = ""
    # Connections a PostgreSQL store keeps open (a burst may open a few more); unused with SQLite.
    database_pool_size: int = 5
    catalog_path: Path | None = None
    hf_endpoint: str = DEFAULT_HF_ENDPOINT
    hf_token: Secret | None = None  # a Secret: printed masked, wherever the config goes
    allowed_origins: tuple[str, ...] = (DEFAULT_HF_ENDPOINT,)
    origin_timeout_s: float = 30.0
    heartbeat_interval_ms: int = 1000
    heartbeat_timeout_ms: int = 3000
    # How long one window of the fleet token lasts (``balancer.fleet.token``): a node holds this
    # window's token and the next, renewed over its session, so a token works at most twice this long.
    fleet_token_ttl_s: float = 3600.0
    # A replica whose beat is older than this is taken as dead and the nodes it held as offline.
    # Longer than a node's timeout: a busy replica must not be declared dead by a late beat, and a
    # killed replica's nodes do not wait for it (they attach to another replica by themselves).
    replica_timeout_ms: int = 10_000
    log_format: str = "console"
    log_level: str = "info"
    # The standard OTEL_* variables (``common.tracing``): traces are exported when they name an endpoint.
    # Not in repr: OTEL_EXPORTER_OTLP_HEADERS may carry a collector's credential.
    otel: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    # One line per request at the edge, both doors (``balancer.edge.access_log``), at level info.
    access_log: bool = False
    # The HTTP shim (OpenAI API, /v0 management, /metrics); empty: no HTTP door.
    http_listen: str = "127.0.0.1:8080"
    # The bulk proxy (HTTP range requests, origin bytes passed through): host:port, "" when off.
    bulk_listen: str = f"127.0.0.1:{BALANCER_BULK_PORT}"
    # Keys: when on, every call but health checks needs a bearer key with the right scope.
    auth: bool = True
    # LLMLB_ADMIN_KEY: an admin key's secret the operator chose, stored at start if the store lacks it
    # (automated deployments: no generated admin-key file to read back). A Secret: printed masked.
    admin_key: Secret | None = None
    # Tokens the store does not hold: how many are remembered and for how long (apart from real
    # keys, which they can never push out), and how many never-seen tokens one client address may
    # have looked up in the store a second (as many at once); past that they are refused unread.
    unknown_key_cache: int = 10_000
    unknown_key_ttl_s: float = 30.0
    unknown_key_rate: float = 5.0
    # TLS for the gRPC door; with a client CA, callers must present a certificate it signed (mTLS).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # Routing: the policy for chat and completions (``ROUTING_POLICIES``; embeddings, audio and images
    # are routed by load alike), in-flight requests per node before it counts as busy, the wait queue.
    routing: str = "cache-aware"
    # A node that reports its slots for a loaded model (the sequences its engine runs at once) is busy
    # for that model at its slots plus ``node_queue_allowance`` (one waiting on the node refills a
    # finished slot at the engine's next step, without a trip back to the balancer); a node that
    # reports none (an older node, a model not loaded yet) is busy at ``node_max_inflight``, node-wide.
    node_max_inflight: int = 8
    node_queue_allowance: int = 1
    queue_size: int = 256
    queue_timeout_s: float = 30.0
    # A request whose expected wait in that queue (requests ahead times the recent service time,
    # over the slots) is longer is refused at once (429 with Retry-After) rather than left to time out.
    max_queue_wait_s: float = 15.0
    request_timeout_s: float = 600.0  # deadline for a routed call when the caller sets none
    route_attempts: int = 3  # distinct nodes a request may be tried on before the error is returned
    cooldown_failures: int = 3  # consecutive failures that put a node in cooldown
    cooldown_s: float = 10.0
    # Largest HTTP request body (audio uploads, image edits); gRPC messages are bounded from it too.
    max_body_mb: int = 64
    http_limits: HttpLimits = DEFAULT_HTTP_LIMITS  # the HTTP door's and the bulk port's
    # On SIGTERM, how long calls in flight may take to finish before they are cut (under the usual
    # 30 s an orchestrator waits before it kills).
    stop_grace_s: float = 25.0
    usage_flush_s: float = 5.0  # how often usage counted in memory is written to the store
    # How often each replica flushes its usage and reads every replica's totals of the keys with limits
    # it serves (``balancer.edge.limits``): a replica may overshoot a key's limit by what the others
    # admitted within about this long.
    key_limits_sync_s: float = 1.0
    # The scheduler: how often it reconciles deployments with the fleet, and how long its lease in the
    # store lasts unrenewed (the replica acting on deployments; another takes over once it lapses).
    schedule_interval_s: float = 1.0
    schedule_lease_s: float = 5.0
    # Autoscaling of min/max deployments (``balancer.scheduler.autoscaler``), each deployment on its own
    # demand: one copy more when, for ``scale_up_window_s``, requests waited longer than
    # ``scale_up_queue_wait_s`` on average or more were in flight per ready copy than its slots (those
    # its node reports for the model; ``scale_up_inflight`` for a node reporting none); one fewer (down
    # to min, so to zero) after ``scale_down_idle_s`` with no request, or after ``scale_down_window_s``
    # with the requests in flight under a quarter of one copy fewer's slots.
    scale_up_queue_wait_s: float = 2.0
    scale_up_inflight: int = 4
    scale_up_window_s: float = 10.0
    scale_down_idle_s: float = 300.0
    scale_down_window_s: float = 300.0
    # Replica processes ``llmlb serve`` starts on this host, sharing its ports (PostgreSQL only).
    workers: int = 1
    # This process is one of those workers: it binds its ports shared (SO_REUSEPORT).
    shared_ports: bool = False

    @property
    def admin_key_file(self) -> Path:
        """Where the first start writes the bootstrap admin key (mode 0600)."""
        return self.home / "admin-key"

    def origin_allowed(self, origin: str) -> bool:
        return origin_listed(origin, self.allowed_origins)


# What an operator-chosen admin key looks like: the prefix of the keys the balancer mints, then at least
# 32 URL-safe characters (``llmlb-`` and ``openssl rand -hex 32``, or ``secrets.token_urlsafe(32)``).
ADMIN_KEY_FORMAT = re.compile(r"llmlb-[A-Za-z0-9_-]{32,256}")


def parse_admin_key(value: str | None) -> Secret | None:
    """``LLMLB_ADMIN_KEY`` checked; the error never repeats the value, which is a secret."""
    if value is None:
        return None
    if not ADMIN_KEY_FORMAT.fullmatch(value):
        raise ValueError(
            "LLMLB_ADMIN_KEY is malformed: expected 'llmlb-' then 32 to 256 letters, digits, '-' or '_'"
            " (e.g. llmlb-$(openssl rand -hex 32))"
        )
    return Secret(value)


# The names of ``balancer.router.policy.POLICIES`` (a test keeps the two alike): checked here so a bad
# value is a configuration error at start, not a failure at the first request.
ROUTING_POLICIES = ("cache-aware", "power-of-two", "round-robin")


def parse_routing(value: str) -> str:
    """A routing policy name (``ROUTING_POLICIES``), case and spaces aside."""
    name = value.strip().lower()
    if name not in ROUTING_POLICIES:
        raise ValueError(f"routing policy {value!r}: expected {', '.join(ROUTING_POLICIES)}")
    return name


def home_catalog(home: Path) -> Path | None:
    """``$LLMLB_HOME/supported_models.json`` when an operator placed one there."""
    path = home / "supported_models.json"
    return path if path.is_file() else None


WORKER_ENV = "LLMLB_WORKER"  # set by ``llmlb serve --workers N`` on each worker it starts (its index)


def parse_backend_name(value: str) -> str:
    lowered = value.strip().lower()
    if lowered not in ("auto", "cuda", "metal", "cpu"):
        raise ValueError("expected auto, cuda, metal or cpu")
    return lowered


def parse_download_via(value: str) -> str:
    lowered = value.strip().lower()
    if lowered not in ("origin", "balancer"):
        raise ValueError("expected origin or balancer")
    return lowered


def parse_number(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError("expected a number") from None


def parse_whole(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError("expected a whole number") from None


def parse_positive(value: str) -> float:
    number = parse_number(value)
    if not number > 0:
        raise ValueError("expected a positive number")
    return number


def parse_seconds_or_zero(value: str) -> float:
    number = parse_number(value)
    if not number >= 0 or number == float("inf"):
        raise ValueError("expected a number of seconds, 0 or more")
    return number


def parse_count(value: str) -> int:
    number = parse_whole(value)
    if number < 1:
        raise ValueError("expected a whole number of at least 1")
    return number


def parse_count_or_zero(value: str) -> int:
    number = parse_whole(value)
    if number < 0:
        raise ValueError("expected a whole number of at least 0")
    return number


def parse_at_least(minimum: int) -> Callable[[str], int]:
    """A whole number of at least ``minimum``."""

    def parse(value: str) -> int:
        number = parse_whole(value)
        if number < minimum:
            raise ValueError(f"expected a whole number of at least {minimum}")
        return number

    return parse


def parse_switch(value: str) -> bool:
    """``0`` off, any other whole number on (the pool's switches, as they have always been read)."""
    return parse_whole(value) != 0


def parse_log_format(value: str) -> str:
    lowered = value.strip().lower()
    if lowered not in ("console", "json"):
        raise ValueError("expected console or json")
    return lowered


LOG_LEVELS = ("debug", "info", "warning", "error")


def parse_log_level(value: str) -> str:
    lowered = value.strip().lower()
    if lowered not in LOG_LEVELS:
        raise ValueError(f"expected {', '.join(LOG_LEVELS)}")
    return lowered


def parse_origins(value: str) -> tuple[str, ...]:
    """Comma-separated origin URLs, each checked now so a bad entry stops the start, not the first use."""
    origins = parse_list(value)
    for origin in origins:
        normalize_origin(origin)
    return origins


def parse_optional_listen(value: str) -> str:
    """``host:port``, or ``off`` (returned as empty) for a door that should not open."""
    return "" if value.strip().lower() in ("", "off", "none", "-") else parse_listen(value)


# Computed prompt prefixes a llama.cpp model keeps (MB); 0: none. The node's runtimes default to it too.
DEFAULT_PREFIX_CACHE_MB = 512


class Memory(Protocol):
    """What the memory budget is computed from: the node's hardware (``node.hardware.Hardware``)."""

    @property
    def backend(self) -> Backend: ...

    @property
    def gpu_memory_total_mb(self) -> int: ...

    @property
    def memory_total_mb(self) -> int: ...


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """How the node's model pool (``node.pool``) uses the node: part of the node's settings schema."""

    memory_budget_mb: int = 0  # 0: 90 % of GPU memory on CUDA, else 75 % of RAM
    slots_per_model: int = 4  # concurrent requests per loaded model
    batching: bool = True  # llama.cpp decodes a model's slots together, in one context
    batch_exact: bool = False  # decode each slot's part of a step alone (exact answers)
    queue_per_model: int = 64  # requests waiting for a slot before queue_full
    worker_threads: int = 8  # threads for loading and inference, all models together
    engine_threads: int = 0  # CPU threads per engine call; 0: one per core
    context_tokens: int = 4096  # llama.cpp context window per slot
    gpu_layers: int | None = None  # layers offloaded on CUDA/Metal; unset: all
    prefix_cache_mb: int = DEFAULT_PREFIX_CACHE_MB  # kept prompt prefixes per model
    # The command serving safetensors models with vLLM's OpenAI API (the node adds --model, --port,
    # ...); set, it is used on any backend; unset, vLLM's own on CUDA when installed.
    vllm_command: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> PoolSettings:
        """The pool's part of the node's schema, read from ``env`` alone (no .env file)."""
        values = load(NodePoolSchema, Layers(env, {}), {})
        return cls(**{f: getattr(values, f) for f in cls.__dataclass_fields__})

    def budget_mb(self, hardware: Memory) -> int:
        if self.memory_budget_mb:
            return self.memory_budget_mb
        if hardware.backend is Backend.CUDA and hardware.gpu_memory_total_mb:
            return hardware.gpu_memory_total_mb * 9 // 10
        return max(1024, hardware.memory_total_mb * 3 // 4)


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Everything a node process (``xllm serve``) is told, resolved once at start."""

    home: Path
    models_dir: Path
    shared_dir: Path | None = None
    balancer: str = "127.0.0.1:50051"  # one address, or several joined by commas (see ``balancers``)
    grpc_listen: str = "127.0.0.1:50061"
    advertise: str = ""  # host:port the balancer and peers dial; the listen address when empty
    node_id: str = ""  # empty: the id saved in <home>/node-id, else one the balancer assigns
    backend: str = "auto"
    download_via: str = "origin"
    hf_endpoint: str = DEFAULT_HF_ENDPOINT
    hf_token: Secret | None = None  # this and the two tokens below: Secrets, printed masked
    allowed_origins: tuple[str, ...] = (DEFAULT_HF_ENDPOINT,)
    max_downloads: int = 1
    download_stall_timeout_s: float = 60.0
    download_timeout_s: float = 300.0
    peer_fetch: bool = True
    # Ranges fetched at once per file, and their size: see node/downloader.py for the measured defaults.
    download_connections: int = 4
    download_piece_mb: int = 32
    # The node's bulk (HTTP range) server for peers: host:port, port 0 picks a free one; "" turns it off.
    bulk_listen: str = f"127.0.0.1:{NODE_BULK_PORT}"
    shared_dir_timeout_s: float = 2.0
    # Seconds between looks for model folders placed by hand (node/local_models.py); 0: at start only.
    local_scan_interval_s: float = 5.0
    auth_token: Secret = field(default_factory=Secret)
    log_format: str = "console"
    log_level: str = "info"
    # The standard OTEL_* variables (``common.tracing``): traces are exported when they name an endpoint.
    # Not in repr: OTEL_EXPORTER_OTLP_HEADERS may carry a collector's credential.
    otel: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    # The bearer key (scope node) the node presents to the balancer.
    api_key: Secret = field(default_factory=Secret)
    tls_ca: Path | None = None  # CA that signed the balancer's certificate; set: dial it with TLS
    tls_cert: Path | None = None  # client certificate for mTLS with the balancer
    tls_key: Path | None = None
    metrics_listen: str = ""  # host:port of the node's Prometheus /metrics; empty: off
    http_limits: HttpLimits = DEFAULT_HTTP_LIMITS  # the bulk and metrics ports'
    # Largest request the gRPC port takes, as the balancer's LLMLB_MAX_BODY_MB: the uploads it forwards.
    max_body_mb: int = 64
    # On SIGTERM, how long in-flight requests may take to finish: under the 30 s Kubernetes waits by
    # default before it kills (terminationGracePeriodSeconds), so the kill never lands mid-drain.
    drain_timeout_s: float = 25.0
    # The most memory the node offers and loads models into (MB); 0: 90 % of GPU memory, else 75 % of RAM.
    memory_budget_mb: int = 0
    labels: tuple[tuple[str, str], ...] = ()  # the operator's key=value labels, sent at registration
    pool: PoolSettings = PoolSettings()  # how loaded models use the node (``node.pool``)

    @property
    def node_id_file(self) -> Path:
        return self.home / "node-id"

    @property
    def balancers(self) -> tuple[str, ...]:
        """The balancer addresses in the order the node tries them (``balancer`` holds them joined)."""
        return parse_balancers(self.balancer)

    def origin_allowed(self, origin: str) -> bool:
        return origin_listed(origin, self.allowed_origins)


def parse_labels(value: str | Sequence[str]) -> tuple[tuple[str, str], ...]:
    """Node labels ``k=v``, comma-separated in one string or one per item, sorted by key; a key given
    twice keeps its last value."""
    items = parse_list(value) if isinstance(value, str) else tuple(v.strip() for v in value if v.strip())
    labels: dict[str, str] = {}
    for item in items:
        key, sep, label = (part.strip() for part in item.partition("="))
        if not sep or not key or not label or "=" in label:
            raise ValueError(f"label {item!r} is not key=value")
        labels[key] = label
    return tuple(sorted(labels.items()))


def parse_label_items(value: Any) -> Any:
    """Labels as text (the variable) or as one ``k=v`` per item (repeated ``--label``); parsed pairs pass."""
    if isinstance(value, str) or (isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)):
        return parse_labels(value)
    return value


# The schemas: each setting once, with its environment names (main first, older names after), flag,
# default and description. ``--help``, ``config`` and docs/configuration.md are generated from them.

Listen = Annotated[str, parsed(parse_listen)]
OptionalListen = Annotated[str, parsed(parse_optional_listen)]
Port = Annotated[int, parsed(parse_port)]
Count = Annotated[int, parsed(parse_count)]
CountOrZero = Annotated[int, parsed(parse_count_or_zero)]
Whole = Annotated[int, parsed(parse_whole)]
Positive = Annotated[float, parsed(parse_positive)]
SecondsOrZero = Annotated[float, parsed(parse_seconds_or_zero)]
Number = Annotated[float, parsed(parse_number)]
Switch = Annotated[bool, parsed(parse_bool)]
LogFormat = Annotated[str, parsed(parse_log_format)]
LogLevel = Annotated[str, parsed(parse_log_level)]
Origins = Annotated[tuple[str, ...] | None, parsed(parse_origins)]
SecretText = Annotated[Secret | None, parsed(Secret)]
Balancers = Annotated[str, parsed(lambda value: ",".join(parse_balancers(value)))]


class Schema(BaseSettings):
    """A program's settings: flags (init arguments) over the environment over ``$LLMLB_HOME/.env``."""

    model_config = SettingsConfigDict(
        frozen=True, arbitrary_types_allowed=True, extra="forbid", validate_default=False
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return layered_sources(settings_cls, init_settings)


HTTP_LIMITS_HELP = {
    "MAX_HEADER_KB": "largest request line and headers on an HTTP port, in KiB; over it: 431, then closed",
    "HEADER_TIMEOUT": "seconds a request's headers may take, from connect or a kept-alive request's start",
    "KEEPALIVE_TIMEOUT": "seconds an idle kept-alive HTTP connection stays open",
    "MAX_CONNECTIONS": "open connections per HTTP port; more are closed as soon as accepted",
}


def http_limit(suffix: str, prefixes: tuple[str, ...]) -> Any:
    """One of the four HTTP limits (``HttpLimits``), under ``prefixes`` (the first set winning)."""
    d = DEFAULT_HTTP_LIMITS
    default = {
        "MAX_HEADER_KB": d.max_header_bytes // 1024,
        "HEADER_TIMEOUT": d.header_timeout_s,
        "KEEPALIVE_TIMEOUT": d.keepalive_timeout_s,
        "MAX_CONNECTIONS": d.max_connections,
    }[suffix]
    return setting(default, *(prefix + suffix for prefix in prefixes), help=HTTP_LIMITS_HELP[suffix])


class BalancerSchema(Schema):
    """``llmlb serve``'s settings."""

    home: Path | None = setting(
        None,
        "LLMLB_HOME",
        flag="--home",
        shown_default="~/.llmlb",
        help="state directory: .env, llmlb.db, admin-key",
    )
    grpc_listen: Listen = setting(
        "127.0.0.1:50051", "LLMLB_GRPC_LISTEN", flag="--grpc-listen", help="host:port the gRPC server binds"
    )
    http_listen: OptionalListen = setting(
        "127.0.0.1:8080",
        "LLMLB_HTTP_LISTEN",
        flag="--http-listen",
        help='host:port of the OpenAI HTTP API, /v0 and /metrics; "off": no HTTP door',
    )
    bulk_port: Port = setting(
        BALANCER_BULK_PORT,
        "LLMLB_BULK_PORT",
        shown_default=f"{BALANCER_BULK_PORT} (0 when the gRPC port is 0)",
        help="port of the bulk proxy (HTTP ranges of origin bytes for nodes) on the gRPC host; 0: any free",
    )
    bulk_listen: OptionalListen | None = setting(
        None,
        "LLMLB_BULK_LISTEN",
        shown_default="gRPC host, LLMLB_BULK_PORT (off with TLS)",
        help='host:port of the bulk proxy instead of beside the gRPC port; "off": nodes use ReadBlob',
    )
    auth: Switch = setting(
        True,
        "LLMLB_AUTH",
        flag="--auth",
        help="require API keys on both doors; the first start writes admin-key",
    )
    admin_key: SecretText = setting(
        None,
        "LLMLB_ADMIN_KEY",
        secret=True,
        help="an admin key (llmlb- and 32-256 of A-Z a-z 0-9 - _) stored at start; no admin-key file",
    )
    fleet_token_ttl_s: Positive = setting(
        3600.0,
        "LLMLB_FLEET_TOKEN_TTL",
        help="seconds one fleet-token window lasts; revoking a node or admin key rotates it",
    )
    unknown_key_cache: Count = setting(
        10_000,
        "LLMLB_UNKNOWN_KEY_CACHE",
        help="tokens the store lacks that are remembered, oldest forgotten first",
    )
    unknown_key_ttl_s: Positive = setting(
        30.0, "LLMLB_UNKNOWN_KEY_TTL", help="seconds such a token is refused from memory"
    )
    unknown_key_rate: Positive = setting(
        5.0,
        "LLMLB_UNKNOWN_KEY_RATE",
        help="store reads for never-seen tokens per client address a second; then 401",
    )
    tls_cert: Path | None = setting(
        None, "LLMLB_TLS_CERT", help="certificate: the gRPC door speaks TLS (with LLMLB_TLS_KEY)"
    )
    tls_key: Path | None = setting(None, "LLMLB_TLS_KEY", help="the certificate's key (with LLMLB_TLS_CERT)")
    tls_client_ca: Path | None = setting(
        None, "LLMLB_TLS_CLIENT_CA", help="with TLS, callers must present a certificate this CA signed (mTLS)"
    )
    database_url: str | None = setting(
        None,
        "LLMLB_DATABASE_URL",
        flag="--database-url",
        secret=False,
        shown_default="sqlite+aiosqlite:///$LLMLB_HOME/llmlb.db",
        help="metadata store (SQLAlchemy async URL, e.g. postgresql+asyncpg://user:password@host:5432/db)",
    )
    database_pool_size: Count = setting(
        5, "LLMLB_DATABASE_POOL_SIZE", help="PostgreSQL connections kept open (a burst may open 5 more)"
    )
    catalog_path: Path | None = setting(
        None,
        "LLMLB_CATALOG",
        flag="--catalog",
        shown_default="$LLMLB_HOME/supported_models.json if present, else the packaged one",
        help="supported_models.json to seed the catalogue from",
    )
    hf_endpoint: str = setting(
        DEFAULT_HF_ENDPOINT,
        "HF_ENDPOINT",
        flag="--hf-endpoint",
        help="Hugging Face endpoint (a mirror works)",
    )
    hf_token: SecretText = setting(
        None,
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        secret=True,
        help="token for private or gated repositories",
    )
    allowed_origins: Origins = setting(
        None,
        "LLMLB_ALLOWED_ORIGINS",
        flag="--allowed-origins",
        shown_default="$HF_ENDPOINT",
        help="comma-separated origin URLs models may come from",
    )
    origin_timeout_s: Number = setting(30.0, "LLMLB_ORIGIN_TIMEOUT", help="seconds per origin request")
    heartbeat_interval_ms: Whole = setting(
        1000, "LLMLB_HEARTBEAT_INTERVAL_MS", help="how often nodes send heartbeats"
    )
    heartbeat_timeout_ms: Whole = setting(
        3000, "LLMLB_HEARTBEAT_TIMEOUT_MS", help="silence after which a node leaves rotation"
    )
    replica_timeout_ms: Whole = setting(
        10_000, "LLMLB_REPLICA_TIMEOUT_MS", help="silence after which another replica is taken as dead"
    )
    log_format: LogFormat = setting(
        "console", "LLMLB_LOG_FORMAT", flag="--log-format", help="console or json"
    )
    log_level: LogLevel = setting(
        "info", "LLMLB_LOG_LEVEL", flag="--log-level", help="debug, info, warning or error"
    )
    access_log: Switch = setting(
        False, "LLMLB_ACCESS_LOG", help="one structured access line per request on both doors, at level info"
    )
    routing: Annotated[str, parsed(parse_routing)] = setting(
        "cache-aware",
        "LLMLB_ROUTING",
        flag="--routing",
        help="routing policy for chat and completions: cache-aware, power-of-two or round-robin",
    )
    node_max_inflight: Count = setting(
        8,
        "LLMLB_NODE_MAX_INFLIGHT",
        help="requests in flight per node before it counts as busy, for a node that reports no slots "
        "for the model (an older node, a model not loaded yet)",
    )
    node_queue_allowance: CountOrZero = setting(
        1,
        "LLMLB_NODE_QUEUE_ALLOWANCE",
        help="requests a node gets for a model beyond the slots it reports for it: they wait on the "
        "node, so a finished slot is refilled at the engine's next step (0: exactly the slots)",
    )
    queue_size: CountOrZero = setting(
        256, "LLMLB_QUEUE_SIZE", help="requests that may wait for a free node (0: none wait)"
    )
    queue_timeout_s: Positive = setting(
        30.0, "LLMLB_QUEUE_TIMEOUT", help="seconds a request may wait for a node (then 504)"
    )
    max_queue_wait_s: Positive = setting(
        15.0,
        "LLMLB_MAX_QUEUE_WAIT",
        help="longest expected wait a request is queued for; longer: 429 at once",
    )
    request_timeout_s: Positive = setting(
        600.0, "LLMLB_REQUEST_TIMEOUT", help="deadline of a routed request when the caller sets none"
    )
    route_attempts: Count = setting(
        3, "LLMLB_ROUTE_ATTEMPTS", help="distinct nodes a request is tried on before it fails"
    )
    cooldown_failures: Count = setting(
        3, "LLMLB_COOLDOWN_FAILURES", help="consecutive failures that put a node in cooldown"
    )
    cooldown_s: Positive = setting(10.0, "LLMLB_COOLDOWN", help="seconds a node stays in cooldown")
    max_body_mb: Count = setting(
        64,
        "LLMLB_MAX_BODY_MB",
        help="largest HTTP request body (MiB); gRPC takes messages up to this and 1 MiB more",
    )
    max_header_kb: Count = http_limit("MAX_HEADER_KB", ("LLMLB_",))
    header_timeout_s: Positive = http_limit("HEADER_TIMEOUT", ("LLMLB_",))
    keepalive_timeout_s: Positive = http_limit("KEEPALIVE_TIMEOUT", ("LLMLB_",))
    max_connections: Count = http_limit("MAX_CONNECTIONS", ("LLMLB_",))
    stop_grace_s: Positive = setting(
        25.0, "LLMLB_STOP_GRACE", help="on SIGTERM, seconds calls in flight may take to finish"
    )
    usage_flush_s: Positive = setting(
        5.0, "LLMLB_USAGE_FLUSH", help="seconds between batched writes of usage per key and model"
    )
    key_limits_sync_s: Positive = setting(
        1.0,
        "LLMLB_KEY_LIMITS_SYNC",
        help="seconds between reads of every replica's usage of keys with limits",
    )
    schedule_interval_s: Positive = setting(
        1.0, "LLMLB_SCHEDULE_INTERVAL", help="seconds between the scheduler's passes over the deployments"
    )
    schedule_lease_s: Positive = setting(
        5.0, "LLMLB_SCHEDULE_LEASE", help="seconds the acting scheduler's lease lasts unrenewed"
    )
    scale_up_queue_wait_s: Positive = setting(
        2.0,
        "LLMLB_SCALE_UP_QUEUE_WAIT",
        help="a min/max deployment gets a copy more when requests waited longer on average...",
    )
    scale_up_inflight: Count = setting(
        4,
        "LLMLB_SCALE_UP_INFLIGHT",
        help="... or more were in flight per ready copy than its slots: those its node reports for the "
        "model, else this many ...",
    )
    scale_up_window_s: Positive = setting(
        10.0, "LLMLB_SCALE_UP_WINDOW", help="... for this many seconds without a break"
    )
    scale_down_idle_s: Positive = setting(
        300.0,
        "LLMLB_SCALE_DOWN_IDLE",
        help="seconds with no request after which a min/max deployment loses a copy",
    )
    scale_down_window_s: Positive = setting(
        300.0,
        "LLMLB_SCALE_DOWN_WINDOW",
        help="seconds in-flight requests must stay under a quarter of one copy fewer's slots before it goes",
    )
    workers: Count = setting(
        1,
        "LLMLB_WORKERS",
        flag="--workers",
        help="replica processes on this host sharing its ports (PostgreSQL only)",
    )
    shared_ports: Annotated[bool, parsed(lambda value: True)] = setting(
        False, "LLMLB_WORKER", group=INTERNAL, help="set on each worker `llmlb serve --workers` starts"
    )


class NodePoolSchema(Schema):
    """How a node's model pool uses it (``PoolSettings``): part of the node's settings."""

    memory_budget_mb: CountOrZero = setting(
        0,
        "XLLM_MEMORY_BUDGET_MB",
        flag="--memory-budget-mb",
        group="inference",
        shown_default="90 % of GPU memory on CUDA, else 75 % of RAM (at least 1024)",
        help="the most memory (MB) the node offers and loads models into; idle ones unloaded to stay under",
    )
    slots_per_model: Annotated[int, parsed(parse_at_least(1))] = setting(
        4,
        "XLLM_SLOTS_PER_MODEL",
        group="inference",
        help="concurrent requests per loaded model (llama.cpp: one batch)",
    )
    batching: Annotated[bool, parsed(parse_switch)] = setting(
        True,
        "XLLM_BATCHING",
        group="inference",
        shown_default="1",
        help="0: llama.cpp decodes each request on its own",
    )
    batch_exact: Annotated[bool, parsed(parse_switch)] = setting(
        False,
        "XLLM_BATCH_EXACT",
        group="inference",
        shown_default="0",
        help="1: each sequence's token decoded alone, so answers equal the unbatched ones",
    )
    queue_per_model: CountOrZero = setting(
        64, "XLLM_QUEUE_PER_MODEL", group="inference", help="requests waiting for a slot before queue_full"
    )
    worker_threads: Annotated[int, parsed(parse_at_least(1))] = setting(
        8, "XLLM_WORKER_THREADS", group="inference", help="engine calls running at once, all models together"
    )
    engine_threads: CountOrZero = setting(
        0,
        "XLLM_ENGINE_THREADS",
        group="inference",
        shown_default="one per core",
        help="CPU threads per engine call",
    )
    context_tokens: Annotated[int, parsed(parse_at_least(256))] = setting(
        4096, "XLLM_CONTEXT_TOKENS", group="inference", help="llama.cpp context window per slot"
    )
    gpu_layers: Annotated[int | None, parsed(parse_at_least(-1))] = setting(
        None,
        "XLLM_GPU_LAYERS",
        group="inference",
        shown_default="all",
        help="layers offloaded to CUDA / Metal",
    )
    prefix_cache_mb: CountOrZero = setting(
        DEFAULT_PREFIX_CACHE_MB,
        "XLLM_PREFIX_CACHE_MB",
        group="inference",
        help="computed prompt prefixes a llama.cpp model keeps, in MB (0: off)",
    )
    vllm_command: Annotated[str, parsed(str.strip)] = setting(
        "",
        "XLLM_VLLM_COMMAND",
        group="inference",
        help="command serving safetensors with vLLM's OpenAI API; empty: vLLM's own on CUDA if installed",
    )


class NodeSchema(NodePoolSchema):
    """``xllm``'s settings: the node's own and its pool's."""

    home: Path | None = setting(
        None,
        "LLMLB_HOME",
        flag="--home",
        shown_default="~/.llmlb",
        help="state directory: .env, node-id, models",
    )
    models_dir: Path | None = setting(
        None,
        "XLLM_MODELS_DIR",
        "LLM_MODELS_DIR",
        flag="--models-dir",
        shown_default="$LLMLB_HOME/models",
        help="where the node keeps model files (LLM_MODELS_DIR: its older name)",
    )
    shared_dir: Path | None = setting(
        None,
        "XLLM_SHARED_DIR",
        flag="--shared-dir",
        help="shared (NFS) models dir <dir>/<model-id>/<file>, used in place",
    )
    shared_dir_timeout_s: Positive = setting(
        2.0,
        "XLLM_SHARED_DIR_TIMEOUT",
        help="seconds a shared-dir lookup may take before the share is skipped",
    )
    local_scan_interval_s: SecondsOrZero = setting(
        5.0,
        "XLLM_LOCAL_SCAN_INTERVAL",
        help="seconds between looks for model folders placed by hand; 0: at start only",
    )
    balancer: Balancers = setting(
        "127.0.0.1:50051",
        "XLLM_BALANCER",
        "LLMLB_ADDR",
        flag="--balancer",
        help="balancer gRPC host:port, or several comma-separated: the node fails over to the next by itself",
    )
    grpc_listen: Listen = setting(
        "127.0.0.1:50061",
        "XLLM_GRPC_LISTEN",
        flag="--grpc-listen",
        help="host:port the node's gRPC server binds",
    )
    bulk_port: Port = setting(
        NODE_BULK_PORT,
        "XLLM_BULK_PORT",
        shown_default=f"{NODE_BULK_PORT} (0 when the gRPC port is 0)",
        help="port of the bulk (HTTP range) server peers read files from, on the gRPC host; 0: any free",
    )
    bulk_listen: OptionalListen | None = setting(
        None,
        "XLLM_BULK_LISTEN",
        shown_default="gRPC host, XLLM_BULK_PORT",
        help='host:port of the bulk server instead; "off": none, peers use ReadBlob',
    )
    advertise: str = setting(
        "",
        "XLLM_ADVERTISE",
        flag="--advertise",
        shown_default="the listen address",
        help="host:port the balancer and peers dial",
    )
    node_id: str = setting(
        "",
        "XLLM_NODE_ID",
        flag="--node-id",
        shown_default="saved in $LLMLB_HOME/node-id, else assigned",
        help="the node's id: letters, digits, -, _, ., at most 128",
    )
    backend: Annotated[str, parsed(parse_backend_name)] = setting(
        "auto",
        "XLLM_BACKEND",
        flag="--backend",
        help="auto (CUDA via NVML, else Metal, else CPU), cuda, metal or cpu",
    )
    download_via: Annotated[str, parsed(parse_download_via)] = setting(
        "origin",
        "XLLM_DOWNLOAD_VIA",
        flag="--download-via",
        help="origin (the hub directly) or balancer (its proxy)",
    )
    hf_endpoint: str = setting(
        DEFAULT_HF_ENDPOINT, "HF_ENDPOINT", help="Hugging Face endpoint, for direct downloads"
    )
    hf_token: SecretText = setting(
        None,
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        secret=True,
        help="token for private or gated repositories",
    )
    allowed_origins: Origins = setting(
        None,
        "XLLM_ALLOWED_ORIGINS",
        "LLMLB_ALLOWED_ORIGINS",
        shown_default="$HF_ENDPOINT",
        help="comma-separated origins the node may download from directly",
    )
    max_downloads: Count = setting(
        1, "XLLM_MAX_DOWNLOADS", flag="--max-downloads", help="downloads at a time on this node"
    )
    download_stall_timeout_s: Positive = setting(
        60.0,
        "XLLM_DOWNLOAD_STALL_TIMEOUT",
        flag="--download-stall-timeout",
        help="seconds without a byte before a download attempt fails",
    )
    download_timeout_s: Positive = setting(
        300.0,
        "XLLM_DOWNLOAD_TIMEOUT",
        flag="--download-timeout",
        help="seconds one file's download may take in all",
    )
    peer_fetch: Switch = setting(
        True,
        "XLLM_PEER_FETCH",
        flag="--peer-fetch",
        help="fetch from peer nodes holding the model before the origin",
    )
    download_connections: Count = setting(
        4, "XLLM_DOWNLOAD_CONNECTIONS", help="ranges of one file fetched at once"
    )
    download_piece_mb: Count = setting(
        32, "XLLM_DOWNLOAD_PIECE_MB", help="size of each range (MiB), the unit that resumes"
    )
    auth_token: SecretText = setting(
        None,
        "XLLM_AUTH_TOKEN",
        secret=True,
        help="a token the node's gRPC port accepts besides the fleet token the balancer hands out",
    )
    api_key: SecretText = setting(
        None,
        "XLLM_API_KEY",
        flag="--api-key",
        secret=True,
        help="API key (scope node) the node presents to the balancer (a flag shows in ps: prefer this)",
    )
    tls_ca: Path | None = setting(
        None, "XLLM_TLS_CA", help="CA of the balancer's certificate; set: dial it with TLS"
    )
    tls_cert: Path | None = setting(
        None, "XLLM_TLS_CERT", help="client certificate for mutual TLS with the balancer"
    )
    tls_key: Path | None = setting(None, "XLLM_TLS_KEY", help="the client certificate's key")
    metrics_listen: OptionalListen = setting(
        "",
        "XLLM_METRICS_LISTEN",
        flag="--metrics-listen",
        shown_default="off",
        help="host:port of Prometheus GET /metrics",
    )
    max_body_mb: Count = setting(
        64,
        "XLLM_MAX_BODY_MB",
        "LLMLB_MAX_BODY_MB",
        help="largest gRPC request (MiB), plus 1 MiB for the other fields",
    )
    max_header_kb: Count = http_limit("MAX_HEADER_KB", ("XLLM_", "LLMLB_"))
    header_timeout_s: Positive = http_limit("HEADER_TIMEOUT", ("XLLM_", "LLMLB_"))
    keepalive_timeout_s: Positive = http_limit("KEEPALIVE_TIMEOUT", ("XLLM_", "LLMLB_"))
    max_connections: Count = http_limit("MAX_CONNECTIONS", ("XLLM_", "LLMLB_"))
    drain_timeout_s: Positive = setting(
        25.0,
        "XLLM_DRAIN_TIMEOUT",
        help="on SIGTERM, seconds in-flight requests may take (under Kubernetes' 30 s)",
    )
    labels: Annotated[tuple[tuple[str, str], ...], BeforeValidator(parse_label_items)] = setting(
        (),
        "XLLM_LABELS",
        flag="--label",
        repeatable=True,
        shown_default="none",
        help="comma-separated key=value labels that deployments' --selector matches",
    )
    log_format: LogFormat = setting(
        "console", "XLLM_LOG_FORMAT", "LLMLB_LOG_FORMAT", flag="--log-format", help="console or json"
    )
    log_level: LogLevel = setting(
        "info", "XLLM_LOG_LEVEL", "LLMLB_LOG_LEVEL", flag="--log-level", help="debug, info, warning or error"
    )


class ClientSchema(Schema):
    """The ``llmlb`` client commands' settings: where to dial and what to present."""

    address: Balancers = setting(
        "127.0.0.1:50051",
        "LLMLB_ADDR",
        flag="--balancer",
        help="balancer gRPC address, or several comma-separated: each command uses the first that answers",
    )
    api_key: SecretText = setting(
        None,
        "LLMLB_API_KEY",
        "LLMLB_ADMIN_KEY",
        flag="--api-key",
        secret=True,
        shown_default="$LLMLB_ADMIN_KEY, else $LLMLB_HOME/admin-key",
        help="API key the CLI sends",
    )
    home: Path | None = setting(
        None, "LLMLB_HOME", shown_default="~/.llmlb", help="where .env and admin-key are looked for"
    )
    tls_ca: Path | None = setting(
        None, "LLMLB_TLS_CA", flag="--tls-ca", help="CA of the balancer's certificate; set: TLS"
    )
    tls_cert: Path | None = setting(None, "LLMLB_TLS_CLIENT_CERT", help="client certificate, for mTLS")
    tls_key: Path | None = setting(None, "LLMLB_TLS_CLIENT_KEY", help="the client certificate's key")


def _layers(home: Path, env: Mapping[str, str] | None) -> Layers:
    return Layers.read(env, home / ".env")


def _home(flag: Path | None, env: Mapping[str, str] | None) -> Path:
    return flag or llmlb_home(env)


def _bulk_beside(grpc_listen: str, port: int, port_set: bool) -> str:
    """The default bulk address: the gRPC host and ``port``; a gRPC port of 0 (any free one, as tests
    and benchmarks ask) gets any free bulk port too, unless a bulk port was set."""
    host, _, grpc_port = grpc_listen.rpartition(":")
    return f"{host}:{port if port_set or grpc_port != '0' else 0}"


def _http_limits(values: BalancerSchema | NodeSchema) -> HttpLimits:
    return HttpLimits(
        max_header_bytes=1024 * values.max_header_kb,
        header_timeout_s=values.header_timeout_s,
        keepalive_timeout_s=values.keepalive_timeout_s,
        max_connections=values.max_connections,
    )


def _joined(value: tuple[str, ...] | None) -> str | None:
    return None if value is None else ",".join(value)


def load_balancer_config(
    *,
    grpc_listen: str | None = None,
    database_url: str | None = None,
    catalog_path: Path | None = None,
    hf_endpoint: str | None = None,
    allowed_origins: tuple[str, ...] | str | None = None,
    log_format: str | None = None,
    log_level: str | None = None,
    http_listen: str | None = None,
    auth: bool | None = None,
    workers: int | str | None = None,
    routing: str | None = None,
    home: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> BalancerConfig:
    """Builds the balancer's config: each argument is a CLI flag and wins over the environment."""
    home = _home(home, env)
    layers = _layers(home, env)
    flags = {
        "home": home,
        "grpc_listen": grpc_listen,
        "database_url": database_url,
        "catalog_path": catalog_path,
        "hf_endpoint": hf_endpoint,
        "allowed_origins": allowed_origins
        if not isinstance(allowed_origins, tuple)
        else _joined(allowed_origins),
        "log_format": log_format,
        "log_level": log_level,
        "http_listen": http_listen,
        "auth": auth,
        "workers": workers,
        "routing": routing,
    }
    v = load(BalancerSchema, layers, flags)
    if (v.tls_cert is None) != (v.tls_key is None):
        raise SettingError("LLMLB_TLS_CERT and LLMLB_TLS_KEY go together: set both or neither")
    endpoint = v.hf_endpoint.rstrip("/")
    admin_key = parse_admin_key(v.admin_key.reveal()) if v.admin_key is not None else None
    bulk = v.bulk_listen
    if bulk is None:  # beside the gRPC port; off under TLS, since the bulk path is plain HTTP
        bulk = (
            ""
            if v.tls_cert is not None
            else _bulk_beside(v.grpc_listen, v.bulk_port, layers.raw("LLMLB_BULK_PORT") is not None)
        )
    return BalancerConfig(
        home=home,
        grpc_listen=v.grpc_listen,
        database_url=v.database_url or f"sqlite+aiosqlite:///{home / 'llmlb.db'}",
        database_pool_size=v.database_pool_size,
        # No --catalog nor LLMLB_CATALOG: $LLMLB_HOME/supported_models.json if there, else the packaged one.
        catalog_path=v.catalog_path if v.catalog_path is not None else home_catalog(home),
        hf_endpoint=endpoint,
        hf_token=v.hf_token,
        allowed_origins=v.allowed_origins if v.allowed_origins is not None else (endpoint,),
        origin_timeout_s=v.origin_timeout_s,
        heartbeat_interval_ms=v.heartbeat_interval_ms,
        heartbeat_timeout_ms=v.heartbeat_timeout_ms,
        fleet_token_ttl_s=v.fleet_token_ttl_s,
        replica_timeout_ms=v.replica_timeout_ms,
        log_format=v.log_format,
        log_level=v.log_level,
        otel=load_otel(layers),
        access_log=v.access_log,
        http_listen=v.http_listen,
        bulk_listen=bulk,
        auth=v.auth,
        admin_key=admin_key,
        unknown_key_cache=v.unknown_key_cache,
        unknown_key_ttl_s=v.unknown_key_ttl_s,
        unknown_key_rate=v.unknown_key_rate,
        tls_cert=v.tls_cert,
        tls_key=v.tls_key,
        tls_client_ca=v.tls_client_ca,
        routing=v.routing,
        node_max_inflight=v.node_max_inflight,
        node_queue_allowance=v.node_queue_allowance,
        queue_size=v.queue_size,
        queue_timeout_s=v.queue_timeout_s,
        max_queue_wait_s=v.max_queue_wait_s,
        request_timeout_s=v.request_timeout_s,
        route_attempts=v.route_attempts,
        cooldown_failures=v.cooldown_failures,
        cooldown_s=v.cooldown_s,
        max_body_mb=v.max_body_mb,
        http_limits=_http_limits(v),
        stop_grace_s=v.stop_grace_s,
        usage_flush_s=v.usage_flush_s,
        key_limits_sync_s=v.key_limits_sync_s,
        schedule_interval_s=v.schedule_interval_s,
        schedule_lease_s=v.schedule_lease_s,
        scale_up_queue_wait_s=v.scale_up_queue_wait_s,
        scale_up_inflight=v.scale_up_inflight,
        scale_up_window_s=v.scale_up_window_s,
        scale_down_idle_s=v.scale_down_idle_s,
        scale_down_window_s=v.scale_down_window_s,
        workers=v.workers,
        shared_ports=v.shared_ports,
    )


def resolve_models_dir(
    flag: Path | None = None, env: Mapping[str, str] | None = None, home: Path | None = None
) -> Path:
    """A node's models dir: ``--models-dir`` > ``XLLM_MODELS_DIR`` > ``LLM_MODELS_DIR`` > default.

    The default is ``<home>/models``; home is ``--home``, else ``$LLMLB_HOME`` (``~/.llmlb``), and its
    ``.env`` file is read too.
    """
    home = _home(home, env)
    found = flag or _layers(home, env).raw("XLLM_MODELS_DIR", "LLM_MODELS_DIR")
    return Path(found or home / "models").expanduser()


def load_node_config(
    *,
    models_dir: Path | None = None,
    shared_dir: Path | None = None,
    balancer: str | None = None,
    grpc_listen: str | None = None,
    advertise: str | None = None,
    node_id: str | None = None,
    backend: str | None = None,
    download_via: str | None = None,
    max_downloads: int | str | None = None,
    download_timeout_s: float | str | None = None,
    download_stall_timeout_s: float | str | None = None,
    peer_fetch: bool | None = None,
    log_format: str | None = None,
    log_level: str | None = None,
    api_key: str | None = None,
    metrics_listen: str | None = None,
    home: Path | None = None,
    env: Mapping[str, str] | None = None,
    memory_budget_mb: int | str | None = None,
    labels: Sequence[str] | None = None,
) -> NodeConfig:
    """Builds a node's config: each argument is an ``xllm serve`` flag and wins over the environment."""
    home = _home(home, env)
    layers = _layers(home, env)
    flags: dict[str, Any] = {
        "home": home,
        "models_dir": models_dir,
        "shared_dir": shared_dir,
        "balancer": balancer,
        "grpc_listen": grpc_listen,
        "advertise": advertise,
        "node_id": node_id,
        "backend": backend,
        "download_via": download_via,
        "max_downloads": max_downloads,
        "download_timeout_s": download_timeout_s,
        "download_stall_timeout_s": download_stall_timeout_s,
        "peer_fetch": peer_fetch,
        "log_format": log_format,
        "log_level": log_level,
        "api_key": api_key,
        "metrics_listen": metrics_listen,
        "memory_budget_mb": memory_budget_mb,
        "labels": tuple(labels) if labels else None,
    }
    v = load(NodeSchema, layers, flags)
    return node_config(v, home, port_set=layers.raw("XLLM_BULK_PORT") is not None, otel=load_otel(layers))


def node_config(v: NodeSchema, home: Path, port_set: bool, otel: tuple[tuple[str, str], ...]) -> NodeConfig:
    """The ``NodeConfig`` the node runs on, from its checked settings and the values computed from them."""
    endpoint = v.hf_endpoint.rstrip("/")
    bulk = v.bulk_listen
    if bulk is None:  # beside the gRPC port, on the same interface, unless told otherwise
        bulk = _bulk_beside(v.grpc_listen, v.bulk_port, port_set)
    return NodeConfig(
        home=home,
        models_dir=(v.models_dir or home / "models").expanduser(),
        shared_dir=v.shared_dir.expanduser() if v.shared_dir is not None else None,
        balancer=v.balancer,
        grpc_listen=v.grpc_listen,
        advertise=v.advertise,
        node_id=v.node_id,
        backend=v.backend,
        download_via=v.download_via,
        hf_endpoint=endpoint,
        hf_token=v.hf_token,
        allowed_origins=v.allowed_origins if v.allowed_origins is not None else (endpoint,),
        max_downloads=v.max_downloads,
        download_stall_timeout_s=v.download_stall_timeout_s,
        download_timeout_s=v.download_timeout_s,
        peer_fetch=v.peer_fetch,
        download_connections=v.download_connections,
        download_piece_mb=v.download_piece_mb,
        bulk_listen=bulk,
        shared_dir_timeout_s=v.shared_dir_timeout_s,
        local_scan_interval_s=v.local_scan_interval_s,
        auth_token=v.auth_token or Secret(),
        log_format=v.log_format,
        log_level=v.log_level,
        otel=otel,
        api_key=v.api_key or Secret(),
        tls_ca=v.tls_ca,
        tls_cert=v.tls_cert,
        tls_key=v.tls_key,
        metrics_listen=v.metrics_listen,
        http_limits=_http_limits(v),
        max_body_mb=v.max_body_mb,
        drain_timeout_s=v.drain_timeout_s,
        memory_budget_mb=v.memory_budget_mb,
        labels=v.labels,
        pool=PoolSettings(**{f: getattr(v, f) for f in PoolSettings.__dataclass_fields__}),
    )
