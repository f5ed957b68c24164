"""Offline converters: X-ray datasets as downloaded -> FFCV shards + manifest."""
