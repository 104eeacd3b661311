"""Training over the engine: `heads` (Locret retaining heads: labels from full attention, the fit) and `cache`
(each labelled sequence kept on disk for reruns)."""
