"""What a person looks at: figures (and, later, pages) made from a run's JSON records. A leaf
below ``federated`` and ``anonymize``: it reads their output files' layout, never imports them."""
