"""RFC 8460: from Postfix log lines to delivered TLS reports."""
