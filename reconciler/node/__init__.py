"""One node: the agent, its reconcile loop and its I/O shells (git, artifacts, processes, store)."""
