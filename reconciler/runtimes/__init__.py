"""Runtimes: how an app's process is started, supervised, adopted and stopped."""
