"""Single-process scoring: the whole model in this process at TP 1 x PP 1, no Ray.

The reference the service is checked against (same checkpoint, same model code, one rank), and a quick way
to score a few token sequences offline. It joins a one-rank torch.distributed group of its own; use one
LocalScorer at a time per process and `close()` it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from configs.service import ParallelConfig, RuntimeConfig
from sharding.checkpoints.formats import load_checkpoint_into, open_checkpoint
from sharding.micro_batches import plan_micro_batches
from sharding.model import build_stage_model, micro_batch_inputs
from sharding.process_group import destroy_model_parallel, free_port, init_model_parallel


class LocalScorer:
    def __init__(self, checkpoint_path: str, runtime: RuntimeConfig | None = None):
        self.runtime = runtime or RuntimeConfig()
        checkpoint = open_checkpoint(checkpoint_path)
        self.arch = checkpoint.arch
        init_model_parallel(self.runtime, rank=0, world_size=1, master_addr="127.0.0.1", master_port=free_port(),
                            tp=1, pp=1)
        try:
            self.model = build_stage_model(self.arch, self.runtime, tp=1, pp=1, pp_rank=0)
            load_checkpoint_into(checkpoint, self.model)
        except BaseException:
            destroy_model_parallel()
            raise
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.runtime.device == "cuda" else torch.device("cpu")

    def score(self, token_batch: Sequence[Sequence[int]]) -> np.ndarray:
        """float32 [B, num_attributes]; the batch is right-padded to its longest sequence in one forward."""
        lengths = torch.tensor([len(t) for t in token_batch], dtype=torch.int64)
        tokens = torch.zeros((len(token_batch), int(lengths.max())), dtype=torch.int64)
        for i, t in enumerate(token_batch):
            tokens[i, : len(t)] = torch.tensor(t, dtype=torch.int64)
        with torch.no_grad():
            return self.model(tokens.to(self.device), lengths.to(self.device)).float().cpu().numpy()

    def score_micro_batches(self, token_batch: Sequence[Sequence[int]], parallel: ParallelConfig) -> np.ndarray:
        """float32 [B, num_attributes] through the engine's layout (`parallel.batch_layout`, its token
        budget) at one rank: the micro-batches the engine would send, forwarded here in turn."""
        micro_batches, order = plan_micro_batches(token_batch, parallel)
        with torch.no_grad():
            outputs = []
            for micro_batch in micro_batches:
                ids, kwargs = micro_batch_inputs(micro_batch, self.runtime, self.device, first_stage=True)
                outputs.append(self.model(ids, **kwargs))
        rewards = np.empty((len(order), outputs[0].shape[1]), dtype=np.float32)
        rewards[order] = torch.cat(outputs).float().cpu().numpy()
        return rewards

    def close(self) -> None:
        destroy_model_parallel()
