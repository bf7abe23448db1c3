"""Sinch SMS REST API compatible batches (reference: "Batches"): /xms/v1/{plan}/batches."""

from api.dialects.sinch.inbounds import blueprint as inbounds_blueprint
from api.dialects.sinch.views import blueprint

__all__ = ["blueprint", "inbounds_blueprint"]
