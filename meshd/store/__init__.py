"""The daemon's SQLite store, its group commit and WAL purge."""
