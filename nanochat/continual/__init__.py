"""Continual learning: teach the model a sequence of tasks and measure what it forgets; it uses the LoRA
package for adapters and knows nothing of serving (the server's live learning calls adapter_train.py).

    loop.py           the driver: learn tasks one by one with a strategy, score every task after each,
                      the forgetting metrics (ACC, BWT, FWT)
    strategies.py     the strategy contract; naive/replay/ewc/ssr: what each trains, rehearses, penalises
    adapters.py       lora/merge/olora: a new adapter per task on the frozen base, served or kept apart
    adapter_train.py  one adapter from a few conversations (live learning), and the mean loss that measures it
"""
