"""gRPC ``Registry`` servicer: converts messages to and from plain types and calls transport-neutral code.

The catalogue (``balancer.catalog``), the fleet-aware views (``balancer.control``), node operations
(``balancer.fleet.nodes``) and the node-session protocol (``balancer.fleet.protocol``) hold the logic.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import grpc.aio

from balancer import control, deployments
from balancer.catalog import RegisterRequest
from balancer.control import ModelView, NodeView
from balancer.edge.caller import caller
from balancer.fleet import nodes, protocol
from balancer.fleet.token import Grant
from balancer.fleet.view import NodeLoad
from balancer.parts import BalancerParts
from common import converters
from common.errors import ErrorCode, LlmlbError
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import registry_pb2_grpc as rgrpc
from common.pb.llmlb.v1 import types_pb2 as pb
from common.rpc import rpc_errors
from common.types import CommandKind, NodeCommand

Ctx = grpc.aio.ServicerContext[Any, Any]


def _load_from_pb(msg: pb.NodeLoad) -> NodeLoad:
    return NodeLoad(
        active_requests=msg.active_requests,
        queued_requests=msg.queued_requests,
        cpu_percent=msg.cpu_percent,
        memory_used_mb=msg.memory_used_mb,
        memory_total_mb=msg.memory_total_mb,
        gpus=tuple(converters.gpu_from_pb(g) for g in msg.gpus),
        kv_cache_percent=msg.kv_cache_percent,
    )


def _load_to_pb(load: NodeLoad) -> pb.NodeLoad:
    return pb.NodeLoad(
        active_requests=load.active_requests,
        queued_requests=load.queued_requests,
        cpu_percent=load.cpu_percent,
        memory_used_mb=load.memory_used_mb,
        memory_total_mb=load.memory_total_mb,
        kv_cache_percent=load.kv_cache_percent,
    )


def _node_message_from_pb(msg: rpb.NodeMessage) -> protocol.NodeMessage:
    kind = msg.WhichOneof("body")
    if kind == "hello":
        return protocol.Hello(msg.hello.node_id)
    if kind == "heartbeat":
        beat = msg.heartbeat
        return protocol.Heartbeat(
            _load_from_pb(beat.load),
            tuple(map(converters.model_on_node_from_pb, beat.models)),
            beat.draining,
            beat.stopping,
        )
    if kind == "model_state":
        return protocol.ModelReported(converters.model_on_node_from_pb(msg.model_state))
    if kind == "prefixes":
        return protocol.PrefixesReported(msg.prefixes.model_id, tuple(msg.prefixes.hashes))
    if kind == "ack":
        return protocol.CommandAck(msg.ack.command_id, msg.ack.ok, msg.ack.error)
    if kind == "local_models":
        # At most MAX_LOCAL_MODELS are read: a report is one gRPC message, bounded by its size anyway.
        models = msg.local_models.models[: protocol.MAX_LOCAL_MODELS]
        return protocol.LocalModelsReported(tuple(converters.model_from_pb(m) for m in models))
    return protocol.Unrecognised(kind or "")


async def _node_messages(
    request_iterator: AsyncIterator[rpb.NodeMessage],
) -> AsyncIterator[protocol.NodeMessage]:
    async for msg in request_iterator:
        yield _node_message_from_pb(msg)


def _command_to_pb(cmd: NodeCommand) -> rpb.NodeCommand:
    msg = rpb.NodeCommand(command_id=cmd.id)
    if cmd.kind is CommandKind.DELETE_MODEL:
        msg.delete_model.model_id = cmd.model_id
    elif cmd.kind is CommandKind.DRAIN:
        msg.drain.SetInParent()
    elif cmd.kind is CommandKind.UNDRAIN:
        msg.undrain.SetInParent()
    elif cmd.kind is CommandKind.UNLOAD:
        msg.unload.model_id = cmd.model_id
    elif cmd.kind is CommandKind.PIN:
        msg.prefetch.model_id = cmd.model_id
        msg.prefetch.pin = True
    else:
        msg.prefetch.model_id = cmd.model_id
    return msg


def _grant_to_pb(grant: Grant) -> rpb.FleetToken:
    return rpb.FleetToken(
        token=grant.token,
        accepted=[rpb.AcceptedToken(token=t, valid_ms=int(s * 1000)) for t, s in grant.accepted],
        replaces=grant.replaces,
    )


def _balancer_message_to_pb(out: protocol.BalancerMessage) -> rpb.BalancerMessage:
    if isinstance(out, protocol.Accepted):
        return rpb.BalancerMessage(
            accepted=rpb.SessionAccepted(node_id=out.node_id, heartbeat_interval_ms=out.heartbeat_interval_ms)
        )
    if isinstance(out, protocol.Tokens):
        return rpb.BalancerMessage(fleet_token=_grant_to_pb(out.grant))
    return rpb.BalancerMessage(command=_command_to_pb(out))


def _model_view_to_pb(view: ModelView) -> pb.Model:
    msg = converters.model_to_pb(view.model)
    msg.nodes.extend(converters.model_on_node_to_pb(n.status, ready=n.ready) for n in view.nodes)
    msg.ready = view.ready
    return msg


def _node_view_to_pb(view: NodeView) -> pb.Node:
    msg = converters.node_to_pb(view.node)
    msg.state = converters.node_state_to_pb(view.state)
    msg.replica = view.replica
    msg.models.extend(converters.model_on_node_to_pb(m) for m in view.models)
    if view.load is not None:
        msg.load.CopyFrom(_load_to_pb(view.load))
    return msg


class RegistryServicer(rgrpc.RegistryServicer):
    """The ``Registry`` service: models, nodes, keys and node sessions, each call converted and handed on."""

    def __init__(self, parts: BalancerParts) -> None:
        self._parts = parts
        self._keys = parts.keys

    @rpc_errors
    async def RegisterModel(self, request: rpb.RegisterModelRequest, context: Ctx) -> pb.Model:
        model = await self._parts.catalog.register(
            RegisterRequest(
                repo_id=request.repo_id,
                filename=request.filename,
                revision=request.revision,
                model_id=request.model_id,
                origin=request.origin,
                name=request.name,
                capabilities=converters.requested_capabilities_from_pb(request.capabilities),
                tags=list(request.tags),
                required_vram_mb=request.required_vram_mb,
                chat_template=request.chat_template,
            )
        )
        return _model_view_to_pb(control.model_view(self._parts.fleet, model))

    @rpc_errors
    async def GetModel(self, request: rpb.GetModelRequest, context: Ctx) -> pb.Model:
        return _model_view_to_pb(await control.get_model(self._parts, request.model_id))

    @rpc_errors
    async def ListModels(self, request: rpb.ListModelsRequest, context: Ctx) -> rpb.ListModelsResponse:
        views = await control.list_models(self._parts)
        return rpb.ListModelsResponse(models=[_model_view_to_pb(v) for v in views])

    @rpc_errors
    async def DeleteModel(self, request: rpb.DeleteModelRequest, context: Ctx) -> rpb.DeleteModelResponse:
        deleted = await control.delete_model(self._parts, request.model_id)
        return rpb.DeleteModelResponse(model_id=deleted.model_id, nodes_notified=deleted.nodes_notified)

    @rpc_errors
    async def GetModelStatus(self, request: rpb.GetModelStatusRequest, context: Ctx) -> rpb.ModelStatus:
        view = await control.model_status(self._parts, request.model_id)
        return rpb.ModelStatus(
            model_id=view.model_id,
            status=converters.model_state_to_pb(view.status),
            progress=view.progress,
            downloaded_bytes=view.downloaded_bytes,
            total_bytes=view.total_bytes,
            nodes=[converters.model_on_node_to_pb(n) for n in view.nodes],
        )

    @rpc_errors
    async def RegisterNode(self, request: rpb.RegisterNodeRequest, context: Ctx) -> rpb.RegisterNodeResponse:
        registered = await nodes.register_node(
            self._parts,
            nodes.NodeRegistration(
                node_id=request.node_id,
                address=request.address,
                backends=tuple(b for b in map(converters.backend_from_pb, request.backends) if b is not None),
                gpus=tuple(converters.gpu_from_pb(g) for g in request.gpus),
                runtimes=tuple(request.runtimes),
                version=request.version,
                capabilities=frozenset(converters.requested_capabilities_from_pb(request.capabilities)),
                auth_token=request.auth_token,
                labels=dict(request.labels),
                memory_total_mb=request.memory_total_mb,
                formats=frozenset(converters.formats_from_pb(request.formats)),
            ),
            caller(),
        )
        grant = self._parts.fleet_tokens.grant(replaces=True)  # what a rotation it missed withdrew, too
        return rpb.RegisterNodeResponse(
            node_id=registered.node.id,
            heartbeat_interval_ms=registered.heartbeat_interval_ms,
            heartbeat_timeout_ms=registered.heartbeat_timeout_ms,
            fleet_token=grant.token,
            fleet_tokens=_grant_to_pb(grant),
        )

    @rpc_errors
    async def GetFleetToken(self, request: rpb.GetFleetTokenRequest, context: Ctx) -> rpb.FleetToken:
        return _grant_to_pb(self._parts.fleet_tokens.grant(replaces=True))

    @rpc_errors
    async def ListNodes(self, request: rpb.ListNodesRequest, context: Ctx) -> rpb.ListNodesResponse:
        return rpb.ListNodesResponse(
            nodes=[_node_view_to_pb(v) for v in await control.list_nodes(self._parts)]
        )

    @rpc_errors
    async def PullModel(self, request: rpb.PullModelRequest, context: Ctx) -> rpb.PullModelResponse:
        pulled = await nodes.pull_model(self._parts, request.model_id, list(request.node_ids))
        return rpb.PullModelResponse(model_id=pulled.model_id, node_ids=pulled.node_ids)

    @rpc_errors
    async def DrainNode(self, request: rpb.DrainNodeRequest, context: Ctx) -> pb.Node:
        return converters.node_to_pb(await nodes.drain_node(self._parts, request.node_id))

    @rpc_errors
    async def UndrainNode(self, request: rpb.UndrainNodeRequest, context: Ctx) -> pb.Node:
        return converters.node_to_pb(await nodes.undrain_node(self._parts, request.node_id))

    @rpc_errors
    async def RemoveNode(self, request: rpb.RemoveNodeRequest, context: Ctx) -> rpb.RemoveNodeResponse:
        return rpb.RemoveNodeResponse(node_id=await nodes.remove_node(self._parts, request.node_id))

    @rpc_errors
    async def CreateKey(self, request: rpb.CreateKeyRequest, context: Ctx) -> rpb.CreateKeyResponse:
        scopes = [converters.scope_from_pb(s) for s in request.scopes]
        known = [s for s in scopes if s is not None]
        if len(known) != len(scopes):
            raise LlmlbError(ErrorCode.INVALID_REQUEST, "each scope must be api, node or admin")
        key, secret = await self._keys.create(
            request.name, known, node_id=request.node_id, limits=converters.key_limits_from_pb(request.limits)
        )
        return rpb.CreateKeyResponse(key=converters.api_key_to_pb(key), secret=secret)

    @rpc_errors
    async def ListKeys(self, request: rpb.ListKeysRequest, context: Ctx) -> rpb.ListKeysResponse:
        return rpb.ListKeysResponse(keys=[converters.api_key_to_pb(k) for k in await self._keys.list()])

    @rpc_errors
    async def UpdateKey(self, request: rpb.UpdateKeyRequest, context: Ctx) -> pb.ApiKey:
        limits = converters.key_limits_from_pb(request.limits)
        return converters.api_key_to_pb(await self._keys.update(request.key, limits, list(request.set)))

    @rpc_errors
    async def RevokeKey(self, request: rpb.RevokeKeyRequest, context: Ctx) -> pb.ApiKey:
        if not request.key:
            raise LlmlbError(ErrorCode.INVALID_REQUEST, "key (a key id or its shown prefix) is required")
        return converters.api_key_to_pb(await self._keys.revoke(request.key))

    @rpc_errors
    async def NodeSession(
        self, request_iterator: AsyncIterator[rpb.NodeMessage], context: Ctx
    ) -> AsyncIterator[rpb.BalancerMessage]:
        # aclosing: when grpc drops the stream, the session closes now, not whenever it is collected.
        messages = _node_messages(request_iterator)
        async with aclosing(protocol.serve(self._parts, messages, caller())) as outgoing:
            async for out in outgoing:
                yield _balancer_message_to_pb(out)

    # deployments (see balancer.deployments)

    @rpc_errors
    async def SetDeployment(self, request: rpb.SetDeploymentRequest, context: Ctx) -> rpb.Deployment:
        d = request.deployment
        ask = deployments.DeploymentAsk(
            model_id=d.model_id,
            copies=d.copies if d.HasField("copies") else None,
            min_copies=d.min_copies,
            max_copies=d.max_copies if d.HasField("max_copies") else None,
            selector=dict(d.selector),
            memory_mb=d.memory_mb or None,
        )
        return _deployment_to_pb(await deployments.set_deployment(self._parts, ask))

    @rpc_errors
    async def GetDeployment(self, request: rpb.GetDeploymentRequest, context: Ctx) -> rpb.Deployment:
        return _deployment_to_pb(await deployments.get_deployment(self._parts, request.model_id))

    @rpc_errors
    async def DeleteDeployment(
        self, request: rpb.DeleteDeploymentRequest, context: Ctx
    ) -> rpb.DeleteDeploymentResponse:
        model_id = await deployments.delete_deployment(self._parts, request.model_id)
        return rpb.DeleteDeploymentResponse(model_id=model_id)

    @rpc_errors
    async def ListDeployments(
        self, request: rpb.ListDeploymentsRequest, context: Ctx
    ) -> rpb.ListDeploymentsResponse:
        views = await deployments.list_deployments(self._parts)
        return rpb.ListDeploymentsResponse(deployments=[_deployment_to_pb(v) for v in views.values()])

    @rpc_errors
    async def ExplainDeployment(self, request: rpb.ExplainDeploymentRequest, context: Ctx) -> rpb.Placement:
        found = deployments.explain(self._parts, request.model_id)
        return rpb.Placement(
            model_id=found.model_id,
            target=found.target,
            active=found.active,
            nodes=[
                rpb.NodePlacement(
                    node_id=v.node_id,
                    excluded=v.candidate is None,
                    rule=v.rule,
                    reason=v.reason,
                    rank=v.rank,
                    text=v.text(),
                )
                for v in found.nodes
            ],
            decisions=[d.text for d in found.decisions],
        )


def _deployment_to_pb(view: deployments.DeploymentView) -> rpb.Deployment:
    d = view.deployment
    msg = rpb.Deployment(
        model_id=d.model_id,
        min_copies=d.min_copies,
        selector=dict(d.selector),
        memory_mb=d.memory_mb or 0,
        desired_copies=view.desired,
        ready_copies=view.ready,
    )
    if d.copies is not None:
        msg.copies = d.copies
    if d.max_copies is not None:
        msg.max_copies = d.max_copies
    for name, value in (("created_at", d.created_at), ("updated_at", d.updated_at)):
        ts = converters.timestamp(value)
        if ts is not None:
            getattr(msg, name).CopyFrom(ts)
    return msg
