"""The accelerators `runtime.device: simulated` can stand in for: one table of published numbers.

A simulated device computes nothing: each pipeline stage waits the time `sharding.cost_model` gives its
micro-batch from these numbers (see that module for the model and its assumptions). Every figure is the
vendor's published one for the SXM part, dense (no structured sparsity), per GPU:

* H100 SXM5 80GB: NVIDIA H100 Tensor Core GPU datasheet: BF16 Tensor Core 1,979 TFLOPS *with sparsity*
  (989.4 dense), HBM3 80 GB at 3.35 TB/s, NVLink 4 900 GB/s (bidirectional, 18 links). Usual cluster: AWS
  p5.48xlarge, 3,200 Gbps of EFAv2 per node of 8 GPUs (AWS EC2 P5 instance page) = 400 Gbps = 50 GB/s per GPU.
* H200 SXM 141GB: NVIDIA H200 Tensor Core GPU datasheet: BF16 1,979 TFLOPS with sparsity (989.4 dense),
  HBM3e 141 GB at 4.8 TB/s, NVLink 900 GB/s. Usual cluster: DGX H200 / p5en.48xlarge, 8 x 400 Gb/s
  (InfiniBand NDR ConnectX-7, or 3,200 Gbps EFAv3 per node) = 50 GB/s per GPU.
* A100 SXM4 80GB: NVIDIA A100 Tensor Core GPU datasheet: BF16 Tensor Core 312 TFLOPS dense (624 with
  sparsity), HBM2e 80 GB at 2,039 GB/s, NVLink 3 600 GB/s. Usual cluster: DGX A100 SuperPOD, 8 x 200 Gb/s
  InfiniBand HDR per node = 25 GB/s per GPU.
* B200 (HGX B200): NVIDIA HGX B200 datasheet: FP16/BF16 Tensor Core 4.5 PFLOPS with sparsity (2.25 dense),
  HBM3e 1,440 GB per 8 GPUs (180 GB each) at 8 TB/s, NVLink 5 1.8 TB/s. Usual cluster: DGX B200, 8 x 400
  Gb/s InfiniBand NDR (ConnectX-7) = 50 GB/s per GPU.

NVLink figures are the vendor's bidirectional totals; one direction is half (what a ring all-reduce moves
per step). GB here is 10^9 bytes, as on the datasheets.
"""

from __future__ import annotations

from pydantic import Field

from configs.base import StrictModel


class AcceleratorSpec(StrictModel):
    name: str = Field(description="The name `runtime.simulated_accelerator` takes.")
    bf16_dense_flop_per_s: float = Field(gt=0, description="Peak dense BF16 tensor-core FLOP/s (no sparsity).")
    hbm_bytes: float = Field(gt=0, description="HBM capacity in bytes.")
    hbm_bytes_per_s: float = Field(gt=0, description="Peak HBM bandwidth in bytes/s.")
    nvlink_bytes_per_s: float = Field(gt=0, description="NVLink bandwidth per GPU in bytes/s, both directions.")
    inter_node_bytes_per_s: float = Field(
        gt=0, description="Network bandwidth per GPU between nodes in bytes/s (the node's NICs over its GPUs)."
    )
    cluster: str = Field(description="The cluster the inter-node figure comes from.")

    @property
    def hbm_gb(self) -> float:
        return self.hbm_bytes / 1e9


GB = 1e9
ACCELERATORS: dict[str, AcceleratorSpec] = {
    spec.name: spec
    for spec in (
        AcceleratorSpec(name="h100-sxm", bf16_dense_flop_per_s=989.4e12, hbm_bytes=80 * GB,
                        hbm_bytes_per_s=3.35e12, nvlink_bytes_per_s=900 * GB, inter_node_bytes_per_s=50 * GB,
                        cluster="AWS p5.48xlarge, 3,200 Gbps EFA per 8 GPUs"),
        AcceleratorSpec(name="h200", bf16_dense_flop_per_s=989.4e12, hbm_bytes=141 * GB,
                        hbm_bytes_per_s=4.8e12, nvlink_bytes_per_s=900 * GB, inter_node_bytes_per_s=50 * GB,
                        cluster="DGX H200, 8 x 400 Gb/s InfiniBand NDR"),
        AcceleratorSpec(name="a100-80gb", bf16_dense_flop_per_s=312e12, hbm_bytes=80 * GB,
                        hbm_bytes_per_s=2.039e12, nvlink_bytes_per_s=600 * GB, inter_node_bytes_per_s=25 * GB,
                        cluster="DGX A100, 8 x 200 Gb/s InfiniBand HDR"),
        AcceleratorSpec(name="b200", bf16_dense_flop_per_s=2250e12, hbm_bytes=180 * GB,
                        hbm_bytes_per_s=8e12, nvlink_bytes_per_s=1800 * GB, inter_node_bytes_per_s=50 * GB,
                        cluster="DGX B200, 8 x 400 Gb/s InfiniBand NDR"),
    )
}
