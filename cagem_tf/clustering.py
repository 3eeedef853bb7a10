"""How a model uses its clusters, and k-means (plain, seeded by labels, or matched to them)
for the pseudo-label departure.

For N images with cluster probabilities q_n = q(y|x_n) [N,K] (and labels l_n where known):
  occupancy_k   = #{n : argmax q_n = k}
  clusters used = #{k : occupancy_k >= 2% of N}
  I(x;y)        = H(mean_n q_n) - mean_n H(q_n)   (nats; at most log K)
  purity        = sum_k max_l #{n in cluster k with label l} / N
  NMI           = I(c;l) / sqrt(H(c) H(l)) of the argmax clusters c against the labels l
  ARI           = the adjusted Rand index of c against l (Hubert & Arabie).
kl_y of the ELBO is no collapse test: it is near 0 both when y is unused and when p(y|z2)
tracks a q(y|z1,x) that is used. I(x;y) and the occupancy are.
"""

import numpy as np

USED_SHARE = 0.02


def entropy(p, axis=-1):
    """Shannon entropy in nats along `axis` (0 log 0 = 0)."""
    p = np.asarray(p, np.float64)
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=axis)


def contingency(a, b, num_a: int, num_b: int) -> np.ndarray:
    """Counts [num_a, num_b] of the pairs (a_n, b_n)."""
    table = np.zeros([num_a, num_b], np.int64)
    np.add.at(table, (np.asarray(a), np.asarray(b)), 1)
    return table


def nmi(a, b) -> float:
    """Normalised mutual information I(a;b) / sqrt(H(a) H(b)) of two labelings (0 when either
    is constant)."""
    a, b = np.unique(a, return_inverse=True)[1], np.unique(b, return_inverse=True)[1]
    joint = contingency(a, b, a.max() + 1, b.max() + 1) / len(a)
    h_a, h_b = entropy(joint.sum(1)), entropy(joint.sum(0))
    mi = h_a + h_b - entropy(joint.ravel())
    return float(mi / np.sqrt(h_a * h_b)) if h_a > 0 and h_b > 0 else 0.0


def ari(a, b) -> float:
    """Adjusted Rand index of two labelings: 1 for the same partition, about 0 by chance."""
    a, b = np.unique(a, return_inverse=True)[1], np.unique(b, return_inverse=True)[1]
    table = contingency(a, b, a.max() + 1, b.max() + 1)
    pairs = lambda n: n * (n - 1) / 2.0
    index = pairs(table).sum()
    rows, cols, total = pairs(table.sum(1)).sum(), pairs(table.sum(0)).sum(), pairs(len(a))
    expected = rows * cols / total if total else 0.0
    top = 0.5 * (rows + cols) - expected
    return float((index - expected) / top) if top else 1.0


def purity(clusters, labels) -> float:
    """Share of items whose label is the most common label of their cluster."""
    clusters, labels = np.asarray(clusters), np.asarray(labels)
    table = contingency(clusters, labels, clusters.max() + 1, labels.max() + 1)
    return float(table.max(1).sum() / len(clusters))


def usage(q_y) -> dict:
    """Cluster use of probabilities q_y [N,K]: occupancy [K] (argmax counts), clusters_used,
    mutual_information I(x;y) and mean_entropy E_x H(q(y|x)), in nats."""
    q_y = np.asarray(q_y, np.float64)
    occupancy = np.bincount(np.argmax(q_y, -1), minlength=q_y.shape[-1])
    mean_entropy = float(np.mean(entropy(q_y)))
    return {"occupancy": occupancy.tolist(),
            "clusters_used": int(np.sum(occupancy >= USED_SHARE * len(q_y))),
            "mutual_information": float(entropy(q_y.mean(0))) - mean_entropy,
            "mean_entropy": mean_entropy}


def against_labels(q_y, labels, num_classes: int) -> dict:
    """The argmax clusters of q_y [N,K] against known labels [N]: purity, NMI, ARI and the
    cluster-by-label counts [K, num_classes]."""
    clusters = np.argmax(q_y, -1)
    return {"purity": purity(clusters, labels), "nmi": nmi(clusters, labels),
            "ari": ari(clusters, labels),
            "cluster_by_label": contingency(clusters, labels, np.shape(q_y)[-1],
                                            num_classes).tolist()}


def kmeans(x, k: int, seed: int = 0, iterations: int = 30) -> np.ndarray:
    """Cluster index [N] of the rows of x [N,D] by Lloyd's k-means with k-means++ seeding
    (NumPy's PCG64 with `seed`: the same result on any machine)."""
    x = np.asarray(x, np.float32).reshape(len(x), -1)
    rng = np.random.default_rng(seed)
    squared = np.sum(x * x, 1)
    centres = [x[rng.integers(len(x))]]
    nearest = squared - 2 * x @ centres[0] + centres[0] @ centres[0]
    for _ in range(1, k):
        weights = np.maximum(nearest, 0)
        centres.append(x[rng.choice(len(x), p=weights / weights.sum())])
        nearest = np.minimum(nearest, squared - 2 * x @ centres[-1] + centres[-1] @ centres[-1])
    return _lloyd(x, np.stack(centres), iterations)


