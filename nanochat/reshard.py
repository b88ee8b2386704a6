"""Optimizer state and data positions across a change in the number of ranks, so a run saved on W GPUs resumes
on W' (after losing a node, or moving to a smaller machine). It knows the state layouts of setup_optimizers'
optimizers (AdamW/DistAdamW: per-parameter moments, dim-0 slices when sharded; Muon/DistMuon: whole per-matrix
state, a momentum buffer and any variant's, kept by the rank that owns the matrix) and nothing of models or
training loops."""
import torch

from nanochat.muon import DistMuon


def _adamw_sharded(p, world):
    # DistAdamW slices a parameter along dim 0 only when the ranks divide it evenly
    return world > 1 and p.ndim > 0 and p.size(0) % world == 0


def full_optimizer_states(adamw_params, muon_params, shards, world):
    """Every rank's saved {"adamw", "muon"} state_dicts (shards[r] = rank r's) -> {param: full state} for the
    AdamW and Muon parameters. adamw_params / muon_params: the parameters in the order setup_optimizers gave
    them (a world-independent order; DistMuon's grouping by shape is redone here)."""
    muon_order = [p for group in DistMuon.group_by_shape(muon_params) for p in group] if world > 1 else muon_params
    adamw, muon = {}, {}
    for i, p in enumerate(adamw_params):
        states = [shard["adamw"]["state"].get(i) for shard in shards]
        if states[0] is None:
            continue
        full = {"step": int(float(states[0]["step"]))}
        for k in ("exp_avg", "exp_avg_sq"):
            full[k] = torch.cat([st[k] for st in states]) if _adamw_sharded(p, world) else states[0][k]
        adamw[p] = full
    for shard in shards:
        for i, st in shard["muon"]["state"].items():
            muon[muon_order[int(i)]] = st  # the momentum buffer, and NorMuon's neuron_sq when on
    return adamw, muon


def load_resharded(optimizers, adamw_state, muon_state, rank, world):
    """Give this rank's {"adamw", "muon"} (made for `world` ranks) its part of the full states."""
    adamw, muon = optimizers["adamw"], optimizers["muon"]
    for group in adamw.param_groups:
        for p in group["params"]:
            if p not in adamw_state:
                continue
            full = adamw_state[p]
            state = {}
            for k in ("exp_avg", "exp_avg_sq"):
                t = full[k].chunk(world)[rank] if _adamw_sharded(p, world) else full[k]
                state[k] = t.clone().to(p.device)
            if world > 1:  # DistAdamW counts steps with an int
                state["step"] = full["step"]
            else:  # torch.optim.AdamW keeps a float tensor (on the device when fused)
                on_device = group.get("fused") or group.get("capturable")
                state["step"] = torch.tensor(float(full["step"]), dtype=torch.float32,
                                             device=p.device if on_device else "cpu")
            adamw.state[p] = state
    for group in muon.param_groups:
        for i, p in enumerate(group["params"]):
            # DistMuon: within a shape group, rank r owns parameters r, r + world, ...
            if p in muon_state and (world == 1 or i % world == rank):
                muon.state[p] = {k: v.clone().to(p.device) for k, v in muon_state[p].items()}


def reshard_row_group_positions(states, world):
    """The pretraining loader's positions (one per saved rank; rank r read row groups r, r+W, ...) -> one per
    rank of `world`. Each new rank starts at the first of its row groups not before the earliest one a saved
    rank had still to finish, at its start: at most a few row groups are read twice or skipped."""
    saved = len(states)
    epoch = min(s["epoch"] for s in states)
    first = min(s["rg"] * saved + r for r, s in enumerate(states) if s["epoch"] == epoch)
    # rg: rank r's first row group at or after `first` (a ceiling division)
    return [{"epoch": epoch, "rg": max(0, -(-(first - r) // world)), "doc": 0, "tok": 0} for r in range(world)]


def reshard_stream_positions(states, world):
    """The conversation loader's positions (a rank's stream holds every W-th conversation) -> one per rank of
    `world`: the same fraction of the way through the epoch, so ~W/world times the saved offset."""
    saved = len(states)
    epoch = min(s["epoch"] for s in states)
    pos = min(s["pos"] for s in states if s["epoch"] == epoch)
    return [{"epoch": epoch, "pos": pos * saved // world} for _ in range(world)]
