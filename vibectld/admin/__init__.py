"""The local admin channel: wire protocol, server, routes and client.

`protocol` and `client` are the only modules `vibectl-admin` may import; they
must never import daemon internals.
"""
