"""Which scope each call needs: one declarative table per door, and both fail closed.

Every gRPC method the balancer serves has an entry here, the open probes included, explicitly; every
HTTP route has its rule in its row of ``balancer.http.route_table``, built from the rules here. A
method or route with no entry is refused (``forbidden``), whatever key the caller holds, so a new one
is closed until someone decides who may call it. An ``admin`` key may
call anything that is not open; ``Access.PUBLIC`` needs no key at all.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import ErrorCode, LlmlbError
from common.types import Scope


@dataclass(frozen=True, slots=True)
class Access:
    """The scopes that may make a call (admin always may); no scopes means open to anyone."""

    scopes: tuple[Scope, ...]

    @property
    def public(self) -> bool:
        return not self.scopes


PUBLIC = Access(())
API = Access((Scope.API,))
# Reads a node makes while resolving a model (its manifest, peers that hold it), which api keys may make too.
READ = Access((Scope.API, Scope.NODE))
NODE = Access((Scope.NODE,))
ADMIN = Access((Scope.ADMIN,))

_REGISTRY = "/llmlb.v1.Registry/"
_MANIFEST = "/llmlb.v1.Manifest/"
_INFERENCE = "/llmlb.v1.Inference/"

GRPC_ACCESS: dict[str, Access] = {
    # The model catalogue: reads for api and node keys, changes for admin keys.
    f"{_REGISTRY}RegisterModel": ADMIN,
    f"{_REGISTRY}GetModel": READ,
    f"{_REGISTRY}ListModels": READ,
    f"{_REGISTRY}GetModelStatus": READ,
    f"{_REGISTRY}DeleteModel": ADMIN,
    f"{_REGISTRY}PullModel": ADMIN,
    # The fleet: nodes join with a node key; operators manage them with an admin key.
    f"{_REGISTRY}RegisterNode": NODE,
    f"{_REGISTRY}NodeSession": NODE,
    f"{_REGISTRY}GetFleetToken": NODE,
    f"{_REGISTRY}ListNodes": READ,
    f"{_REGISTRY}DrainNode": ADMIN,
    f"{_REGISTRY}UndrainNode": ADMIN,
    f"{_REGISTRY}RemoveNode": ADMIN,
    # API keys.
    f"{_REGISTRY}CreateKey": ADMIN,
    f"{_REGISTRY}ListKeys": ADMIN,
    f"{_REGISTRY}RevokeKey": ADMIN,
    f"{_REGISTRY}UpdateKey": ADMIN,
    # Deployments: what the scheduler keeps running; set and ended by admins, read by api keys.
    f"{_REGISTRY}SetDeployment": ADMIN,
    f"{_REGISTRY}GetDeployment": READ,
    f"{_REGISTRY}DeleteDeployment": ADMIN,
    f"{_REGISTRY}ListDeployments": READ,
    f"{_REGISTRY}ExplainDeployment": READ,
    # Manifests and proxied model bytes, for nodes resolving a model.
    f"{_MANIFEST}GetManifest": NODE,
    f"{_MANIFEST}ReadBlob": NODE,
    f"{_MANIFEST}GetBulkEndpoint": NODE,  # where the same bytes are served over the bulk proxy
    # Inference.
    f"{_INFERENCE}Chat": API,
    f"{_INFERENCE}Complete": API,
    f"{_INFERENCE}Embed": API,
    f"{_INFERENCE}Transcribe": API,
    f"{_INFERENCE}Speak": API,
    f"{_INFERENCE}GenerateImage": API,
    # Standard probes and discovery: open, as load balancers and grpcurl expect.
    "/grpc.health.v1.Health/Check": PUBLIC,
    "/grpc.health.v1.Health/Watch": PUBLIC,
    "/grpc.health.v1.Health/List": PUBLIC,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": PUBLIC,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": PUBLIC,
}


def unlisted(what: str) -> LlmlbError:
    """The refusal for a call the tables do not name: closed until someone decides who may make it."""
    return LlmlbError(ErrorCode.FORBIDDEN, f"{what} has no access rule; it is refused until it gets one")


def grpc_access(method: str) -> Access | None:
    """The access rule of a full gRPC method name (``/package.Service/Method``); None when unlisted."""
    return GRPC_ACCESS.get(method)
