"""Worker subclasses that inject faults, for tests only: the engine takes a worker class
(`MegatronEngine(..., worker_class=...)`), so no production flag turns faults on."""

from __future__ import annotations

import time

from sharding.worker import ModelWorker


class SlowForwardWorker(ModelWorker):
    """Every forward takes at least FORWARD_S more: batches stay in flight long enough to saturate the service."""

    FORWARD_S = 3.0

    def forward(self, micro_batches):
        time.sleep(self.FORWARD_S)
        return super().forward(micro_batches)


class HangingRankWorker(ModelWorker):
    """Rank HANGING_RANK sleeps HANG_S inside its first forward (before any collective), as a rank stuck in
    steady state would; its peers wait for it in their first collective."""

    HANGING_RANK = 1
    HANG_S = 60.0

    def forward(self, micro_batches):
        if self.rank == self.HANGING_RANK and not getattr(self, "_hung", False):
            self._hung = True
            self._forward_since = time.monotonic()
            time.sleep(self.HANG_S)
        return super().forward(micro_batches)


class PoisonPromptWorker(ModelWorker):
    """Rank POISON_RANK raises inside its forward (after the micro-batches before the poisoned one ran, so its
    peers are mid-batch) whenever a micro-batch scores a sequence of exactly POISON_LENGTH tokens: a batch that
    always fails, on one rank, as a CUDA out-of-memory on one odd prompt would."""

    POISON_RANK = 3
    POISON_LENGTH = 23

    def forward(self, micro_batches):
        if self.rank == self.POISON_RANK and self.stage is not None:
            from sharding.simulated import scored_sequences

            run = self.stage.run

            def run_or_fail(micro_batch, hidden):
                if any(len(seq) == self.POISON_LENGTH for seq in scored_sequences(micro_batch)):
                    raise RuntimeError(f"injected fault: a {self.POISON_LENGTH}-token prompt")
                return run(micro_batch, hidden)

            self.stage.run = run_or_fail
            try:
                return super().forward(micro_batches)
            finally:
                self.stage.run = run
        return super().forward(micro_batches)
