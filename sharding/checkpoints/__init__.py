"""Every checkpoint format the service reads, each in its own module that declares its `FORMAT` (detect, open,
check, load); `formats.FORMATS` is the registry and `formats.open_checkpoint` detects which.

    base.py          CheckpointFormat (what a format declares), CheckpointFormatError
    formats.py       the registry; open_checkpoint / check_weights_fit / output_names / load_checkpoint_into
    nemo.py          NeMo checkpoints: extracted or packed `.nemo`, model_config.yaml (-> the architecture),
                     tokenizer, weights dir; the weights-shape check
    nemo_weights.py  `model_weights/`: megatron-core distributed checkpoint (zarr or torch_dist) onto a rank
    dist_readers.py  what such a checkpoint stores; the zarr and packed-torch_dist read strategies
    zarr.py          zarr v2 arrays as megatron-core's zarr backend wrote them (numpy)
    files.py         the files of a checkpoint, in a directory or inside a packed `.nemo` (tar, read in place)
    hf.py            HF reward models: config.json (-> the architecture), safetensors, tokenizer.json,
                     chat template
    hf_weights.py    HF tensors onto a rank's slice of the megatron-core model
    convert.py       zarr -> torch_dist conversion
    cli.py           `python -m sharding.checkpoints inspect|convert`

No torch at import time (torch is imported inside the loaders), so the router can read configs and tokenizers.
"""
