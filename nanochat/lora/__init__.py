"""LoRA adapters on a frozen GPT: what an adapter is and how it applies, on disk, routed, merged, and the
quantized base that carries them; training them is nanochat/continual's job, serving them nanochat/serve's.

    adapter.py   hooks on the block Linears, stacks (fused), per-row adapters, merge/unmerge into the weights
    storage.py   adapters on disk: save/load bound to the base weights, list, delete
    router.py    picks an adapter per prompt by hidden-state centroid
    merge.py     linear/TIES/DARE merges of adapters into a new one
    subspace.py  per-layer bases of earlier tasks' inputs; keeps a new adapter's A off them
    quant.py     int8 / 4-bit weight-only base (blocks, embedding, head) for adapters on a frozen base
"""
