"""Integrations with other Lightning clients (each imports its client only when used)."""
