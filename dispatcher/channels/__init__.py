"""Channels (sms, rcs, whatsapp) and the providers that deliver them."""
