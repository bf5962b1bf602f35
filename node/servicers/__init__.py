"""The node's gRPC doors: thin servicers that convert protobuf and call the node's own logic."""
