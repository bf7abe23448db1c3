"""Sinch SMS REST API compatible batches (seed 003): /xms/v1/{service_plan_id}/batches."""

from api.dialects.sinch.inbounds import blueprint as inbounds_blueprint
from api.dialects.sinch.views import blueprint

__all__ = ["blueprint", "inbounds_blueprint"]
