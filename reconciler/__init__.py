"""gitops-mesh: a GitOps reconciler for fleets of plain Linux nodes, meshed over NATS."""

__version__ = "0.1.0"
