"""The workstation port: app factory, services, request handling, the listener's guard, metrics."""
