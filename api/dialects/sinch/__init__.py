"""Sinch SMS REST API compatible routes under /xms/v1/{plan}: batches, delivery reports,
groups (one blueprint, plan.py) and inbounds (their own blueprint)."""

from api.dialects.sinch import groups, reports, views
from api.dialects.sinch.inbounds import blueprint as inbounds_blueprint
from api.dialects.sinch.plan import blueprint

__all__ = ["blueprint", "groups", "inbounds_blueprint", "reports", "views"]
