"""MTA-STS (RFC 8461) policy map and SMTP TLS reporting (RFC 8460) for Postfix."""

__version__ = "0.1.0"
