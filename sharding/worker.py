"""One model-parallel rank, as a Ray actor: torch.distributed + megatron parallel_state, this stage's layers,
this rank's slice of the checkpoint, and the forward-only pipeline step.

Pipeline stage (after megatron-core's inference wrappers): for each micro-batch, recv -> forward -> send;
sends are asynchronous so this stage starts the next micro-batch while the next stage computes, and a
stage posts all its receives when a call starts (`sharding.p2p`), so the previous stage never waits on it
micro-batch by micro-batch. Across calls too: a call returns without waiting for its own sends (the next
stage posts their receives only when it starts that call, i.e. after finishing the call before), and waits
for the previous call's sends at its end instead. So a stage runs up to one call ahead of the next stage
rather than in lock step with it (one more call's activations held; 604 MB at 16k tokens of the 340B in
bf16). Only the last stage's TP rank 0 returns rewards.

Under sequence parallelism (`parallel.sequence_parallel`) a stage's output is each TP rank's 1/TP of the
tokens; each rank sends its own slice to the same TP rank of the next stage, which continues from it (the
scatter-gather of `sharding.p2p` is then not used: the slices are already 1/TP).

At setup a CUDA worker runs two micro-batches of its layout, the first max-size (`sharding.warmup`), and logs
the time: flex attention and megatron-core's fused activations compile there, so no request pays for it.

With `runtime.device: simulated` the stage is a `sharding.simulated.SimulatedStage` instead of the model:
no weights are read and nothing is computed; the same loop, receives and sends carry its small stand-in
activations, and it waits the cost model's time per micro-batch.

Two concurrency groups: the model calls (`setup`, `forward`, ...) run one at a time, in submission order, on
the actor's default thread; `ping` runs in the `control` group on a thread of its own, so a health check
answers at once while forwards are queued or running, with how long the current forward has run (a rank
whose forward runs past `runtime.collective_timeout_s` is hung: `sharding.engine` checks it). `ModelWorker` is
a plain class: `worker_actor_class` makes the Ray actor class of it or of a subclass (fault-injection tests
pass a subclass to the engine).
"""

from __future__ import annotations

import os
import time

import numpy as np
import ray

from configs.model import ModelArchConfig
from configs.service import ParallelConfig, RuntimeConfig
from sharding.forest import ForestRow
from sharding.micro_batches import MicroBatch


CONCURRENCY_GROUPS = {"control": 1}  # ping beside the model calls (the default group: one thread, in order)


