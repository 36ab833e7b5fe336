"""RFC 8461: discovery, fetching, validation and caching of MTA-STS policies."""
