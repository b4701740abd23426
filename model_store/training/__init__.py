"""The reward-model training code: dataset (rewards), trainers (train), evaluation, the rebuild pipeline.

It sits above the service and may import any of it (the dataset is sampled on the service's own
engine and search); nothing in ``service`` or in ``model_store.registry``/``prepare`` imports it
back (the import contracts in pyproject.toml). This package imports nothing itself, so importing
``model_store.training.errors`` costs no torch.
"""
