"""Thin gRPC doors of the balancer: protobuf in, internal types to the logic, protobuf out."""
