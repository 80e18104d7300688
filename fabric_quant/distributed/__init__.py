"""Several processes: sharding a 4-bit model with FSDP2 (``fsdp.py``) and the frozen embedding and head split by
vocabulary rows over the ranks (``vocab_parallel.py``). Imported only where a run is distributed."""
