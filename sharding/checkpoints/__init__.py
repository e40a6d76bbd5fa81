"""Every checkpoint format the service reads, each in its own module; `formats.open_checkpoint` detects which.

    formats.py       open_checkpoint / load_checkpoint_into: NeMo or HF, detected from the files
    nemo.py          NeMo checkpoints: extracted or packed `.nemo`, model_config.yaml, tokenizer, weights dir
    nemo_weights.py  `model_weights/`: megatron-core distributed checkpoint (zarr or torch_dist) onto a rank
    zarr.py          zarr v2 arrays as megatron-core's zarr backend wrote them (numpy)
    files.py         the files of a checkpoint, in a directory or inside a packed `.nemo` (tar, read in place)
    hf.py            HF reward models: config.json, safetensors, tokenizer.json, chat template
    hf_weights.py    HF tensors onto a rank's slice of the megatron-core model
    convert.py       zarr -> torch_dist conversion
    cli.py           `python -m sharding.checkpoints inspect|convert`

No torch at import time (torch is imported inside the loaders), so the router can read configs and tokenizers.
"""
