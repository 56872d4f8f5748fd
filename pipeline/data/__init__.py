"""Data intake: sources, downloads, decoding, deduplication helpers, the collected dataset, the data card."""