class ModelWorker:
    def __init__(self, rank: int, arch: ModelArchConfig, parallel: ParallelConfig, runtime: RuntimeConfig,
                 checkpoint_path: str):
        self.rank = rank
        self.arch = arch
        self.parallel = parallel
        self.runtime = runtime
        self.checkpoint_path = checkpoint_path
        self.stage = None  # ModelStage, or SimulatedStage with runtime.device simulated
        self._previous_sends: list = []  # (tensor, request) of the last call: its tensors stay referenced
        self._forward_since: float | None = None  # monotonic start of the forward running now, or None
        self._detached: list | None = None  # the model's process-group attributes while out of the groups

    def node_info(self) -> tuple[str, str, list[str], str | None]:
        """(node IP, node id, GPU ids Ray assigned to this actor, placement group id)."""
        ctx = ray.get_runtime_context()
        gpus = [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])]
        return ray.util.get_node_ip_address(), ctx.get_node_id(), gpus, ctx.get_placement_group_id()

    @ray.method(concurrency_group="control")
    def free_port(self) -> int:
        """A free port on this worker's node, for the rendezvous that rank 0 hosts."""
        from sharding.process_group import free_port

        return free_port()

    def setup(self, master_addr: str, master_port: int, cuda_visible_devices: str | None, local_rank: int,
              alone: bool = False) -> int:
        """Joins the process group, builds this stage and loads its slice. Collective: all ranks at once.
        `alone`: this rank replaces a dead one (`sharding.restart`); its peers only rejoin the groups, so it
        reads its slice without collectives."""
        if cuda_visible_devices is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices  # before CUDA initialises
        os.environ["LOCAL_RANK"] = str(local_rank)
        from megatron.core import parallel_state

        from sharding.checkpoints.formats import load_checkpoint_into, open_checkpoint
        from sharding.model import build_stage_model
        from sharding.process_group import init_model_parallel, use_steady_state_timeout

        tp, pp = self.parallel.tensor_parallel_size, self.parallel.pipeline_parallel_size
        init_model_parallel(self.runtime, self.rank, self.parallel.world_size, master_addr, master_port,
                            tp=tp, pp=pp, local_rank=local_rank)
        self.pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        if self.runtime.device == "simulated":
            from sharding.simulated import SimulatedStage

            self.stage = SimulatedStage(self.arch, self.parallel, self.runtime, self.pp_rank)
        else:
            from sharding.warmup import warm_up

            model = build_stage_model(self.arch, self.runtime, tp=tp, pp=pp, pp_rank=self.pp_rank,
                                      sequence_parallel=self.parallel.sequence_parallel)
            load_checkpoint_into(open_checkpoint(self.checkpoint_path), model, alone=alone)
            self.stage = ModelStage(model, self.arch, self.runtime, self.parallel)
            self.warm_up_s = warm_up(self.stage, self.parallel, first_stage=self.pp_rank == 0)
            if self.warm_up_s is not None:
                print(f"rank {self.rank}: warm-up (torch.compile of flex attention and megatron-core's fused "
                      f"activations) took {self.warm_up_s:.1f} s on {self.parallel.batch_layout} micro-batches of "
                      f"up to {self.parallel.max_tokens_per_micro_batch} tokens", flush=True)
        use_steady_state_timeout(self.runtime)
        return self.rank

    def warm_up_seconds(self) -> float | None:
        """Seconds the setup's warm-up took; None on a device that does not warm up (CPU)."""
        return getattr(self, "warm_up_s", None)

    @ray.method(concurrency_group="control")
    def ping(self) -> tuple[int, float | None]:
        """(rank, seconds the forward running now has run, or None when idle); answers while forwards run."""
        if self.stage is None:
            raise RuntimeError(f"rank {self.rank} is not set up")
        since = self._forward_since
        return self.rank, None if since is None else time.monotonic() - since

    def forward(self, micro_batches: list[MicroBatch] | list[ForestRow]) -> np.ndarray | None:
        """Padded micro-batches or forest rows (`sharding.micro_batches.plan_micro_batches`); every stage
        builds its own positions and masks from the micro-batch, only hidden states travel between stages."""
        import torch.distributed as dist

        from sharding.protocol import BatchFault

        if not dist.is_initialized():  # left the groups after a fault; the engine rejoins them before retrying
            raise BatchFault(self.rank, "not in the process groups (a peer's fault)", collateral=True)
        self._forward_since = time.monotonic()
        try:
            rewards, self._previous_sends = forward_micro_batches(self.stage, micro_batches, self.parallel,
                                                                  self._previous_sends)
        except Exception as exc:  # noqa: BLE001 - any fault: leave the groups so no peer waits on this rank
            lines = str(exc).strip().splitlines()
            message = f"{type(exc).__name__}: {lines[-1][:300] if lines else ''}"
            if "Timed out" in message:  # a peer is hung: not a batch fault (the engine fails over)
                raise
            self._leave_process_groups()
            raise BatchFault(self.rank, message, collateral="Connection closed by peer" in message) from None
        finally:
            self._forward_since = None
        return rewards

    def _leave_process_groups(self) -> None:
        from sharding.process_group import detach_process_groups, leave_process_groups

        self._previous_sends = []
        model = getattr(self.stage, "model", None)
        if self._detached is None:
            self._detached = detach_process_groups(model) if model is not None else []
        leave_process_groups()

    def rejoin(self, master_addr: str, master_port: int) -> int:
        """After a batch fault: leaves the old process groups (if still in them), joins new ones at
        `master_addr:master_port` with every other rank, and puts them back into the model. The weights stay."""
        import torch.distributed as dist

        from sharding.process_group import init_model_parallel, reattach_process_groups, use_steady_state_timeout

        if dist.is_initialized():
            self._leave_process_groups()
        init_model_parallel(self.runtime, self.rank, self.parallel.world_size, master_addr, master_port,
                            tp=self.parallel.tensor_parallel_size, pp=self.parallel.pipeline_parallel_size,
                            local_rank=int(os.environ.get("LOCAL_RANK", "0")))
        use_steady_state_timeout(self.runtime)
        reattach_process_groups(self._detached or [])
        self._detached = None
        return self.rank

    def simulated_stats(self, reset: bool = False) -> dict[str, float]:
        """A simulated stage's modelled busy seconds, micro-batches and wall seconds (then zeroed if `reset`)."""
        if self.runtime.device != "simulated":
            raise RuntimeError(f"rank {self.rank} runs on {self.runtime.device}, not a simulated device")
        stats = {**self.stage.stats(), "rank": self.rank, "pipeline_rank": self.pp_rank}
        if reset:
            self.stage.reset_stats()
        return stats


