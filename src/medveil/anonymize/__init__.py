"""k-anonymous synthetic release (k-SALSA) - the parts that do not need a GAN.

- :mod:`~medveil.anonymize.grouping`: partition latents into groups of >= k people
  (greedy farthest-point, MDAV, per-subject grouping) and group means.
- :mod:`~medveil.anonymize.baselines`: k-Same-Pixel and the "N/k real images" reference.
- :mod:`~medveil.anonymize.release`: the atomic release writer and the resumable per-group
  work state (``OUT/.work``).
- :mod:`~medveil.anonymize.verify`: ``verify_release(OUT)``, the checks behind
  ``medveil verify-release``.

With a GAN (k-SALSA steps 2-7):

- :mod:`~medveil.anonymize.alignment`: local style alignment, batched over many groups.
- :mod:`~medveil.anonymize.pipeline`: ``anonymize(...)``, behind ``medveil anonymize``.
- :mod:`~medveil.anonymize.quick`: load trained models, or train tiny ones (``--quick``).
- :mod:`~medveil.anonymize.demo`: the anonymisation step of ``medveil demo``.
"""
