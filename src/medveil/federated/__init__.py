"""Federated universal model (MedUniverse; Radwan, Osman, Shehata, arXiv 2407.14719).

Stage 0: the server pretrains a ViT with masked image modelling on an unlabelled pool no client
holds. Then, stage by stage, clients join (telling only their class count), fine-tune the base
backbone + their head on private labelled data, and send weights back; the server screens the
updates and curates them into one backbone plus one head per client (``distill``, the default,
``relay`` or ``fedavg``; see :mod:`medveil.federated.curation` for what is known and what is our
reconstruction).

Modules: ``messages`` (what crosses), ``sites`` (who holds what), ``training`` (the one
supervised loop), ``client``, ``server``, ``updates`` (screening), ``curation``, ``config``
(TOML), ``engine`` (run folder with resume), ``transport`` (how the engine reaches clients:
in-process by default), ``baselines``, ``demo``; ``flower`` (the same run across machines:
Flower ServerApp / ClientApp, PKI, process launch; docs/running_across_sites.md).
Client and server logic is transport-free: the Flower app calls the same functions.
"""
