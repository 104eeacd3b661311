"""The names of edgectx's weight formats and snapshot codecs: the one list each, importable without torch
(the config file and the command line check names before anything heavy loads).

    "int4" in SNAPSHOT_CODECS    # edgectx.quant.kv_codec implements them
    "nf4" in WEIGHT_FORMATS      # edgectx.quant.linear implements them
"""

SNAPSHOT_CODECS = ("fp16", "int8", "int4")  # KV codecs of snapshot sections; fp16 is lossless
WEIGHT_FORMATS = ("auto", "gguf", "fp16", "nf4", "int8")  # auto: gguf for GGUF files, else nf4 on CUDA for big models with bitsandbytes
