"""Leaf helpers shared by vibectl, vibectl-admin and vibectld.

Each module here imports only the standard library, so the client and the admin CLI
can use them without importing anything of the daemon, and the daemon uses the same
ones instead of keeping copies that drift.
"""
