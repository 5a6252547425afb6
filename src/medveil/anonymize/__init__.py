"""k-anonymous synthetic release (k-SALSA) - the parts that do not need a GAN.

- :mod:`~medveil.anonymize.grouping`: partition latents into groups of >= k people
  (greedy farthest-point, MDAV, per-subject grouping) and group means.
- :mod:`~medveil.anonymize.baselines`: k-Same-Pixel and the "N/k real images" reference.
- :mod:`~medveil.anonymize.release`: the atomic release writer and the resumable per-group
  work state (``OUT/.work``).
- :mod:`~medveil.anonymize.verify`: ``verify_release(OUT)``, the checks behind
  ``medveil verify-release``.
"""
