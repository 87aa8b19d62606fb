"""The admin console: a separate, token-protected listener with web pages and a JSON API for admins."""
