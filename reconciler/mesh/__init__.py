"""NATS: subject names, wire shapes, connection, the node's service, clients and permissions."""
