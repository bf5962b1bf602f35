"""The operator's web console: static files served by the balancer's HTTP port under ``/ui``.

No build step and nothing fetched from elsewhere: one page, one script, one style sheet. The page
talks to the ``/v0`` management API with the signed-in key in an ``Authorization`` header.
"""

from balancer.console.routes import console_routes

__all__ = ["console_routes"]
