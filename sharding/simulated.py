"""A pipeline stage on a simulated accelerator (`runtime.device: simulated`): a measuring tool, never a GPU.

Everything around the stage is the real code: the worker actor in its placement-group bundle, the gloo
process groups and megatron's parallel_state, the engine's batch layout and micro-batches, the streaming
calls, the posted receives and asynchronous sends between stages (`sharding.p2p`, scatter-gather and the
TP all-gather included). Only the transformer math is replaced: no weights are loaded and no model is
built. For each micro-batch the stage waits (sleeps) for the time `sharding.cost_model` gives that
micro-batch on this stage and this card, then sends the next stage a small stand-in for the activation:
per TP rank, the time the activation would have arrived (the end of this stage's work plus the modelled
transfer) and the micro-batch's row count. The receiving stage starts no earlier than that arrival and
checks that the row count is its own micro-batch's (the stages agree on the order of micro-batches).

Waits are against absolute deadlines (`time.monotonic`), so a late wake-up does not accumulate over the
micro-batches of a call; a stage's busy time (the waits it was asked for) and its wall time are kept for
the benchmarks' stage-utilisation figure (`stats`). The arrival time crosses processes as `time.time()`:
exact on one machine; on several hosts it is off by their clock skew.

The last stage returns pseudo-rewards: float32 numbers drawn from a generator seeded by a hash of each
scored sequence's own token ids (`pseudo_rewards`), so a sequence gets the same rewards in every layout,
micro-batch and batch composition, and ordering and readout stay checkable end to end. They are not
scores of any model.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import torch

from configs.accelerators import ACCELERATORS
from configs.model import ModelArchConfig
from configs.service import DTYPE_BYTES, ParallelConfig, RuntimeConfig
from sharding.cost_model import StageTime, micro_batch_work, stage_cost, stage_time
from sharding.forest import ForestRow

STAND_IN_FIELDS = 2  # per TP rank: arrival time (time.time()), rows of the micro-batch


def pseudo_rewards(tokens: np.ndarray, num_attributes: int) -> np.ndarray:
    """float32 [num_attributes] drawn from a generator seeded by the BLAKE2b hash of the token ids alone."""
    digest = hashlib.blake2b(np.asarray(tokens, dtype="<i8").tobytes(), digest_size=8).digest()
    rng = np.random.default_rng(int.from_bytes(digest, "little"))
    return rng.standard_normal(num_attributes).astype(np.float32)


def scored_sequences(micro_batch) -> list[np.ndarray]:
    """The token ids of each sequence a micro-batch scores, in readout order: a forest node's sequence is its
    ancestors and itself (nodes k <= q with subtree_end[k] >= q); a padded row is its first `length` ids."""
    if isinstance(micro_batch, ForestRow):
        out = []
        for q in micro_batch.readout.tolist():
            on_path = micro_batch.subtree_end[: q + 1] >= q
            out.append(micro_batch.tokens[: q + 1][on_path])
        return out
    tokens, lengths = micro_batch
    return [tokens[i, :n] for i, n in enumerate(lengths.tolist())]


class SimulatedStage:
    """Stands in for one rank's stage model: `activation_shape`/`activation_dtype` size the stand-in that
    travels between stages, `run` waits the modelled time and returns the stand-in or the rewards."""

    activation_dtype = torch.float64
    device = torch.device("cpu")

    def __init__(self, arch: ModelArchConfig, parallel: ParallelConfig, runtime: RuntimeConfig, pp_rank: int):
        self.arch = arch
        self.card = ACCELERATORS[runtime.simulated_accelerator]
        self.tp = parallel.tensor_parallel_size
        self.pp = parallel.pipeline_parallel_size
        self.pp_rank = pp_rank
        self.dtype_bytes = DTYPE_BYTES[runtime.dtype]
        self.scatter_gather = parallel.scatter_gather_activations
        self.last = pp_rank == self.pp - 1
        self.busy_s = 0.0  # modelled time this stage was asked to wait
        self.micro_batches = 0
        self.rows = 0
        self.started = time.monotonic()

    def activation_shape(self, micro_batch) -> tuple[int, int]:
        return (self.tp, STAND_IN_FIELDS)

    def time_of(self, micro_batch) -> StageTime:
        cost = stage_cost(self.arch, micro_batch_work(micro_batch), tp=self.tp, pp=self.pp, stage=self.pp_rank,
                          dtype_bytes=self.dtype_bytes, scatter_gather=self.scatter_gather)
        return stage_time(cost, self.card, self.tp)

    def run(self, micro_batch, received: torch.Tensor | None) -> torch.Tensor:
        """Waits until the input has arrived and the modelled work is done; returns the stand-in activation
        [tp, 2] for the next stage, or float32 rewards [sequences, num_attributes] on the last stage."""
        modelled = self.time_of(micro_batch)
        work = micro_batch_work(micro_batch)
        start = time.monotonic()
        if received is not None:
            rows = received[:, 1]
            if not bool((rows == work.rows).all()):
                raise RuntimeError(f"stage {self.pp_rank} got the activation of a {int(rows[0])}-row micro-batch "
                                   f"for its {work.rows}-row one: the stages disagree on the order")
            start += max(0.0, float(received[:, 0].max()) - time.time())
        end = start + modelled.busy_s
        _sleep_until(end)
        self.busy_s += modelled.busy_s
        self.micro_batches += 1
        self.rows += work.rows
        if self.last:
            rewards = [pseudo_rewards(seq, self.arch.num_attributes) for seq in scored_sequences(micro_batch)]
            return torch.from_numpy(np.stack(rewards))
        arrival = time.time() + max(0.0, end - time.monotonic()) + modelled.transfer_s
        return torch.tensor([[arrival, float(work.rows)]] * self.tp, dtype=self.activation_dtype)

    def stats(self) -> dict[str, float]:
        """Modelled busy seconds, micro-batches, token rows and wall seconds since this stage was built (or last
        reset)."""
        return {"busy_s": self.busy_s, "micro_batches": self.micro_batches, "rows": self.rows,
                "wall_s": time.monotonic() - self.started}

    def reset_stats(self) -> None:
        self.busy_s, self.micro_batches, self.rows, self.started = 0.0, 0, 0, time.monotonic()


def _sleep_until(deadline: float) -> None:
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(left)
