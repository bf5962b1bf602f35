"""``llmlb``: run the balancer, and manage its models, nodes and API keys from the command line.

One module per command group (``serve``, ``models``, ``pull``, ``nodes``, ``keys``); ``client`` (where to
dial, which key, error descriptions) and ``progress`` (pull and wait) serve the commands and any other
program that drives a balancer.
"""

from balancer.cli.main import main

__all__ = ["main"]
