"""The section of every logged quantity, one table: TensorBoard groups tags by the part before
"/", so the Time Series dashboard shows the likelihood, the KL terms, the clusters, the
classifiers and the schedules as groups of their own instead of one alphabetical list.

What is logged is not listed here: it is what the training step's trackers (`CaGeM.metrics`),
the schedules and the evaluations return; `tag` only places each name in its section.
"""

SECTIONS = {
    "likelihood": ("loss", "elbo", "iw_bound", "log_px", "bits_per_dim", "iw_bits_per_dim",
                   "h_labelled_elbo"),
    "kl": ("kl_z1", "kl_z2", "kl_y", "active_units_z1", "active_units_z2"),
    "clusters": ("batch_usage", "clusters_used", "mutual_information", "mean_entropy",
                 "purity", "nmi", "ari", "h_pseudo", "occupancy", "cluster_by_label"),
    "classifier": ("error_p", "error_q", "error_posterior", "h_p", "h_q", "h_posterior",
                   "agreement_pq", "cross_entropy_p_y", "h_z2_code"),
    "schedule": ("learning_rate", "temperature", "alpha", "usage_weight", "pseudo_weight",
                 "code_weight", "labelled_elbo_weight"),
    "time": ("seconds_per_epoch", "hours_left"),
    "images": ("samples", "class_conditional", "reconstructions"),
}
_SECTION_OF = {name: section for section, names in SECTIONS.items() for name in names}


def tag(name: str) -> str:
    """The TensorBoard tag of a logged quantity: "<section>/<name>" ("other/<name>" for a name
    no section lists)."""
    return f"{_SECTION_OF.get(name, 'other')}/{name}"
