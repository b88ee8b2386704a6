"""Input subspaces of the LoRA target layers: after a task, an orthonormal basis per layer of the inputs
that task fed it, and a new adapter's A confined to the complement of every basis so far; it knows
nothing of tasks, data or training loops (nanochat/continual/strategies.py drives it).

Why it protects earlier tasks. A layer with an adapter computes W x + s B A x. If every earlier task's
inputs x to that layer lie (nearly) in span(U) and A U = 0, then B A x = 0 for them: the layer, and by
induction every later layer, computes for an old input what it computed before the new adapter existed,
while the new task learns through the input directions the old ones do not use (gradient projection
memory's idea, applied to the adapter's A; nothing is kept but the bases).

The basis grows task by task (GPM's incremental rule): a task's input covariance C (sum of x x^T over
its rows, at every position) is projected off the basis so far, and the top eigenvectors of the rest are
added until the basis holds `energy` of the task's total energy trace(C) (the part already in the basis
counts). energy near 1 protects more and leaves fewer directions to learn in.
"""
import torch


class InputSubspace:
    """Per target module key of a LoRA: the basis U (in x k, orthonormal columns) of earlier tasks' inputs."""

    def __init__(self, lora, energy):
        if not 0.0 < energy < 1.0:
            raise ValueError(f"subspace energy must be in (0, 1), got {energy}")
        self.lora, self.energy = lora, float(energy)
        self.bases = {}  # module key -> U
        self.own = {}  # module key -> V: the task being learned's own input directions off U (see confine)

    @torch.no_grad()
    def covariances(self, forward):
        """Call forward() (which runs the model over a task's rows) and return {module key: sum x x^T}
        (in x in, fp64 on the CPU) of every target module's inputs during it."""
        covs, handles = {}, []

        def hook(key):
            def fn(module, inputs, output):
                x = inputs[0].detach().reshape(-1, inputs[0].size(-1)).float()
                c = (x.t() @ x).double().cpu()
                covs[key] = covs[key] + c if key in covs else c
            return fn
        try:
            for key, module in self.lora.modules.items():
                handles.append(module.register_forward_hook(hook(key)))
            forward()
        finally:
            for h in handles:
                h.remove()
        return covs

    @torch.no_grad()
    def add(self, covs):
        """Grow each module's basis with the directions of its covariance the basis does not hold yet,
        until it holds `energy` of the covariance's trace. -> {module key: directions added}."""
        added = {}
        for key, C in covs.items():
            total = C.trace().item()
            U = self.bases.get(key)
            held = 0.0
            if U is not None:
                Ud = U.double().cpu()
                held = (Ud.t() @ C @ Ud).trace().item()
                P = torch.eye(C.size(0), dtype=C.dtype) - Ud @ Ud.t()
                C = P @ C @ P
            need = self.energy * total - held
            if total <= 0 or need <= 0:
                added[key] = 0
                continue
            vals, vecs = torch.linalg.eigh(C)  # ascending
            vals, vecs = vals.flip(0).clamp(min=0), vecs.flip(1)
            k = int((vals.cumsum(0) < need).sum().item()) + 1
            k = min(k, C.size(0) - (0 if U is None else U.size(1)))
            if k <= 0:  # the basis already spans the whole input space
                added[key] = 0
                continue
            new = vecs[:, :k]
            if U is not None:  # re-orthogonalise against the basis: eigh's vectors are only nearly off it
                new = new - Ud @ (Ud.t() @ new)
            new = torch.linalg.qr(new).Q
            device = self.lora.modules[key].weight.device
            new = new.to(device, torch.float32)
            self.bases[key] = new if U is None else torch.cat([U, new], 1)
            added[key] = k
        return added

    @torch.no_grad()
    def confine(self, covs, energy):
        """Before a task: from its inputs' covariances, the directions V off the basis that hold `energy` of
        what the basis leaves of them; project() then keeps a new A inside span(V). Without it A's random
        start reads every other direction too, and once B grows the adapter perturbs inputs it never
        trained on: later tasks' (they then start from a damaged model) and, in a merge, every task's."""
        self.own = {}
        for key, C in covs.items():
            U = self.bases.get(key)
            if U is not None:
                Ud = U.double().cpu()
                P = torch.eye(C.size(0), dtype=C.dtype) - Ud @ Ud.t()
                C = P @ C @ P
            vals, vecs = torch.linalg.eigh(C)
            vals, vecs = vals.flip(0).clamp(min=0), vecs.flip(1)
            if vals.sum() <= 0:
                self.own[key] = vecs[:, :0].to(self.lora.modules[key].weight.device, torch.float32)
                continue
            k = min(int((vals.cumsum(0) < energy * vals.sum()).sum().item()) + 1, vals.numel())
            V = vecs[:, :k]
            if U is not None:
                V = torch.linalg.qr(V - Ud @ (Ud.t() @ V)).Q
            self.own[key] = V.to(self.lora.modules[key].weight.device, torch.float32)

    @torch.no_grad()
    def project(self, adapter):
        """A <- A (I - U U^T) for each of the adapter's modules with a basis: A reads nothing of it; after
        confine(), A <- A V V^T instead (V is off U): A reads only the new task's own directions."""
        for key, i in adapter.index.items():
            A = adapter.A[i]
            V = self.own.get(key)
            if V is not None:
                A.copy_(((A.float() @ V) @ V.t()).to(A.dtype))
                continue
            U = self.bases.get(key)
            if U is not None:
                A.sub_(((A.float() @ U) @ U.t()).to(A.dtype))

    def dims(self):
        """{module key: basis size}."""
        return {k: U.size(1) for k, U in self.bases.items()}

    def num_bytes(self):
        return sum(U.numel() * U.element_size() for U in self.bases.values())
