"""Running under systemd: notifications, watchdog, logs, the journal, metrics."""
