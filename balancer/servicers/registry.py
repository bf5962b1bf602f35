"""gRPC ``Registry`` servicer: converts messages and calls ``balancer.registry``."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import grpc.aio
import structlog

from balancer import control
from balancer.fleet import ModelOnNode, NodeInfo, NodeLoad
from balancer.parts import BalancerParts
from balancer.registry import RegisterRequest
from balancer.sessions import Session
from common import converters
from common.errors import ErrorCode, LlmlbError
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import registry_pb2_grpc as rgrpc
from common.pb.llmlb.v1 import types_pb2 as pb
from common.rpc import rpc_errors
from common.types import CommandKind, Node, NodeCommand, NodeState

log = structlog.get_logger(__name__)
MAX_NODE_ID_LENGTH = 128
_NODE_ID = re.compile(r"[A-Za-z0-9._-]+")

Ctx = grpc.aio.ServicerContext[Any, Any]


def _node_status_from_pb(node_id: str, msg: pb.ModelNodeStatus) -> ModelOnNode:
    return ModelOnNode(
        node_id=node_id,  # from the session, never from the message: a node speaks only for itself
        model_id=msg.model_id.lower(),
        state=converters.model_state_from_pb(msg.state),
        downloaded_bytes=msg.downloaded_bytes,
        total_bytes=msg.total_bytes,
        error=msg.error,
    )


def _command_to_pb(cmd: NodeCommand) -> rpb.BalancerMessage:
    msg = rpb.NodeCommand(command_id=cmd.id)
    if cmd.kind is CommandKind.DELETE_MODEL:
        msg.delete_model.model_id = cmd.model_id
    elif cmd.kind is CommandKind.DRAIN:
        msg.drain.SetInParent()
    else:
        msg.prefetch.model_id = cmd.model_id
    return rpb.BalancerMessage(command=msg)


def _node_status_to_pb(s: ModelOnNode) -> pb.ModelNodeStatus:
    return converters.model_node_status_to_pb(
        s.node_id, s.model_id, s.state, s.downloaded_bytes, s.total_bytes, s.error
    )


class RegistryServicer(rgrpc.RegistryServicer):
    def __init__(self, parts: BalancerParts) -> None:
        self._parts = parts
        self._registry = parts.registry
        self._store = parts.store
        self._fleet = parts.fleet
        self._sessions = parts.sessions
        self._config = parts.config
        self._keys = parts.keys
        self._timeout_s = parts.config.heartbeat_timeout_ms / 1000

    def _model_pb(self, model: Any) -> pb.Model:
        msg = converters.model_to_pb(model)
        nodes = self._fleet.model_nodes(model.id)
        msg.nodes.extend(_node_status_to_pb(n) for n in nodes)
        msg.ready = control.model_view(self._fleet, model).ready  # one rule for both doors
        return msg

    @rpc_errors
    async def RegisterModel(self, request: rpb.RegisterModelRequest, context: Ctx) -> pb.Model:
        model = await self._registry.register(
            RegisterRequest(
                repo_id=request.repo_id,
                filename=request.filename,
                revision=request.revision,
                model_id=request.model_id,
                origin=request.origin,
                name=request.name,
                capabilities=converters.capabilities_from_pb(request.capabilities),
                tags=list(request.tags),
                required_vram_mb=request.required_vram_mb,
                chat_template=request.chat_template,
            )
        )
        return self._model_pb(model)

    @rpc_errors
    async def GetModel(self, request: rpb.GetModelRequest, context: Ctx) -> pb.Model:
        return self._model_pb(await self._registry.get(request.model_id))

    @rpc_errors
    async def ListModels(self, request: rpb.ListModelsRequest, context: Ctx) -> rpb.ListModelsResponse:
        return rpb.ListModelsResponse(models=[self._model_pb(m) for m in await self._registry.list_models()])

    @rpc_errors
    async def DeleteModel(self, request: rpb.DeleteModelRequest, context: Ctx) -> rpb.DeleteModelResponse:
        deleted = await control.delete_model(self._parts, request.model_id)
        return rpb.DeleteModelResponse(model_id=deleted.model_id, nodes_notified=deleted.nodes_notified)

    @rpc_errors
    async def GetModelStatus(self, request: rpb.GetModelStatusRequest, context: Ctx) -> rpb.ModelStatus:
        view = self._fleet.status(await self._registry.get(request.model_id))
        return rpb.ModelStatus(
            model_id=view.model_id,
            status=converters.model_state_to_pb(view.status),
            progress=view.progress,
            downloaded_bytes=view.downloaded_bytes,
            total_bytes=view.total_bytes,
            nodes=[_node_status_to_pb(n) for n in view.nodes],
        )

    @rpc_errors
    async def RegisterNode(self, request: rpb.RegisterNodeRequest, context: Ctx) -> rpb.RegisterNodeResponse:
        if not request.address:
            raise LlmlbError(ErrorCode.INVALID_REQUEST, "address (host:port of the node) is required")
        node_id = request.node_id or f"node-{uuid.uuid4().hex[:12]}"
        if len(node_id) > MAX_NODE_ID_LENGTH or not _NODE_ID.fullmatch(node_id):
            raise LlmlbError(
                ErrorCode.INVALID_REQUEST,
                f"node_id {node_id[:80]!r}: at most {MAX_NODE_ID_LENGTH} letters, digits, '-', '_' or '.'",
            )
        backends = [b for b in map(converters.backend_from_pb, request.backends) if b is not None]
        node = await self._store.upsert_node(
            Node(
                id=node_id,
                address=request.address,
                backends=backends,
                gpus=[converters.gpu_from_pb(g) for g in request.gpus],
                runtimes=list(request.runtimes),
                version=request.version,
                state=NodeState.OFFLINE,  # online once its session opens
                last_seen_at=datetime.now(UTC),
            )
        )
        self._fleet.registered(
            NodeInfo(
                node.id,
                node.address,
                frozenset(converters.capabilities_from_pb(request.capabilities)),
                # What routed calls present: the node's own token if it has one, else the fleet's.
                auth_token=request.auth_token or self._parts.fleet_token,  # in memory only
            )
        )
        return rpb.RegisterNodeResponse(
            node_id=node.id,
            heartbeat_interval_ms=self._config.heartbeat_interval_ms,
            heartbeat_timeout_ms=self._config.heartbeat_timeout_ms,
            fleet_token=self._parts.fleet_token,
        )

    @rpc_errors
    async def ListNodes(self, request: rpb.ListNodesRequest, context: Ctx) -> rpb.ListNodesResponse:
        nodes = []
        for node in await self._store.list_nodes():
            msg = converters.node_to_pb(node)
            msg.state = self._node_state(node.id)
            msg.models.extend(_node_status_to_pb(m) for m in self._fleet.node_models(node.id))
            load = self._fleet.load(node.id)
            if load is not None:
                msg.load.CopyFrom(
                    pb.NodeLoad(
                        active_requests=load.active_requests,
                        queued_requests=load.queued_requests,
                        cpu_percent=load.cpu_percent,
                        memory_used_mb=load.memory_used_mb,
                        memory_total_mb=load.memory_total_mb,
                    )
                )
            nodes.append(msg)
        return rpb.ListNodesResponse(nodes=nodes)

    def _node_state(self, node_id: str) -> pb.NodeState.ValueType:
        if not self._fleet.is_online(node_id):
            return pb.NODE_STATE_OFFLINE
        return pb.NODE_STATE_DRAINING if self._fleet.is_draining(node_id) else pb.NODE_STATE_ONLINE

    async def _known_node(self, node_id: str) -> Node:
        node = await self._store.get_node(node_id) if node_id else None
        if node is None:
            raise LlmlbError(ErrorCode.NODE_NOT_FOUND, f"no node {node_id!r}")
        return node

    async def _queue(self, node_id: str, kind: CommandKind, model_id: str = "") -> None:
        """Queues a durable command unless the same one is still waiting for the node."""
        try:
            pending = await self._store.pending_commands(node_id)
            if not any(c.kind is kind and c.model_id == model_id for c in pending):
                await self._store.add_command(node_id, kind, model_id)
        except KeyError:  # removed between the lookup and the insert
            raise LlmlbError(ErrorCode.NODE_NOT_FOUND, f"no node {node_id!r}") from None

    @rpc_errors
    async def PullModel(self, request: rpb.PullModelRequest, context: Ctx) -> rpb.PullModelResponse:
        model = await self._registry.get(request.model_id)
        if request.node_ids:
            targets = list(dict.fromkeys(request.node_ids))
            for node_id in targets:  # all checked first, so an unknown id queues nothing
                await self._known_node(node_id)
        else:
            wanted = frozenset(model.capabilities)
            targets = [
                node_id
                for node_id in self._fleet.online()
                if (info := self._fleet.info(node_id)) is not None and info.capabilities & wanted
            ]
        for node_id in targets:
            await self._queue(node_id, CommandKind.PREFETCH, model.id)
        self._sessions.notify_all()
        log.info("model.pull_requested", model_id=model.id, node_ids=targets)
        return rpb.PullModelResponse(model_id=model.id, node_ids=targets)

    @rpc_errors
    async def DrainNode(self, request: rpb.DrainNodeRequest, context: Ctx) -> pb.Node:
        node = await self._known_node(request.node_id)
        await self._queue(node.id, CommandKind.DRAIN)
        self._fleet.set_draining(node.id, True)
        session = self._sessions.get(node.id)
        if session is not None:
            session.draining = True
        self._sessions.notify_all()
        log.info("node.drain_requested", node_id=node.id, online=session is not None)
        msg = converters.node_to_pb(node)
        msg.state = pb.NODE_STATE_DRAINING
        return msg

    @rpc_errors
    async def RemoveNode(self, request: rpb.RemoveNodeRequest, context: Ctx) -> rpb.RemoveNodeResponse:
        node = await self._known_node(request.node_id)
        session = self._sessions.get(node.id)
        if session is not None:  # told to drain first, so it takes no new work while it is gone
            await self._queue(node.id, CommandKind.DRAIN)
            session.draining = True
            self._fleet.set_draining(node.id, True)
            await self._sessions.end(node.id, self._timeout_s)
        await self._store.remove_node(node.id)
        self._fleet.remove(node.id)
        log.info("node.removed", node_id=node.id, was_connected=session is not None)
        return rpb.RemoveNodeResponse(node_id=node.id)

    @rpc_errors
    async def CreateKey(self, request: rpb.CreateKeyRequest, context: Ctx) -> rpb.CreateKeyResponse:
        scopes = [converters.scope_from_pb(s) for s in request.scopes]
        known = [s for s in scopes if s is not None]
        if len(known) != len(scopes):
            raise LlmlbError(ErrorCode.INVALID_REQUEST, "each scope must be api, node or admin")
        key, secret = await self._keys.create(request.name, known)
        return rpb.CreateKeyResponse(key=converters.api_key_to_pb(key), secret=secret)

    @rpc_errors
    async def ListKeys(self, request: rpb.ListKeysRequest, context: Ctx) -> rpb.ListKeysResponse:
        return rpb.ListKeysResponse(keys=[converters.api_key_to_pb(k) for k in await self._keys.list()])

    @rpc_errors
    async def RevokeKey(self, request: rpb.RevokeKeyRequest, context: Ctx) -> pb.ApiKey:
        if not request.key:
            raise LlmlbError(ErrorCode.INVALID_REQUEST, "key (a key id or its shown prefix) is required")
        return converters.api_key_to_pb(await self._keys.revoke(request.key))

    @rpc_errors
    async def NodeSession(
        self, request_iterator: AsyncIterator[rpb.NodeMessage], context: Ctx
    ) -> AsyncIterator[rpb.BalancerMessage]:
        inbound = aiter(request_iterator)
        try:
            first = await asyncio.wait_for(anext(inbound), self._timeout_s)
        except (StopAsyncIteration, TimeoutError):
            raise LlmlbError(ErrorCode.INVALID_REQUEST, "a node session starts with hello") from None
        if first.WhichOneof("body") != "hello" or not first.hello.node_id:
            raise LlmlbError(ErrorCode.INVALID_REQUEST, "a node session starts with hello")
        node_id = first.hello.node_id
        if await self._store.get_node(node_id) is None:
            raise LlmlbError(
                ErrorCode.NODE_NOT_FOUND, f"node {node_id!r} is not registered; call RegisterNode"
            )
        session = await self._sessions.open(node_id)
        # A drain still queued (e.g. from before a balancer restart) holds from the first heartbeat on.
        if any(c.kind is CommandKind.DRAIN for c in await self._store.pending_commands(node_id)):
            session.draining = True
            self._fleet.set_draining(node_id, True)
        reader = asyncio.create_task(self._read(session, inbound))
        try:
            yield rpb.BalancerMessage(
                accepted=rpb.SessionAccepted(
                    node_id=node_id, heartbeat_interval_ms=self._config.heartbeat_interval_ms
                )
            )
            while not session.stopped:
                session.wake.clear()  # cleared before reading the queue, so no command slips between
                for cmd in await self._store.pending_commands(node_id):
                    if cmd.id not in session.sent:
                        session.sent.add(cmd.id)
                        yield _command_to_pb(cmd)
                if session.ending:
                    break
                silent_for = time.monotonic() - session.last_seen
                if silent_for > self._timeout_s:
                    log.warning("node.silent", node_id=node_id, seconds=round(silent_for, 1))
                    break
                waker = asyncio.ensure_future(session.wake.wait())
                await asyncio.wait(
                    {waker, reader}, timeout=self._timeout_s - silent_for, return_when=asyncio.FIRST_COMPLETED
                )
                waker.cancel()
                if reader.done():
                    break
        finally:
            reader.cancel()
            await self._sessions.close(session)
        if session.ending:  # the node's link sees why its session ended
            raise LlmlbError(ErrorCode.NODE_NOT_FOUND, f"node {node_id!r} was removed from the balancer")

    async def _read(self, session: Session, inbound: AsyncIterator[rpb.NodeMessage]) -> None:
        async for msg in inbound:
            session.heard()
            kind = msg.WhichOneof("body")
            if kind == "heartbeat":
                load = msg.heartbeat.load
                self._fleet.set_load(
                    session.node_id,
                    NodeLoad(
                        active_requests=load.active_requests,
                        queued_requests=load.queued_requests,
                        cpu_percent=load.cpu_percent,
                        memory_used_mb=load.memory_used_mb,
                        memory_total_mb=load.memory_total_mb,
                    ),
                )
                self._fleet.replace(
                    session.node_id, [_node_status_from_pb(session.node_id, m) for m in msg.heartbeat.models]
                )
                self._fleet.set_draining(session.node_id, msg.heartbeat.draining or session.draining)
            elif kind == "model_state":
                self._fleet.report(_node_status_from_pb(session.node_id, msg.model_state))
            # Only commands sent to this node on this session can be cleared by it.
            elif kind == "ack" and msg.ack.command_id in session.sent:
                if msg.ack.ok:
                    await self._store.ack_command(msg.ack.command_id)
                else:
                    log.warning(
                        "node.command_failed",
                        node_id=session.node_id,
                        command_id=msg.ack.command_id,
                        error=msg.ack.error,
                    )
