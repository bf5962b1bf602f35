"""Internal types shared by the balancer and the nodes.

Plain dataclasses: protobuf lives only in the servicers' converters, pydantic only in the HTTP shim.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime


class FileFormat(enum.StrEnum):
    """What a manifest file is, decided by its name (see ``common.formats``)."""

    GGUF = "gguf"
    SAFETENSORS = "safetensors"
    METAL = "metal"
    ONNX = "onnx"
    WHISPER = "whisper"
    CONFIG = "config"
    OTHER = "other"


class Backend(enum.StrEnum):
    """A compute backend a node offers, and that a manifest file may be needed by."""

    CUDA = "cuda"
    METAL = "metal"
    CPU = "cpu"
    ANY = "any"


class Capability(enum.StrEnum):
    """What a model can be asked to do; routing picks nodes by these."""

    CHAT = "chat"
    COMPLETION = "completion"
    EMBEDDING = "embedding"
    TRANSCRIPTION = "transcription"
    SPEECH = "speech"
    IMAGE = "image"


class ModelSource(enum.StrEnum):
    """Where a model's files originally come from."""

    HF = "hf"
    LOCAL = "local"


@dataclass(frozen=True, slots=True)
class ManifestFile:
    """One file of a model, as the balancer pins it."""

    filename: str
    format: FileFormat
    size_bytes: int
    sha256: str = ""  # empty when the origin does not publish it (small non-LFS files)
    backends: tuple[Backend, ...] = (Backend.ANY,)

    def needed_by(self, backend: Backend) -> bool:
        """True when a node running ``backend`` must hold this file."""
        return Backend.ANY in self.backends or backend in self.backends


@dataclass(slots=True)
class Model:
    """A catalogue entry with its manifest: everything the balancer knows of one model."""

    id: str
    name: str
    source: ModelSource
    repo_id: str
    revision: str  # pinned commit sha; empty for a catalogue entry not yet pinned at an origin
    origin: str  # base URL of the origin the files come from (e.g. https://huggingface.co)
    files: list[ManifestFile] = field(default_factory=list)
    capabilities: list[Capability] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    required_vram_mb: int = 0
    chat_template: str = ""
    from_catalog: bool = False
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def total_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files)


class ModelState(enum.StrEnum):
    """How far along one model is on one node; the order below is how far along, least first."""

    ABSENT = "absent"
    FAILED = "failed"
    DOWNLOADING = "downloading"
    PRESENT = "present"  # every file on disk, not loaded
    LOADING = "loading"
    READY = "ready"

    @property
    def rank(self) -> int:
        """Position in the order above, for "the most advanced state on any node"."""
        return _MODEL_STATE_ORDER.index(self)

    @property
    def on_disk(self) -> bool:
        """True once every file is held: present, loading or ready."""
        return self.rank >= ModelState.PRESENT.rank


_MODEL_STATE_ORDER: tuple[ModelState, ...] = tuple(ModelState)


@dataclass(slots=True)
class ModelOnNode:
    """One model's state on one node: what a node reports of itself and what the balancer keeps of it.

    A node leaves ``node_id`` empty in its own book (the link fills it in); the balancer never takes it
    from a node's message, only from the node's session.
    """

    node_id: str
    model_id: str
    state: ModelState = ModelState.ABSENT
    downloaded_bytes: int = 0
    total_bytes: int = 0
    error: str = ""
    memory_mb: int = 0  # what the loaded model takes there, as the node estimates it
    pinned: bool = False  # a scheduled copy: the node keeps it loaded
    slots: int = 0  # sequences its engine runs at once there, loaded; 0: not reported (the node-wide cap)

    @property
    def ready(self) -> bool:
        return self.state is ModelState.READY


class NodeState(enum.StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"
    DRAINING = "draining"


@dataclass(frozen=True, slots=True)
class GpuDevice:
    index: int
    name: str
    memory_total_mb: int
    memory_free_mb: int = 0


@dataclass(slots=True)
class Node:
    """A node as the balancer records it."""

    id: str
    address: str
    backends: list[Backend] = field(default_factory=list)
    gpus: list[GpuDevice] = field(default_factory=list)
    runtimes: list[str] = field(default_factory=list)
    version: str = ""
    state: NodeState = NodeState.OFFLINE
    registered_at: datetime | None = None
    last_seen_at: datetime | None = None
    replica_id: str = ""  # the balancer replica holding its session; empty while it has none
    live: str = field(default="", repr=False)  # what it last reported there (JSON, for other replicas)
    owner_key_id: str = ""  # the key the node id belongs to (see ``balancer.fleet.owners``); "": none


class CommandKind(enum.StrEnum):
    DELETE_MODEL = "delete_model"
    PREFETCH = "prefetch"
    DRAIN = "drain"  # model_id is empty
    UNDRAIN = "undrain"  # take new work again; model_id is empty
    PIN = "pin"  # fetch, load and keep loaded: a copy the scheduler placed
    UNLOAD = "unload"  # unload and unpin; the files stay


@dataclass(frozen=True, slots=True)
class NodeCommand:
    """A durable instruction for one node; cleared when the node acknowledges it."""

    id: int
    node_id: str
    kind: CommandKind
    model_id: str
    created_at: datetime | None = None


class Scope(enum.StrEnum):
    API = "api"
    NODE = "node"
    ADMIN = "admin"


LIMIT_NAMES = ("rpm", "tpm", "max_parallel", "daily_tokens", "monthly_tokens", "models")


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """What one API key may use; 0 (or no models) means no limit of that kind.

    Tokens are prompt plus completion tokens as usage counts them; days and months are UTC.
    """

    rpm: int = 0  # requests started per minute
    tpm: int = 0  # tokens per minute
    max_parallel: int = 0  # requests in flight at once
    daily_tokens: int = 0
    monthly_tokens: int = 0
    models: tuple[str, ...] = ()  # the only models the key may use and see; empty: all

    @property
    def any(self) -> bool:
        """Whether any limit is set (a key without one costs the request path nothing)."""
        return bool(self.rpm or self.tpm or self.max_parallel or self.daily_tokens or self.monthly_tokens)


NO_LIMITS = KeyLimits()


@dataclass(frozen=True, slots=True)
class ApiKey:
    """An API key as stored: only the hash of the secret is kept."""

    id: str
    name: str
    prefix: str  # first characters of the secret, shown to operators to tell keys apart
    secret_hash: str
    scopes: tuple[Scope, ...]
    created_at: datetime | None = None
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None
    node_id: str = ""  # a node key bound to one node id registers that id only; "": any it owns
    limits: KeyLimits = NO_LIMITS


@dataclass(frozen=True, slots=True)
class UsageCount:
    """What one API key asked of one model in one minute, as the balancer counted it.

    ``key_id`` is "" for requests made with auth off; ``minute`` is the start of the minute, in UTC.
    """

    key_id: str
    model: str
    minute: datetime
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