def worker_actor_class(worker_class: type[ModelWorker] = ModelWorker):
    """The Ray actor class of `worker_class` (`ModelWorker` or a subclass), with the control concurrency group."""
    return ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(worker_class)


def forward_micro_batches(stage, micro_batches: list, parallel: ParallelConfig, previous_sends: list
                          ) -> tuple[np.ndarray | None, list]:
    """One call's pipeline step on this rank: (rewards on the last stage's TP rank 0 else None, this call's
    sends). Nothing in the loop waits for the device: inputs are copied non_blocking (`sharding.model.
    micro_batch_inputs`), rewards stay on the device, and the one copy to the host (`.cpu()`) comes after the
    last micro-batch (tests/unit/test_forward_loop_syncs.py counts them)."""
    import torch
    from megatron.core import parallel_state

    from sharding.p2p import ActivationReceiver, send_activation

    first = parallel_state.is_pipeline_first_stage()
    last = parallel_state.is_pipeline_last_stage()
    reads_out = last and parallel_state.get_tensor_model_parallel_rank() == 0
    # Under SP a stage's output is already this rank's 1/TP of the tokens: sent as it is, no scatter-gather.
    sg = parallel.scatter_gather_activations and not parallel.sequence_parallel
    outputs: list[torch.Tensor] = []
    sends = []
    shapes = [stage.activation_shape(mb) for mb in micro_batches]
    receiver = None if first else ActivationReceiver(shapes, stage.activation_dtype, stage.device, sg)
    with torch.no_grad():
        for micro_batch in micro_batches:
            out = stage.run(micro_batch, None if first else receiver.next())
            if not last:
                sends.append(send_activation(out, sg))  # the tensor stays referenced until the send completes
            elif reads_out:
                outputs.append(out)  # stays on the device: one copy to host at the end, not one per micro-batch
        for _, req in previous_sends:  # the call before's: the next stage has started this one
            req.wait()
    if reads_out:
        return torch.cat(outputs).float().cpu().numpy(), sends
    return None, sends


class ModelStage:
    """One rank's stage of the real model: the activation it receives and sends is [seq, batch, hidden], or
    [seq / TP, batch, hidden] (this rank's tokens) under sequence parallelism."""

    def __init__(self, model, arch: ModelArchConfig, runtime: RuntimeConfig, parallel: ParallelConfig):
        import torch

        from sharding.model import DTYPES

        self.model = model
        self.arch = arch
        self.runtime = runtime
        self.split = parallel.tensor_parallel_size if parallel.sequence_parallel else 1
        self.first = model.pre_process
        self.activation_dtype = DTYPES[runtime.dtype]
        self.device = (torch.device("cuda", torch.cuda.current_device()) if runtime.device == "cuda"
                       else torch.device("cpu"))

    def activation_shape(self, micro_batch) -> tuple[int, int, int]:
        from sharding.model import micro_batch_shape

        seq, batch = micro_batch_shape(micro_batch)
        return seq // self.split, batch, self.arch.hidden_size

    def run(self, micro_batch, hidden):
        """The stage's forward of one micro-batch: hidden states [S, B, H], or rewards on the last stage."""
        from sharding.model import micro_batch_inputs

        ids, kwargs = micro_batch_inputs(micro_batch, self.runtime, self.device, self.first)
        if hidden is not None:
            self.model.set_input_tensor(hidden)
        return self.model(ids, **kwargs)
