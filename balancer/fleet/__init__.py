"""The fleet: the nodes the balancer knows, their sessions and what they report.

Modules, one concern each: ``view`` (the live view the router reads), ``sessions`` (open node
sessions), ``session`` (the node-session protocol), ``rows`` (the node rows replicas share),
``nodes`` (register, pull, drain, remove), ``owners`` (who may speak for a node id), ``token`` (the
fleet token nodes accept), ``clients`` (one gRPC channel per node). Nothing is imported here, so
importing one module runs no other.
"""
