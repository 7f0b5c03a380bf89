"""The training engines, as one set: each takes the objective (model + loss) and gives the trainer the
same three calls (forward through the engine, `backward(loss)`, `step()`), its optimizer and its
checkpoints.

* `deepspeed_zero`: DeepSpeed ZeRO 0-3 (its JSON config from ours, the ZeRO-3 partitioned start from the
  files, bf16 all-gathers under bf16 compute);
* `deepspeed_ep`: DeepSpeed ZeRO 0-2 with expert parallelism (our dispatch layer, DeepSpeed's MoE groups);
* `fsdp2`: PyTorch FSDP2 (`fully_shard`), with or without expert parallelism, and its sharded start;

and what they share: `optim` (AdamW, its parameter groups, skippable steps) and `grad_norm` (the global
gradient norm of parameters spread over ranks in different ways).
"""
