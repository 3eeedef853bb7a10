"""The unlabelled CaGeM train step in PyTorch, a speed peer for the library's step
(bench/versus_torch.py). Never imported by the library: it runs in the benchmark's own
environment, the only place PyTorch is installed.

The same networks as `cagem_tf.model.CaGeM` (two BN + ReLU layers per network; q(z1|x), q(y|z1,x)
and p(x|y,z1) at the lower width, q(z2|x,y,z1), p(y|z2) and p(z1|y,z2) at the upper width; each
input projected at its own leading shape and the projections summed with broadcasting, so x is
projected once per example and a one-hot y once per cluster: the same multiply-adds as the
library), the same ELBO with the sum over y done exactly:

  ELBO(x) = sum_y q(y|z1,x) [log p(x|y,z1) + log p(z1|y,z2^y) + log p(y|z2^y)
            - KL(q(z2|x,y,z1) || p(z2))] + H[q(y|z1,x)] - log q(z1|x) + const,

one sample z1 ~ q(z1|x) and z2^y ~ q(z2|x,y,z1) per y, Bernoulli p(x|y,z1), Adam.

python -m cagem_tf.benchmark.torch_peer '{"lower": 1024, "upper": 512, "clusters": 10,
    "batch": 100, "compile": false, "steps": 15, "windows": 5}'  -> RESULT{"examples_per_s": ...}
"""

import json
import math
import sys
import time

Z1, Z2, D = 64, 32, 784


def build(lower: int, upper: int, clusters: int, compiled: bool = False):
    """(model, step) for a batch x [B, D]; step(x) runs one Adam step and returns the loss.
    `compiled`: the forward pass (and so its backward) through torch.compile."""
    import torch
    from torch import nn

    class Conditional(nn.Module):
        def __init__(self, inputs, width, heads):
            super().__init__()
            self.projections = nn.ModuleList(nn.Linear(d, width, bias=False) for d in inputs)
            self.hidden = nn.Linear(width, width, bias=False)
            self.norms = nn.ModuleList(nn.BatchNorm1d(width, momentum=0.1) for _ in range(2))
            self.heads = nn.ModuleList(nn.Linear(width, d) for d in heads)

        def forward(self, *inputs):
            h = sum_broadcast([p(u) for p, u in zip(self.projections, inputs)])
            shape = h.shape
            h = torch.relu(self.norms[0](h.reshape(-1, shape[-1])))
            h = torch.relu(self.norms[1](self.hidden(h)))
            return [head(h).reshape(*shape[:-1], -1) for head in self.heads]

    def sum_broadcast(terms):
        total = terms[0]
        for t in terms[1:]:
            total = total + t
        return total

    K = clusters

    class Peer(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_z1 = Conditional([D], lower, [Z1, Z1])
            self.q_y = Conditional([Z1, D], lower, [K])
            self.q_z2 = Conditional([K, Z1, D], upper, [Z2, Z2])
            self.p_y = Conditional([Z2], upper, [K])
            self.p_z1 = Conditional([K, Z2], upper, [Z1, Z1])
            self.p_x = Conditional([K, Z1], lower, [D])
            self.register_buffer("y", torch.eye(K).reshape(K, 1, K))

        def forward(self, x):
            loc1, log_s1 = self.q_z1(x)                                          # [B,d1]
            z1 = loc1 + log_s1.exp() * torch.randn_like(loc1)
            log_q_z1 = normal_log_prob(z1, loc1, log_s1)                         # [B]
            log_q_y = torch.log_softmax(self.q_y(z1, x)[0], -1)                  # [B,K]
            loc2, log_s2 = self.q_z2(self.y, z1, x)                              # [K,B,d2]
            z2 = loc2 + log_s2.exp() * torch.randn_like(loc2)
            kl_z2 = 0.5 * (loc2 ** 2 + (2 * log_s2).exp() - 1 - 2 * log_s2).sum(-1)  # [K,B]
            log_p_y = torch.log_softmax(self.p_y(z2)[0], -1)                     # [K,B,K]
            log_p_y = torch.diagonal(log_p_y, dim1=0, dim2=2).T                  # [K,B]
            loc_p, log_sp = self.p_z1(self.y, z2)                                # [K,B,d1]
            log_p_z1 = normal_log_prob(z1, loc_p, log_sp)                        # [K,B]
            logits = self.p_x(self.y, z1)[0]                                     # [K,B,D]
            log_p_x = -nn.functional.binary_cross_entropy_with_logits(
                logits, x.expand_as(logits), reduction="none").sum(-1)           # [K,B]
            q = log_q_y.exp().T                                                  # [K,B]
            per_y = log_p_x + log_p_z1 + log_p_y - kl_z2
            elbo = (q * per_y).sum(0) - (q * log_q_y.T).sum(0) - log_q_z1
            return -elbo.mean()

    def normal_log_prob(z, loc, log_scale):
        return (-0.5 * ((z - loc) / log_scale.exp()) ** 2 - log_scale
                - 0.5 * math.log(2 * math.pi)).sum(-1)

    model = Peer()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    forward = torch.compile(model) if compiled else model

    def step(x):
        optimizer.zero_grad(set_to_none=True)
        loss = forward(x)
        loss.backward()
        optimizer.step()
        return loss

    return model, step


def measure(spec: dict) -> dict:
    """examples/s of the step: the median over `windows` timed windows of `steps` steps, after
    warm-up (and compilation, with `compile`)."""
    import torch
    torch.manual_seed(0)
    model, step = build(spec["lower"], spec["upper"], spec["clusters"], spec.get("compile"))
    x = (torch.rand(spec["batch"], D) < 0.2).float()
    for _ in range(5):
        step(x)
    seconds = []
    for _ in range(spec.get("windows", 5)):
        start = time.perf_counter()
        for _ in range(spec.get("steps", 15)):
            loss = step(x)
        loss.item()
        seconds.append((time.perf_counter() - start) / spec.get("steps", 15))
    seconds.sort()
    return {"examples_per_s": spec["batch"] / seconds[len(seconds) // 2],
            "torch": torch.__version__, "threads": torch.get_num_threads()}


if __name__ == "__main__":
    print("RESULT" + json.dumps(measure(json.loads(sys.argv[1]))))
