"""Sinch SMS REST API compatible routes under /xms/v1/{plan}: batches, delivery reports, groups."""

from api.dialects.sinch import groups, reports, views
from api.dialects.sinch.plan import blueprint

__all__ = ["blueprint", "groups", "reports", "views"]
