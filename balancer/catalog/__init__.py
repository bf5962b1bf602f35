"""The model catalogue: the seed file (``supported_models.json``) and the models it holds at run time."""

from balancer.catalog.catalog import Catalog, RegisterRequest
from balancer.catalog.seed import CatalogError, default_catalog_text, load_catalog

__all__ = ["Catalog", "CatalogError", "RegisterRequest", "default_catalog_text", "load_catalog"]
