"""The fleet console: a live web view of every node, app, rollout and event, fed from NATS."""
