"""Test suite of the license server."""
