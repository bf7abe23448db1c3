"""Status webhooks of the vendors Dispatcher sends through, one blueprint each.

Each checks the vendor's own signature before it trusts a byte of the body,
then hands the receipts to the receipts service; nothing else is written.
"""

from __future__ import annotations

from api.providers import rbm, twilio, whatsapp

BLUEPRINTS = (rbm.blueprint, whatsapp.blueprint, twilio.blueprint)
