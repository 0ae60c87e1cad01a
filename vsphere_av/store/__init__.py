"""Persistent state: SQLite stores and the hash-chained audit log."""
