"""Analytic multiply-add count of the CaGeM train step and IW bound, matmul by matmul.

Only the dense layers are counted (everything else is elementwise and far smaller). A matmul of
an [R, n] input with an [n, m] kernel costs R n m multiply-adds forward; its backward costs the
same again for the kernel gradient (when the kernel is trained) and again for the input gradient
(when a gradient flows to the input). FLOPs = 2 x multiply-adds.

`train_matmuls` follows `CaGeM.latent_terms` and `CaGeM.class_log_probs` (`tiled=False`) or the
straightforward reference of bench/reference.py (`tiled=True`), in which the first layer of a
network multiplies the concatenation of all its inputs broadcast to the network's full leading
shape.
"""

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Matmul:
    """rows x n_in @ n_in x n_out, and which backward products the step needs."""
    name: str
    rows: int
    n_in: int
    n_out: int
    grad_kernel: bool
    grad_input: bool

    @property
    def macs(self) -> int:
        return self.rows * self.n_in * self.n_out * (1 + self.grad_kernel + self.grad_input)


def _network(name, inputs, rows, widths, heads, tiled, trained, grad_first_input=None):
    """Matmuls of one Conditional: `inputs` is [(input name, dim, rows of that input,
    whether a gradient flows to it)], `rows` the network's full leading size."""
    out = []
    if tiled:
        n_in = sum(dim for _, dim, _, _ in inputs)
        grad = trained and any(g for *_, g in inputs)
        out.append(Matmul(f"{name}.input", rows, n_in, widths[0], trained, grad))
    else:
        for label, dim, input_rows, grad in inputs:
            out.append(Matmul(f"{name}.input_{label}", input_rows, dim, widths[0], trained,
                              trained and grad))
    for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
        out.append(Matmul(f"{name}.hidden_{i + 1}", rows, w_in, w_out, trained, trained))
    for head, units in heads.items():
        out.append(Matmul(f"{name}.{head}", rows, widths[-1], units, trained, trained))
    return out


def train_matmuls(config: dict, batch: int, labelled_batch: int, tiled: bool = False):
    """The matmuls of one train step on `batch` unlabelled and `labelled_batch` labelled
    examples, for a model with `CaGeM.get_config()` entries `config`."""
    D = math.prod(config["image_shape"])
    K, d1, d2 = config["num_clusters"], config["z1_dim"], config["z2_dim"]
    lower, upper, S = config["hidden_lower"], config["hidden_upper"], config["num_samples"]
    skip = config["skip_connection"]
    out = []

    def encoder(B, trained_all, gradient_to_latents):
        # gradient_to_latents: a gradient flows back into z1 (the ELBO); not in the labelled pass
        t, g = trained_all, gradient_to_latents
        q_z2_inputs = [("y", K, K, False), ("z1", d1, S * B, g)]
        if skip:
            q_z2_inputs.append(("x", D, B, False))
        return (_network("q_z1", [("x", D, B, False)], B, lower, {"loc": d1, "log_scale": d1},
                         tiled, t)
                + _network("q_y", [("z1", d1, S * B, g), ("x", D, B, False)], S * B, lower,
                           {"logits": K}, tiled, True)
                + _network("q_z2", q_z2_inputs, K * S * B, upper, {"loc": d2, "log_scale": d2},
                           tiled, t))

    B = batch
    out += encoder(B, True, True)
    out += _network("p_y", [("z2", d2, K * S * B, True)], K * S * B, upper, {"logits": K},
                    tiled, True)
    out += _network("p_z1", [("y", K, K, False), ("z2", d2, K * S * B, True)], K * S * B, upper,
                    {"loc": d1, "log_scale": d1}, tiled, True)
    out += _network("p_x", [("y", K, K, False), ("z1", d1, S * B, True)], K * S * B, lower,
                    {"logits": D}, tiled, True)
    if labelled_batch:
        L = labelled_batch
        # The cascade classifier: q(z1|x), q(y|z1,x), q(z2|x,y,z1) for every y, p(y|z2); only
        # q(y|z1,x) and p(y|z2) are trained and no gradient flows into z1 or z2.
        labelled = encoder(L, False, False) + _network(
            "p_y", [("z2", d2, K * S * L, False)], K * S * L, upper, {"logits": K}, tiled, True)
        out += [Matmul("labelled." + m.name, m.rows, m.n_in, m.n_out, m.grad_kernel,
                       m.grad_input) for m in labelled]
    return out


def iw_matmuls(config: dict, images: int, samples: int, estimator: str = "exact"):
    """The forward matmuls of the IW bound over `images` images with `samples` samples each,
    x-only work once per image; y summed ("exact") or drawn once per sample ("sampled").
    The exact weight sum_y p(x,y,z1,z2^y) / (q(z1|x) q(z2^y|x,y,z1)) does not involve q(y|z1,x)."""
    D = math.prod(config["image_shape"])
    K, d1, d2 = config["num_clusters"], config["z1_dim"], config["z2_dim"]
    lower, upper = config["hidden_lower"], config["hidden_upper"]
    B, SB = images, samples * images
    Y = K * SB if estimator == "exact" else SB
    inputs_q_z2 = [("y", K, K if estimator == "exact" else SB, False), ("z1", d1, SB, False)]
    if config["skip_connection"]:
        inputs_q_z2.append(("x", D, B, False))
    y_rows = K if estimator == "exact" else SB
    return (_network("q_z1", [("x", D, B, False)], B, lower, {"loc": d1, "log_scale": d1},
                     False, False)
            + (_network("q_y", [("z1", d1, SB, False), ("x", D, B, False)], SB, lower,
                        {"logits": K}, False, False) if estimator == "sampled" else [])
            + _network("q_z2", inputs_q_z2, Y, upper, {"loc": d2, "log_scale": d2}, False, False)
            + _network("p_y", [("z2", d2, Y, False)], Y, upper, {"logits": K}, False, False)
            + _network("p_z1", [("y", K, y_rows, False), ("z2", d2, Y, False)], Y, upper,
                       {"loc": d1, "log_scale": d1}, False, False)
            + _network("p_x", [("y", K, y_rows, False), ("z1", d1, SB, False)], Y, lower,
                       {"logits": D}, False, False))


def total_macs(matmuls) -> int:
    return sum(m.macs for m in matmuls)
