"""SMPP 3.4: configuration, PDU contents, the connector process holding the binds, the provider."""
