"""Model-parallel compute: the megatron-core reward model, worker actors, placement, the batch layout, and
(in `sharding.checkpoints`) reading checkpoints onto each rank.

Runtime modules: `engine` (the RewardEngine over worker actors), `worker` (one rank: recv -> forward ->
send), `model` + `layers` (GPTModel without LM output layer, reward head, norm and attention),
`placement` (pure: TP x PP -> placement group), `process_group`, `micro_batches`, `local` (one-process
forward), `protocol` (the engine seam), `cpu_compat`.

Importing this package imports no torch; the torch modules are imported by name where needed, so the
router (which reads the checkpoint's config and tokenizer through `sharding.checkpoints`) stays light.
"""