def _nearest(x, squared, centres):
    """Index [N] of the nearest centre [K,D] of each row of x [N,D] (squared Euclidean;
    `squared` [N] holds the rows' squared norms)."""
    return np.argmin(squared[:, None] - 2 * x @ centres.T + np.sum(centres ** 2, 1), 1)


def _lloyd(x, centres, iterations: int, fixed=None) -> np.ndarray:
    """Lloyd's iterations from `centres`; `fixed` (index [M], cluster [M]) keeps those rows in
    their clusters whatever the nearest centre. Returns the final assignment [N]."""
    squared = np.sum(x * x, 1)
    for _ in range(iterations):
        assign = _nearest(x, squared, centres)
        if fixed is not None:
            assign[fixed[0]] = fixed[1]
        for j in range(len(centres)):
            members = x[assign == j]
            if len(members):
                centres[j] = members.mean(0)
    assign = _nearest(x, squared, centres)
    if fixed is not None:
        assign[fixed[0]] = fixed[1]
    return assign


def seeded_kmeans(x, labelled, labels, num_classes: int, iterations: int = 30) -> np.ndarray:
    """Class-aligned clusters [N] of the rows of x [N,D] from a few labelled rows: constrained
    k-means (Basu, Banerjee & Mooney 2002). Centre c starts at the mean of the labelled rows of
    class c; Lloyd's iterations then move the centres, with every labelled row kept in its
    own class, so cluster c is the class c of the labels. No random choice: the result depends
    only on x and the labelled subset."""
    x = np.asarray(x, np.float32).reshape(len(x), -1)
    labelled, labels = np.asarray(labelled, np.int64), np.asarray(labels, np.int64)
    missing = sorted(set(range(num_classes)) - set(labels.tolist()))
    if missing:
        raise ValueError(f"seeded k-means needs a labelled example of every class; none of "
                         f"{missing}")
    centres = np.stack([x[labelled[labels == c]].mean(0) for c in range(num_classes)])
    return _lloyd(x, centres, iterations, fixed=(labelled, labels))


def matched_kmeans(x, labelled, labels, num_classes: int, seed: int = 0,
                   iterations: int = 30) -> np.ndarray:
    """Class-aligned clusters [N] from plain k-means named by a few labelled rows: the
    k-means++ clusters of `kmeans` (not moved by the labels), then the one-to-one naming
    cluster -> class that the most labelled rows agree with,
      pi* = argmax_pi sum_m [pi(k_m) = l_m]   over permutations pi of the K names,
    (an assignment problem, `_max_assignment`), and every labelled row kept in its own class.
    Unlike `seeded_kmeans` the centres never start from the labelled rows' means, which are
    poor with two images per class."""
    labelled, labels = np.asarray(labelled, np.int64), np.asarray(labels, np.int64)
    clusters = kmeans(x, num_classes, seed, iterations)
    naming = _max_assignment(contingency(clusters[labelled], labels, num_classes, num_classes))
    named = naming[clusters]
    named[labelled] = labels
    return named


def name_by_labels(q_y, labels, num_classes: int) -> np.ndarray:
    """The one-to-one naming of a model's clusters by a few labelled rows: `order` [K] with
    class c given to the cluster order[c], the permutation that the rows' responsibilities
    q_y [M,K] put the most mass on,
      order* = argmax_order sum_c sum_{m: l_m = c} q_y[m, order[c]],
    (an assignment problem, `_max_assignment`). Deterministic given q_y and the labels."""
    q_y, labels = np.asarray(q_y, np.float64), np.asarray(labels, np.int64)
    mass = np.stack([q_y[labels == c].sum(0) for c in range(num_classes)])  # [class, cluster]
    return _max_assignment(mass)


def _max_assignment(counts) -> np.ndarray:
    """The permutation p [K] maximising sum_k counts[k, p[k]] of a square matrix, by the
    Hungarian algorithm (shortest augmenting paths with potentials, O(K^3))."""
    cost = -np.asarray(counts, np.float64)
    k = len(cost)
    u, v = np.zeros(k + 1), np.zeros(k + 1)
    owner = np.zeros(k + 1, np.int64)          # owner[j]: the row (1-based) holding column j
    for row in range(1, k + 1):
        owner[0], column = row, 0
        slack, previous = np.full(k + 1, np.inf), np.zeros(k + 1, np.int64)
        used = np.zeros(k + 1, bool)
        while owner[column]:
            used[column] = True
            i, delta, nearest = owner[column], np.inf, 0
            for j in range(1, k + 1):
                if not used[j]:
                    reduced = cost[i - 1, j - 1] - u[i] - v[j]
                    if reduced < slack[j]:
                        slack[j], previous[j] = reduced, column
                    if slack[j] < delta:
                        delta, nearest = slack[j], j
            for j in range(k + 1):
                if used[j]:
                    u[owner[j]] += delta
                    v[j] -= delta
                else:
                    slack[j] -= delta
            column = nearest
        while column:
            owner[column] = owner[previous[column]]
            column = previous[column]
    permutation = np.zeros(k, np.int64)
    for j in range(1, k + 1):
        permutation[owner[j] - 1] = j - 1
    return permutation
