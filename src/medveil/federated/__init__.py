"""Federated universal model (MedUniverse; Radwan, Osman, Shehata, arXiv 2407.14719).

Stage 0: the server pretrains a ViT with masked image modelling on an unlabelled pool no client
holds. Then, stage by stage, clients join (telling only their class count), fine-tune the base
backbone + their head on private labelled data, and send weights back; the server screens the
updates and curates them into one backbone plus one head per client (``distill``, the default,
``relay`` or ``fedavg``; see :mod:`medveil.federated.curation` for what is known and what is our
reconstruction).

Spec step -> function:
- stage 0, server MIM pretraining on the pool: ``stages.run_pretraining`` (``server.Server.pretrain``)
- a client joins with its class count: ``client.join_request`` -> ``server.Server.join``
- local fine-tuning at a site: ``client.serve`` (the one entry point of a site's work:
  ``client.local_fit``; evaluation ``client.local_evaluate``; head refit ``calibration.local_calibrate``)
- screening of updates (NaN/Inf, shapes): ``updates.screen_updates``
- server curation (distill / relay / fedavg): ``curation.Curator.curate``
- one stage (join, fit, screen, curate, evaluate): ``stages.run_stage``; the final head
  calibration round: ``stages.calibration_round``
- the run folder (checkpoints, resume, universal model): ``engine.run_federation``

Modules: ``messages`` (what crosses), ``sites`` (who holds what), ``training`` (the one
supervised loop), ``rebuild`` (models from a message's state dicts), ``calibration`` (a site's
head refit), ``client``, ``server``, ``updates`` (screening), ``curation``, ``config`` (TOML),
``records`` (typed stage records: what ``metrics.json`` holds), ``stage_evaluation`` (when a
stage's model is evaluated), ``stages``, ``transport`` (how the stages reach clients:
in-process by default), ``engine`` (run folder with resume), ``baselines``, ``demo``;
``flower`` (the same run across machines: Flower ServerApp / ClientApp, PKI, process launch;
docs/running_across_sites.md). Client and server logic is transport-free: the Flower app calls
the same functions, and nothing outside ``flower`` imports Flower.
"""
