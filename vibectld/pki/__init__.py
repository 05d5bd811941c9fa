"""Key material: the TLS CA and server certificate, and the keys that sign client secrets."""
