"""SMS helpers: GSM 03.38 / UCS-2 encoding detection and part counting."""
