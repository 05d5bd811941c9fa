"""The daemon's durable state: clients, usage and the audit trail."""
