"""MedVeil: medical-imaging AI without moving patients' images.

Layers (each a sub-package): ``data`` -> ``models`` -> ``federated`` / ``generative`` /
``anonymize`` -> ``evaluate`` -> ``cli``.
"""

__version__ = "0.1.0"
