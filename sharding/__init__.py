"""Model-parallel compute: checkpoint reading, megatron-core model, worker actors, placement.

Importing this package imports no torch; the torch modules are imported by name where needed, so the
router (which reads the checkpoint's config and tokenizer through `sharding.nemo_archive`) stays light.
"""
