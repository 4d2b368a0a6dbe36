"""The offline layer: what the build, retraining and evaluation share, between the three
services and the application (`recsys.app`): the services' stages in this process (`local`),
held-out users and their lists (`heldout`, `splits`), the CF search and the retrain gate.

It imports the services and `recsys.core`, never `recsys.app` (the import contract says so).
"""
