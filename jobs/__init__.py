"""Batch jobs over the scoring service: SteerLM annotation and RewardBench-style evaluation
(`python -m jobs annotate|evaluate`). Clients of the service: HTTP or Serve handles, no torch."""
