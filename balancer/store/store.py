"""The balancer's metadata store: catalogue and manifests, nodes, durable node commands, API keys,
the secrets the balancer generates for itself, and the scheduler's deployments.

Transport-neutral and async. It takes and returns only the dataclasses of ``common.types`` (and the
scheduler's ``Deployment``); rows of
``balancer.store.tables`` never leave this package.

Over the usual size on purpose: every table's queries share one write lock, one session factory and
the engine-specific upsert choice, and split by table they would each need all three.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from balancer.scheduler.deployment import Deployment
from balancer.store import converters
from balancer.store.engine import DEFAULT_POOL_SIZE, async_url, is_memory_sqlite, make_async_engine
from balancer.store.migrate import migrate
from balancer.store.tables import (
    ApiKeyRow,
    CheckedSession,
    DeploymentRow,
    LeaseRow,
    ManifestFileRow,
    ModelRow,
    NodeCommandRow,
    NodeRow,
    ReplicaRow,
    SecretRow,
    UsageRow,
)
from balancer.store.unavailable import mapped
from common.types import ApiKey, CommandKind, KeyLimits, Model, Node, NodeCommand, NodeState, UsageCount

log = structlog.get_logger(__name__)


def _now() -> datetime:
    return datetime.now(UTC)


class Store:
    """Async access to the balancer's metadata. Build it with :meth:`open`; :meth:`close` it at exit."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False, sync_session_class=CheckedSession)
        # One writer at a time (SQLite's own rule), so read-then-write steps in a transaction are atomic.
        self._write_lock = asyncio.Lock()
        self._closed = False

    @classmethod
    async def open(cls, url: str, *, pool_size: int = DEFAULT_POOL_SIZE) -> Store:
        """Open the store at ``url`` and migrate its schema to the newest revision first.

        ``url`` is ``sqlite+aiosqlite:////abs/path/llmlb.db`` (the file's parent directories are
        created) or ``postgresql+asyncpg://user:password@host:port/database`` (the database must
        exist); a URL without a driver gets the async one. ``pool_size`` is how many connections a
        PostgreSQL store keeps open. In-memory SQLite is refused: the migration and the store would
        each see a different database.
        """
        parsed = async_url(url)
        if is_memory_sqlite(parsed):
            raise ValueError("an in-memory SQLite store is not supported; give a file path")
        revision = await migrate(parsed)
        log.info("store.migrated", url=parsed.render_as_string(hide_password=True), revision=revision)
        return cls(make_async_engine(parsed, pool_size=pool_size))

    async def close(self) -> None:
        """Close every connection; the store refuses any use afterwards."""
        self._closed = True
        await self._engine.dispose()

    def _check_open(self) -> None:
        # A disposed engine would quietly open a fresh connection that nothing ever closes.
        if self._closed:
            raise RuntimeError("the balancer's store is closed")

    @asynccontextmanager
    async def _reading(self) -> AsyncIterator[AsyncSession]:
        """A session for reads; a database that cannot be reached raises ``StoreUnavailable``."""
        self._check_open()
        with mapped("read"):
            async with self._sessions() as session:
                yield session

    @asynccontextmanager
    async def _writing(self) -> AsyncIterator[AsyncSession]:
        """A session whose transaction commits on exit and rolls back on an exception.

        A database that cannot be reached (connecting, in a statement or at the commit) raises
        ``StoreUnavailable``: the transaction is rolled back, unless the connection dropped during
        the commit itself, when the server alone knows whether it landed.
        """
        self._check_open()
        with mapped("write"):
            async with self._write_lock, self._sessions.begin() as session:
                yield session

    # models

    async def _model_files(self, session: AsyncSession, model_id: str) -> list[ManifestFileRow]:
        query = select(ManifestFileRow).where(ManifestFileRow.model_id == model_id)
        return list(await session.scalars(query.order_by(ManifestFileRow.position)))

    async def upsert_model(self, model: Model) -> Model:
        """Insert ``model`` or replace its fields and its whole file list, in one transaction.

        An existing model keeps its ``created_at``; a tombstoned one comes back as a new registration.
        Returns the model as stored.
        """
        now = _now()
        async with self._writing() as session:
            row = await session.get(ModelRow, model.id)
            if row is None:
                row = ModelRow(id=model.id, created_at=converters.optional_utc(model.created_at) or now)
                session.add(row)
            elif row.deleted_at is not None:
                row.created_at = now
            converters.fill_model_row(row, model)
            row.deleted_at = None
            row.updated_at = now
            await session.flush()  # the model row must exist before its files reference it
            await session.execute(delete(ManifestFileRow).where(ManifestFileRow.model_id == model.id))
            files = converters.file_rows(model.id, model.files)
            session.add_all(files)
            await session.flush()
            return converters.model(row, files)

    async def get_model(self, model_id: str) -> Model | None:
        """The live model ``model_id`` with its files in manifest order; None if unknown or deleted."""
        async with self._reading() as session:
            row = await session.get(ModelRow, model_id)
            if row is None or row.deleted_at is not None:
                return None
            return converters.model(row, await self._model_files(session, model_id))

    async def list_models(self) -> list[Model]:
        """Every live model, sorted by id."""
        async with self._reading() as session:
            # Sorted here, not by ORDER BY: PostgreSQL sorts text by the database's collation (often
            # case-blind, punctuation-blind), SQLite by code point; both engines must list alike.
            live = await session.scalars(select(ModelRow).where(ModelRow.deleted_at.is_(None)))
            rows = sorted(live, key=lambda row: row.id)
            files: dict[str, list[ManifestFileRow]] = {row.id: [] for row in rows}
            query = (
                select(ManifestFileRow)
                .join(ModelRow, ModelRow.id == ManifestFileRow.model_id)
                .where(ModelRow.deleted_at.is_(None))
                .order_by(ManifestFileRow.model_id, ManifestFileRow.position)
            )
            for file in await session.scalars(query):
                files[file.model_id].append(file)
            return [converters.model(row, files[row.id]) for row in rows]

    async def delete_model(self, model_id: str) -> bool:
        """Delete a live model and tell every known node to drop its copy; False if there is none.

        Tombstones the row, removes its files and queues one DELETE_MODEL command per node, all in one
        transaction, so a crash right after leaves either everything or nothing done.
        """
        now = _now()
        async with self._writing() as session:
            row = await session.get(ModelRow, model_id)
            if row is None or row.deleted_at is not None:
                return False
            row.deleted_at = now
            row.updated_at = now
            await session.execute(delete(ManifestFileRow).where(ManifestFileRow.model_id == model_id))
            node_ids = list(await session.scalars(select(NodeRow.id).order_by(NodeRow.id)))
            session.add_all(
                NodeCommandRow(
                    node_id=node_id, kind=CommandKind.DELETE_MODEL.value, model_id=model_id, created_at=now
                )
                for node_id in node_ids
            )
        log.info("store.model_deleted", model_id=model_id, nodes_notified=len(node_ids))
        return True

    async def seed_catalog(self, models: Sequence[Model]) -> list[str]:
        """Insert the catalogue models whose id was never stored (live or deleted); return their ids.

        Never overwrites: a model registered at run time, or deleted by an operator, stays as it is.
        Seeded models are marked ``from_catalog``.
        """
        now = _now()
        new: dict[str, Model] = {}
        async with self._writing() as session:
            known = set(await session.scalars(select(ModelRow.id)))
            for model in models:
                if model.id in known or model.id in new:
                    continue
                new[model.id] = model
                row = ModelRow(id=model.id, created_at=now, updated_at=now, deleted_at=None)
                converters.fill_model_row(row, model)
                row.from_catalog = True
                session.add(row)
            await session.flush()  # the model rows must exist before their files reference them
            for model in new.values():
                session.add_all(converters.file_rows(model.id, model.files))
        inserted = list(new)
        if inserted:
            log.info("store.catalog_seeded", models=len(inserted))
        return inserted

    # nodes

    async def upsert_node(self, node: Node, check: Callable[[Node | None], Node] | None = None) -> Node:
        """Insert or update ``node``; an existing node keeps its ``registered_at``.

        ``check``, when given, sees the node as stored (None when new) in the same transaction and
        returns the node to write instead of ``node``, or raises to write nothing: two registrations
        of one id cannot both pass it. ``last_seen_at`` defaults to now: registering is contact.
        Returns the node as stored.
        """
        now = _now()
        async with self._writing() as session:
            row = await session.get(NodeRow, node.id, with_for_update=True)
            if check is not None:
                node = check(None if row is None else converters.node(row))
            state = node.state
            if row is None:
                row = NodeRow(id=node.id, registered_at=converters.optional_utc(node.registered_at) or now)
                session.add(row)
            elif row.replica_id is not None:  # attached to a replica: registering again is not leaving
                state = NodeState(row.state)
            converters.fill_node_row(row, replace(node, state=state))
            row.last_seen_at = converters.optional_utc(node.last_seen_at) or now
            await session.flush()
            return converters.node(row)

    async def get_node(self, node_id: str) -> Node | None:
        """The node ``node_id``, or None if it is unknown."""
        async with self._reading() as session:
            row = await session.get(NodeRow, node_id)
            return None if row is None else converters.node(row)

    async def list_nodes(self) -> list[Node]:
        """Every known node, sorted by id."""
        async with self._reading() as session:
            # Code-point order on every engine (see list_models).
            rows = sorted(await session.scalars(select(NodeRow)), key=lambda row: row.id)
            return [converters.node(row) for row in rows]

    async def attach_node(self, node_id: str, replica_id: str, live: str) -> bool:
        """Record that ``replica_id`` holds the node's session now, with what the node reports.

        False when the node is unknown (removed meanwhile).
        """
        values = {
            "state": NodeState.ONLINE.value,
            "replica_id": replica_id,
            "live": live,
            "last_seen_at": _now(),
        }
        async with self._writing() as session:
            done = await session.execute(
                update(NodeRow).where(NodeRow.id == node_id).values(values).returning(NodeRow.id)
            )
            return done.first() is not None

    async def update_node_live(self, node_id: str, replica_id: str, live: str) -> bool:
        """Replace what the node reports, if ``replica_id`` still holds its session; True if it did."""
        query = update(NodeRow).where(NodeRow.id == node_id, NodeRow.replica_id == replica_id)
        async with self._writing() as session:
            done = await session.execute(query.values(live=live).returning(NodeRow.id))
            return done.first() is not None

    async def detach_node(self, node_id: str, replica_id: str) -> bool:
        """The node's session on ``replica_id`` ended: it is offline, unless another replica holds it now.

        True when this changed the node (``replica_id`` was still the one holding it).
        """
        values = {"state": NodeState.OFFLINE.value, "replica_id": None, "live": None, "last_seen_at": _now()}
        query = update(NodeRow).where(NodeRow.id == node_id, NodeRow.replica_id == replica_id)
        async with self._writing() as session:
            done = await session.execute(query.values(values).returning(NodeRow.id))
            return done.first() is not None

    # replicas

    def _db_now(self) -> Any:
        """The database's clock on PostgreSQL (replicas on several hosts agree on it), else ours."""
        return func.now() if self._engine.dialect.name == "postgresql" else _now()

    async def replica_beat(self, replica_id: str) -> bool:
        """Record that ``replica_id`` is alive now. False when its row was missing (now recorded again)."""
        async with self._writing() as session:
            done = await session.execute(
                update(ReplicaRow)
                .where(ReplicaRow.id == replica_id)
                .values(seen_at=self._db_now())
                .returning(ReplicaRow.id)
            )
            if done.first() is not None:
                return True
            now = self._db_now()
            session.add(ReplicaRow(id=replica_id, started_at=now, seen_at=now))
            return False

    async def replicas(self) -> list[str]:
        """Every recorded replica's id."""
        async with self._reading() as session:
            return sorted(await session.scalars(select(ReplicaRow.id)))

    async def stale_replicas(self, silent_s: float) -> list[str]:
        """Replicas whose last beat is older than ``silent_s`` seconds, by the database's clock."""
        query = select(ReplicaRow.id).where(ReplicaRow.seen_at < self._db_now() - timedelta(seconds=silent_s))
        async with self._reading() as session:
            return sorted(await session.scalars(query))

    async def release_replica(self, replica_id: str) -> list[str]:
        """Forget a replica that stopped or died: the nodes it held are offline. Their ids."""
        values = {"state": NodeState.OFFLINE.value, "replica_id": None, "live": None}
        async with self._writing() as session:
            released = await session.execute(
                update(NodeRow).where(NodeRow.replica_id == replica_id).values(values).returning(NodeRow.id)
            )
            node_ids = sorted(released.scalars())
            await session.execute(delete(ReplicaRow).where(ReplicaRow.id == replica_id))
        return node_ids

    async def hand_over(self, replica_id: str) -> list[str]:
        """A replica stopping gracefully lets go of its nodes, which stay online until another
        replica holds them (``settle_unheld`` otherwise). Its row goes. The nodes' ids."""
        async with self._writing() as session:
            handed = await session.execute(
                update(NodeRow)
                .where(NodeRow.replica_id == replica_id)
                .values(replica_id=None)
                .returning(NodeRow.id)
            )
            node_ids = sorted(handed.scalars())
            await session.execute(delete(ReplicaRow).where(ReplicaRow.id == replica_id))
        return node_ids

    async def settle_unheld(self, node_id: str) -> bool:
        """The node, handed over and held by no replica since, is offline. True if it was still unheld."""
        query = update(NodeRow).where(
            NodeRow.id == node_id, NodeRow.replica_id.is_(None), NodeRow.state != NodeState.OFFLINE.value
        )
        async with self._writing() as session:
            done = await session.execute(
                query.values(state=NodeState.OFFLINE.value, live=None).returning(NodeRow.id)
            )
            return done.first() is not None

    async def release_unattached(self) -> list[str]:
        """Nodes recorded online by no live replica (e.g. written before replicas existed) are offline."""
        query = update(NodeRow).where(NodeRow.replica_id.is_(None), NodeRow.state != NodeState.OFFLINE.value)
        async with self._writing() as session:
            released = await session.execute(
                query.values(state=NodeState.OFFLINE.value).returning(NodeRow.id)
            )
            return sorted(released.scalars())

    async def remove_node(self, node_id: str) -> bool:
        """Forget a node and its pending commands; False if it was unknown."""
        async with self._writing() as session:
            # Explicit, so it holds where the database does not enforce ON DELETE CASCADE.
            await session.execute(delete(NodeCommandRow).where(NodeCommandRow.node_id == node_id))
            removed = await session.execute(
                delete(NodeRow).where(NodeRow.id == node_id).returning(NodeRow.id)
            )
            found = removed.first() is not None
        if found:
            log.info("store.node_removed", node_id=node_id)
        return found

    # durable node commands

    async def add_command(self, node_id: str, kind: CommandKind, model_id: str) -> NodeCommand:
        """Queue a command for a node until it acknowledges it. Raises KeyError for an unknown node."""
        async with self._writing() as session:
            if await session.get(NodeRow, node_id) is None:
                raise KeyError(node_id)
            row = NodeCommandRow(node_id=node_id, kind=kind.value, model_id=model_id, created_at=_now())
            session.add(row)
            await session.flush()
            return converters.command(row)

    async def pending_commands(self, node_id: str) -> list[NodeCommand]:
        """The commands a node has not acknowledged yet, oldest first."""
        query = select(NodeCommandRow).where(NodeCommandRow.node_id == node_id).order_by(NodeCommandRow.id)
        async with self._reading() as session:
            return [converters.command(row) for row in await session.scalars(query)]

    async def pending_by_node(self) -> dict[str, list[NodeCommand]]:
        """Every waiting command, by node, each node's oldest first."""
        by_node: dict[str, list[NodeCommand]] = {}
        async with self._reading() as session:
            for row in await session.scalars(select(NodeCommandRow).order_by(NodeCommandRow.id)):
                by_node.setdefault(row.node_id, []).append(converters.command(row))
        return by_node

    async def nodes_with_commands(self) -> list[str]:
        """The nodes that have commands waiting, by id."""
        async with self._reading() as session:
            return sorted(await session.scalars(select(NodeCommandRow.node_id).distinct()))

    async def cancel_commands(self, node_id: str, kind: CommandKind) -> int:
        """Drops a node's waiting commands of ``kind`` (a drain undone before it was carried out)."""
        async with self._writing() as session:
            removed = await session.execute(
                delete(NodeCommandRow)
                .where((NodeCommandRow.node_id == node_id) & (NodeCommandRow.kind == kind.value))
                .returning(NodeCommandRow.id)
            )
            return len(removed.all())

    async def ack_command(self, command_id: int) -> bool:
        """Clear a command its node has carried out; False if there is no such pending command."""
        async with self._writing() as session:
            removed = await session.execute(
                delete(NodeCommandRow).where(NodeCommandRow.id == command_id).returning(NodeCommandRow.id)
            )
            return removed.first() is not None

    # api keys

    async def add_key(self, key: ApiKey) -> ApiKey:
        """Store a new key; ``created_at`` defaults to now. Raises ValueError if its id or hash exists."""
        async with self._writing() as session:
            clash = await session.scalar(
                select(func.count())
                .select_from(ApiKeyRow)
                .where((ApiKeyRow.id == key.id) | (ApiKeyRow.secret_hash == key.secret_hash))
            )
            if clash:
                raise ValueError(f"an API key with id {key.id!r} or the same secret is already stored")
            row = converters.api_key_row(key, created_at=converters.optional_utc(key.created_at) or _now())
            session.add(row)
            try:
                await session.flush()
            except IntegrityError:  # stored in between by another process on the same database
                raise ValueError(
                    f"an API key with id {key.id!r} or the same secret is already stored"
                ) from None
            return converters.api_key(row)

    async def find_key(self, secret_hash: str) -> ApiKey | None:
        """The key whose secret hashes to ``secret_hash``, revoked or not (the caller decides)."""
        async with self._reading() as session:
            row = await session.scalar(select(ApiKeyRow).where(ApiKeyRow.secret_hash == secret_hash))
            return None if row is None else converters.api_key(row)

    async def list_keys(self) -> list[ApiKey]:
        """Every key, revoked ones included, oldest first."""
        async with self._reading() as session:
            rows = sorted(await session.scalars(select(ApiKeyRow)), key=lambda row: (row.created_at, row.id))
            return [converters.api_key(row) for row in rows]

    async def revoke_key(self, key_id_or_prefix: str) -> bool:
        """Revoke the live key with this id, else the one live key with this prefix.

        False when no live key matches. Raises ValueError when a prefix matches several live keys, so
        an operator never revokes more than the one key they meant.
        """
        async with self._writing() as session:
            row = await session.get(ApiKeyRow, key_id_or_prefix)
            if row is None:
                matches = list(
                    await session.scalars(
                        select(ApiKeyRow).where(
                            ApiKeyRow.prefix == key_id_or_prefix, ApiKeyRow.revoked_at.is_(None)
                        )
                    )
                )
                if len(matches) > 1:
                    raise ValueError(
                        f"prefix {key_id_or_prefix!r} matches {len(matches)} keys; give the key id"
                    )
                row = matches[0] if matches else None
            if row is None or row.revoked_at is not None:
                return False
            row.revoked_at = _now()
        log.info("store.key_revoked", key_id=row.id)
        return True

    async def touch_key(self, key_id: str, at: datetime) -> None:
        """Record that a key was used at ``at``; an unknown key is ignored."""
        async with self._writing() as session:
            await session.execute(
                update(ApiKeyRow).where(ApiKeyRow.id == key_id).values(last_used_at=converters.utc(at))
            )

    async def set_key_limits(self, key_id: str, limits: KeyLimits) -> ApiKey | None:
        """Replaces the limits of the key with this id; None when no key has it."""
        async with self._writing() as session:
            row = await session.get(ApiKeyRow, key_id)
            if row is None:
                return None
            for name, value in converters.limit_columns(limits).items():
                setattr(row, name, value)
            await session.flush()
            return converters.api_key(row)

    async def count_keys(self) -> int:
        """How many keys were ever stored, revoked ones included."""
        async with self._reading() as session:
            return int(await session.scalar(select(func.count()).select_from(ApiKeyRow)) or 0)

    # usage

    async def add_usage(self, counts: Sequence[UsageCount]) -> None:
        """Adds ``counts`` to the stored rows of their (key, model, minute), in one transaction."""
        if not counts:
            return
        insert = postgresql_insert if self._engine.dialect.name == "postgresql" else sqlite_insert
        async with self._writing() as session:
            for c in counts:
                statement = insert(UsageRow).values(
                    key_id=c.key_id,
                    model=c.model,
                    minute=converters.utc(c.minute),
                    requests=c.requests,
                    errors=c.errors,
                    prompt_tokens=c.prompt_tokens,
                    completion_tokens=c.completion_tokens,
                )
                # Added, not replaced: several replicas (or flushes) may count the same minute.
                await session.execute(
                    statement.on_conflict_do_update(
                        index_elements=["key_id", "model", "minute"],
                        set_={
                            name: getattr(UsageRow, name) + getattr(statement.excluded, name)
                            for name in ("requests", "errors", "prompt_tokens", "completion_tokens")
                        },
                    )
                )

    async def usage(
        self, since: datetime, *, key_id: str | None = None, model: str | None = None
    ) -> list[UsageCount]:
        """Stored usage from the minute holding ``since`` on, optionally of one key and one model;
        ordered by key, model and minute."""
        start = converters.utc(since).replace(second=0, microsecond=0)
        query = select(UsageRow).where(UsageRow.minute >= start)
        if key_id is not None:
            query = query.where(UsageRow.key_id == key_id)
        if model is not None:
            query = query.where(UsageRow.model == model)
        async with self._reading() as session:
            rows = await session.scalars(query)
            found = [
                UsageCount(
                    r.key_id, r.model, r.minute, r.requests, r.errors, r.prompt_tokens, r.completion_tokens
                )
                for r in rows
            ]
        # Sorted here, not by the database: its collation must not decide the order.
        return sorted(found, key=lambda c: (c.key_id, c.model, c.minute))

    async def usage_totals(self, key_ids: Sequence[str], since: datetime) -> dict[str, tuple[int, int]]:
        """Per key of ``key_ids``: (requests, prompt plus completion tokens) stored from the minute
        holding ``since`` on, every model together; a key with no row is absent."""
        if not key_ids:
            return {}
        start = converters.utc(since).replace(second=0, microsecond=0)
        query = (
            select(
                UsageRow.key_id,
                func.sum(UsageRow.requests),
                func.sum(UsageRow.prompt_tokens + UsageRow.completion_tokens),
            )
            .where(UsageRow.minute >= start, UsageRow.key_id.in_(list(key_ids)))
            .group_by(UsageRow.key_id)
        )
        async with self._reading() as session:
            rows = await session.execute(query)
            return {key_id: (int(requests or 0), int(tokens or 0)) for key_id, requests, tokens in rows}

    # secrets

    async def replace_secret(self, name: str, value: str) -> str:
        """Stores ``value`` under ``name`` in place of any earlier secret; returns it."""
        insert = postgresql_insert if self._engine.dialect.name == "postgresql" else sqlite_insert
        statement = insert(SecretRow).values(name=name, secret=value, created_at=_now())
        statement = statement.on_conflict_do_update(
            index_elements=["name"], set_={"secret": value, "created_at": _now()}
        )
        async with self._writing() as session:
            await session.execute(statement)
        log.info("store.secret_replaced", name=name)  # never the secret itself
        return value

    async def secret(self, name: str, generate: Callable[[], str]) -> str:
        """The secret stored under ``name``; on first use, ``generate()``'s value, stored and returned.

        Every caller gets the same value: when balancers sharing the database create it at once, the
        first insert wins and the others' inserts do nothing.
        """
        async with self._reading() as session:
            row = await session.get(SecretRow, name)
            if row is not None:
                return row.secret
        # Insert-or-nothing as the transaction's first statement: a read first would make SQLite
        # refuse the write outright when another process wrote in between.
        insert = postgresql_insert if self._engine.dialect.name == "postgresql" else sqlite_insert
        statement = (
            insert(SecretRow)
            .values(name=name, secret=generate(), created_at=_now())
            .on_conflict_do_nothing(index_elements=["name"])
        )
        async with self._writing() as session:
            created = (await session.execute(statement)).rowcount == 1  # type: ignore[attr-defined]
        if created:
            log.info("store.secret_created", name=name)  # never the secret itself
        async with self._reading() as session:
            row = await session.get(SecretRow, name)
            if row is None:  # pragma: no cover  # inserted above, or by the balancer that won
                raise RuntimeError(f"secret {name!r} vanished from the store")
            return row.secret

    # deployments

    async def put_deployment(self, deployment: Deployment) -> Deployment:
        """Insert or replace the deployment of its model; an existing one keeps its ``created_at``.

        Returns it as stored, with both times set.
        """
        now = _now()
        async with self._writing() as session:
            row = await session.get(DeploymentRow, deployment.model_id)
            if row is None:
                created = converters.optional_utc(deployment.created_at) or now
                row = DeploymentRow(model_id=deployment.model_id, created_at=created)
                session.add(row)
            row.copies = deployment.copies
            row.min_copies = deployment.min_copies
            row.max_copies = deployment.max_copies
            row.selector = dict(deployment.selector)
            row.memory_mb = deployment.memory_mb
            row.updated_at = now
            await session.flush()
            return self._deployment(row)

    async def get_deployment(self, model_id: str) -> Deployment | None:
        """The deployment of ``model_id``, or None."""
        async with self._reading() as session:
            row = await session.get(DeploymentRow, model_id)
            return None if row is None else self._deployment(row)

    async def list_deployments(self) -> list[Deployment]:
        """Every deployment, by model id (code-point order on every engine, see ``list_models``)."""
        async with self._reading() as session:
            rows = sorted(await session.scalars(select(DeploymentRow)), key=lambda row: row.model_id)
            return [self._deployment(row) for row in rows]

    async def delete_deployment(self, model_id: str) -> bool:
        """Forget the deployment of ``model_id``; False if there was none. Its copies are the
        scheduler's to remove."""
        async with self._writing() as session:
            removed = await session.execute(
                delete(DeploymentRow)
                .where(DeploymentRow.model_id == model_id)
                .returning(DeploymentRow.model_id)
            )
            return removed.first() is not None

    # leases

    async def take_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Takes or renews the lease ``name`` for ``holder`` until ``ttl_s`` from now: True when
        ``holder`` holds it now. Another holder's lease is taken only once it has expired."""
        now = _now()
        until = now + timedelta(seconds=ttl_s)
        async with self._writing() as session:
            renewed = await session.execute(
                update(LeaseRow)
                .where(LeaseRow.name == name, (LeaseRow.holder == holder) | (LeaseRow.expires_at < now))
                .values(holder=holder, expires_at=until)
            )
            if renewed.rowcount == 1:  # type: ignore[attr-defined]
                return True
        insert = postgresql_insert if self._engine.dialect.name == "postgresql" else sqlite_insert
        statement = (
            insert(LeaseRow)
            .values(name=name, holder=holder, expires_at=until)
            .on_conflict_do_nothing(index_elements=["name"])
        )
        async with self._writing() as session:
            inserted: int = (await session.execute(statement)).rowcount  # type: ignore[attr-defined]
            return inserted == 1

    async def drop_lease(self, name: str, holder: str) -> None:
        """Gives the lease up at once, if ``holder`` holds it: another replica takes it on its next try."""
        async with self._writing() as session:
            await session.execute(delete(LeaseRow).where(LeaseRow.name == name, LeaseRow.holder == holder))

    @staticmethod
    def _deployment(row: DeploymentRow) -> Deployment:
        return Deployment(
            model_id=row.model_id,
            copies=row.copies,
            min_copies=row.min_copies,
            max_copies=row.max_copies,
            selector=dict(row.selector),
            memory_mb=row.memory_mb,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )
