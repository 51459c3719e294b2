"""Security tests: hostile input, the callback allowlist, who may call, TLS (ISSUE 11)."""
