"""``python -m devkit.demo`` (``make run``): a balancer and a node serving the packaged models."""
