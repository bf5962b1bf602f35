"""The edge: what both doors do before and after the router, written once.

Each door (the gRPC ``Inference`` servicer, the HTTP shim) only translates its protocol to the internal
request types and back. Between the door and the router sit: request admission (``admission``: model-id
normal form, request-id rules, limits), the metrics of a request (``observe``: outcome, latency, first
token, tokens; unknown model names never become labels), and the answer to "which scope does this call
need" (``access``: one declarative table per door that fails closed), and each API key's own limits
and budgets (``limits``: requests and tokens per minute, requests in flight, tokens per day and month,
its model list).
"""
