"""Per-rank memory plan of a training run, from the config and the model's config.json alone.

`plan(cfg, model_config, hardware)` builds the model on the ``meta`` device (shapes only, no weights, a
fraction of a second even for 50B+ models), reads its geometry from the module tree (decoder layers,
experts, top-k: `models.inspect`), and adds up what one rank holds at the peak of a step for the engine
this project actually runs (`engines.deepspeed_zero`, `engines.fsdp2`, `train.objective`):

* DeepSpeed keeps fp32 parameters (no bf16 mode: autocast does the mixed precision), so ZeRO 0-2
  replicate 4 bytes/param; ZeRO-1/2 add an fp32 master copy of the rank's partition, ZeRO-2 partitions
  the fp32 gradients (ZeRO-0/1 hold them whole), and the AdamW moments (8 bytes/param) are partitioned
  from ZeRO-1 on. ZeRO-3 partitions everything and gathers one decoder layer at a time (two are counted:
  the one computing and the one prefetched) plus that layer's full gradient before its reduce-scatter.
  A layer arrives in one flat buffer, then is copied out into its parameters. With bf16 compute the
  matrices are all-gathered in bf16 (half the bytes on the wire and in that buffer) and widened back to
  fp32 in memory, so a gathered layer still takes 4 bytes/param.
  The gradient reduce bucket is DeepSpeed's ``reduce_bucket_size`` (default 5e8 elements, fp32).
* With ``train.precision=bf16`` autocast casts every fp32 ``nn.Linear`` weight to bf16 and caches the
  cast until the forward ends (torch's autocast weight cache), so DeepSpeed runs hold a bf16 copy of all
  of them, unsharded, at the end of the forward: 2 bytes/param, whatever the ZeRO stage (for MoE models
  the attention, routers, shared experts and LM head). The fused expert weights are cast too (the autocast
  rule `precision.autocast_every_matmul` gives transformers' grouped_mm), not cached, but each layer's bf16
  copy is saved for its backward: 2 bytes per routed-expert parameter a rank holds, of all layers (one
  layer with activation checkpointing), unsharded even under ZeRO-3.
* FSDP2 shards fp32 parameters, fp32 gradients and the AdamW moments over the shard group
  (`distributed.fsdp_shard_size`, default all ranks) and gathers decoder layers in the compute dtype (bf16
  with precision=bf16); the root (embeddings, final norm, LM head) stays gathered through the step. With
  expert parallelism (`distributed.expert_parallel_size` = EP) the states are still 1/W per rank, but a
  layer's routed experts are gathered only across the EP groups, so a gathered layer holds 1/EP of them.
  Activations assume balanced routing (each rank computes as many expert rows as it sends).
* Activations are counted per token from the matmuls of each decoder layer (input + output of every
  weight matrix, times top-k for fused expert weights, plus the fp32 inputs of the norms). With
  activation checkpointing a layer keeps only its input and one layer is recomputed at a time.
* The LM head's loss buffers follow `train.objective`: the fused head (DeepSpeed ZeRO 0-2) keeps an fp32
  gradient of the head and its bf16 copies plus one chunk of logits; the chunked path (ZeRO-3, FSDP2)
  keeps one chunk of logits with its fp32 copy and gradient.

It is an estimate: it ignores allocator fragmentation, the CUDA context and NCCL buffers, which is
what the headroom in `fits` is for (`HEADROOM`, 10% of the device memory). Checked against measured
peaks on CPU in tests/train/test_plan.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_recipes.config import Config
from moe_recipes.train.plan_startup import StartupPeak, checkpoint_bytes, startup_by_engine

GIB = 2**30
HEADROOM = 0.10  # fraction of device memory kept free for the CUDA context, NCCL and fragmentation
DS_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default zero_optimization.reduce_bucket_size (elements)


@dataclass
class Hardware:
    """The machines a run is planned for (the recipe's stated hardware is prose, so it is passed in)."""

    gpus_per_node: int = 8
    nodes: int = 1
    gpu_memory_gb: float = 80.0

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes

    def validate(self) -> None:
        for key in ("gpus_per_node", "nodes"):
            if getattr(self, key) < 1:
                raise ValueError(f"hardware {key} must be >= 1, got {getattr(self, key)}")
        if not self.gpu_memory_gb > 0:
            raise ValueError(f"hardware gpu_memory_gb must be > 0, got {self.gpu_memory_gb}")


@dataclass
class ModelShape:
    """What the memory plan needs to know about a model, read from its (meta) module tree."""

    total_params: int
    trainable_params: int
    active_params: int
    active_non_embedding: int
    flops_per_token: float
    num_layers: int
    hidden_size: int
    vocab_size: int
    root_params: int  # parameters outside the decoder layers (embeddings, final norm, LM head)
    largest_layer_params: int
    linear_params: int  # 2-D weights but the input embedding: what autocast casts (and caches) in bf16
    # per decoder layer, elements saved per token by its 2-D matmuls (compute dtype), its fused experts
    # (weight dtype) and its norms (fp32 inputs)
    act_elems_per_token: list[tuple[int, int, int]]
    num_experts: int
    top_k: int
    largest_layer_expert_params: int = 0  # the routed experts (fused 3-D weights) of the largest layer
    routed_expert_params: int = 0  # the routed experts of all layers
    largest_tensor: int = (
        0  # elements of the largest parameter (the fused experts of a layer, for MoE models)
    )
    checkpoint_bytes: int = 0  # the weight files, in the checkpoint's own dtype
    checkpoint_source: str = ""  # how checkpoint_bytes was known (files, or config.json's dtype)


@dataclass
class MemoryPlan:
    """Bytes one rank holds at the peak of a training step, by kind, and whether that fits."""

    hardware: Hardware
    engine: str  # e.g. "DeepSpeed ZeRO-3" or "FSDP2 (shard 8, replicate 2)"
    shard_size: int
    grad_accum: int
    tokens_per_micro_batch: int
    model: ModelShape
    device: dict[str, int] = field(default_factory=dict)  # kind -> bytes on the accelerator
    host: dict[str, int] = field(default_factory=dict)  # kind -> bytes offloaded to CPU memory (per rank)
    notes: list[str] = field(default_factory=list)
    # the model load before the first step, of this engine and of the others (`train.plan_startup`)
    startup: StartupPeak | None = None
    startup_by_engine: list[StartupPeak] = field(default_factory=list)

    @property
    def device_total(self) -> int:
        return sum(self.device.values())

    @property
    def host_total(self) -> int:
        return sum(self.host.values())

    @property
    def usable_bytes(self) -> int:
        return int(self.hardware.gpu_memory_gb * GIB * (1 - HEADROOM))

    @property
    def fits(self) -> bool:
        """Whether the step fits on the GPU (the start-up is `startup_fits`)."""
        return self.device_total <= self.usable_bytes

    @property
    def startup_fits(self) -> bool:
        """Whether the model load before the first step fits on the GPU."""
        return self.startup is None or self.startup.device_total <= self.usable_bytes

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["model"].pop("act_elems_per_token")
        out.update(
            device_total=self.device_total,
            host_total=self.host_total,
            usable_bytes=self.usable_bytes,
            headroom=HEADROOM,
            fits=self.fits,
            startup_fits=self.startup_fits,
        )
        if self.startup is not None:
            _add_totals(out["startup"], self.startup)
        for entry, peak in zip(out["startup_by_engine"], self.startup_by_engine):
            _add_totals(entry, peak)
        return out


def _add_totals(entry: dict[str, Any], peak: StartupPeak) -> None:
    entry.update(host_total=peak.host_total, device_total=peak.device_total, replicates=peak.replicates)


def meta_model(model_config: Any) -> nn.Module:
    """The causal LM of ``model_config`` (a PretrainedConfig or a model folder) with meta tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    if not isinstance(model_config, PretrainedConfig):
        model_config = AutoConfig.from_pretrained(str(model_config))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config)


def _layer_activations(layer: nn.Module, top_k: int) -> tuple[int, int, int]:
    """Elements ``layer`` saves per token: (2-D matmuls, fused expert matmuls, fp32 norm inputs).

    Every matrix saves its input for the weight gradient and its output is saved by what follows it
    (attention, the activation function, the residual add): in + out per weight, times top_k for fused
    (experts, out, in) weights, which see top_k copies of each token. 1-D weights are norm scales whose
    fp32 input is saved.
    """
    matmul, experts, norms = 0, 0, 0
    for p in layer.parameters():
        if p.dim() == 3:
            experts += top_k * (p.shape[1] + p.shape[2])
        elif p.dim() == 2:
            matmul += p.shape[0] + p.shape[1]
        elif p.dim() == 1 and "norm" in type(_owner(layer, p)).__name__.lower():
            norms += p.shape[0]
    return matmul, experts, norms


def _owner(root: nn.Module, param: torch.Tensor) -> nn.Module:
    for module in root.modules():
        if any(p is param for p in module.parameters(recurse=False)):
            return module
    return root


def model_shape(model: nn.Module, cfg: Config) -> ModelShape:
    """Read a ModelShape from a (meta) model, after the config's freezing is applied to it."""
    from moe_recipes.models.freeze import freeze_parameters
    from moe_recipes.models.inspect import count_parameters, flops_per_token, inspect_model

    info = inspect_model(model)
    counts = count_parameters(model, info)
    trainable = freeze_parameters(model, info, cfg.moe.freeze, cfg.moe.freeze_patterns).trainable
    layers = [m for m in model.modules() if type(m) in info.decoder_layer_classes]
    layer_sizes = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    expert_sizes = [sum(p.numel() for p in layer.parameters() if p.dim() == 3) for layer in layers]
    acts = [_layer_activations(layer, max(info.top_k, 1)) for layer in layers]
    embedding = model.get_input_embeddings().weight
    text = model.config.get_text_config()
    total = counts["total"]
    ckpt, source = checkpoint_bytes(None, total, getattr(model.config, "dtype", None))
    return ModelShape(
        total_params=counts["total"],
        trainable_params=trainable,
        active_params=counts["active"],
        active_non_embedding=counts["active_non_embedding"],
        flops_per_token=flops_per_token(model, cfg.data.seq_length, info),
        num_layers=len(layers),
        hidden_size=int(text.hidden_size),
        vocab_size=int(text.vocab_size),
        root_params=counts["total"] - sum(layer_sizes),
        largest_layer_params=max(layer_sizes, default=0),
        linear_params=sum(p.numel() for p in model.parameters() if p.dim() == 2 and p is not embedding),
        act_elems_per_token=acts,
        num_experts=info.num_experts,
        top_k=info.top_k,
        largest_layer_expert_params=expert_sizes[layer_sizes.index(max(layer_sizes))] if layers else 0,
        routed_expert_params=counts["routed_experts"],
        largest_tensor=max((p.numel() for p in model.parameters()), default=0),
        checkpoint_bytes=ckpt,
        checkpoint_source=source,
    )


def plan(cfg: Config, model_config: Any, hardware: Hardware) -> MemoryPlan:
    """The memory plan of ``cfg`` for the model of ``model_config`` (config or folder) on ``hardware``."""
    hardware.validate()
    shape = model_shape(meta_model(model_config), cfg)
    safetensors = True  # a folder with only config.json (weights not there yet) is planned as safetensors
    if isinstance(model_config, (str, Path)) and Path(model_config).is_dir():
        folder = Path(model_config)
        from moe_recipes.models.sharded_load import has_safetensors

        weights = any(
            next(folder.glob(pattern), None) for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth")
        )
        safetensors = has_safetensors(folder) or not weights
        found, source = checkpoint_bytes(folder, shape.total_params, None)
        if source.endswith("file(s)"):
            shape.checkpoint_bytes, shape.checkpoint_source = found, source
    return plan_for_shape(cfg, shape, hardware, safetensors)


def plan_for_shape(
    cfg: Config, shape: ModelShape, hardware: Hardware, safetensors: bool = True
) -> MemoryPlan:
    """The arithmetic of `plan`, given the model's shape (pure: no model, no I/O); `safetensors`: whether
    the model folder holds safetensors weights (FSDP2 starts sharded only from those)."""
    from moe_recipes.engines.deepspeed_zero import gradient_accumulation_steps

    world = hardware.world_size
    d = cfg.distributed
    fsdp = d.engine == "fsdp2"
    shard = (d.fsdp_shard_size or world) if fsdp else world
    if fsdp and world % shard:
        raise ValueError(f"distributed.fsdp_shard_size={shard} does not divide the {world} GPUs planned for")
    from moe_recipes.distributed.expert_parallel import check_expert_parallel

    check_expert_parallel(d.expert_parallel_size, world, shape.num_experts)
    out = MemoryPlan(
        hardware=hardware,
        engine=engine_name(cfg, shard, world),
        shard_size=shard,
        grad_accum=gradient_accumulation_steps(cfg, world),
        tokens_per_micro_batch=cfg.train.micro_batch_size * cfg.data.seq_length,
        model=shape,
    )
    (_fsdp_states if fsdp else _deepspeed_states)(out, cfg)
    _activations(out, cfg)
    _lm_head(out, cfg)
    rows = startup_by_engine(cfg, shape, world, hardware.gpus_per_node, safetensors)
    out.startup, out.startup_by_engine = rows[0], rows[1:]
    return out


def engine_name(cfg: Config, shard: int, world: int) -> str:
    d = cfg.distributed
    if d.engine == "deepspeed":
        offload = [k for k in ("offload_optimizer", "offload_params") if getattr(d, k)]
        ep = f" + expert parallel {d.expert_parallel_size}" if d.expert_parallel_size > 1 else ""
        return f"DeepSpeed ZeRO-{d.zero_stage}{ep}" + (f" ({', '.join(offload)})" if offload else "")
    name = "FSDP2" if shard == world else f"FSDP2 hybrid (shard {shard}, replicate {world // shard})"
    if d.expert_parallel_size > 1:
        name += f" + expert parallel {d.expert_parallel_size}"
    return name + (" (cpu offload)" if d.fsdp_cpu_offload else "")


def _bf16(cfg: Config) -> bool:
    """bf16 compute: as configured, or `auto` on the GPUs planned for (all of which have bf16 units); the
    trainer resolves `auto` for its own device before it plans."""
    return cfg.train.precision in ("bf16", "auto")


def _compute_bytes(cfg: Config) -> int:
    return 2 if _bf16(cfg) else 4


def _deepspeed_states(out: MemoryPlan, cfg: Config) -> None:
    """Parameters, gradients, optimizer states and working buffers of DeepSpeed with fp32 parameters."""
    s, stage, n = out.model, cfg.distributed.zero_stage, out.hardware.world_size
    p, t = s.total_params, s.trainable_params
    dev, host = out.device, out.host
    optim_home = host if cfg.distributed.offload_optimizer else dev
    if stage == 3:
        (host if cfg.distributed.offload_params else dev)["parameters (fp32 shard)"] = 4 * p // n
        dev["gathered layers (fp32, 2 layers)"] = 2 * 4 * s.largest_layer_params
        # the flat receive buffer of the layer arriving, in the dtype on the wire (engine.gather_in_bf16)
        dev[f"gather buffer ({'bf16' if _bf16(cfg) else 'fp32'}, one layer)"] = (
            _compute_bytes(cfg) * s.largest_layer_params
        )
        dev["gradients of one layer (fp32)"] = 4 * s.largest_layer_params
    else:
        # with expert parallelism a rank holds 1/EP of the routed experts (their ZeRO partitions over the
        # W/EP ranks holding the same experts are again 1/W of them: the shards below do not change)
        not_held = (
            s.routed_expert_params
            * (cfg.distributed.expert_parallel_size - 1)
            // cfg.distributed.expert_parallel_size
        )
        p, t = p - not_held, t - min(not_held, t)
        dev["parameters (fp32, replicated)"] = 4 * p
    if stage >= 1:
        optim_home["fp32 master copy (shard)"] = 4 * s.trainable_params // n
    grad_shard = 4 * s.trainable_params // n if stage >= 2 else 4 * t
    (optim_home if stage >= 2 else dev)["gradients (fp32" + (" shard)" if stage >= 2 else ")")] = grad_shard
    moments = 8 * s.trainable_params // n if stage >= 1 else 8 * t
    optim_home["AdamW moments (fp32" + (" shard)" if stage >= 1 else ")")] = moments
    if stage >= 1:
        dev["gradient reduce bucket"] = 4 * min(_reduce_bucket(cfg), t)
    if _bf16(cfg):
        dev["autocast bf16 weight cache"] = 2 * s.linear_params
        held = s.largest_layer_expert_params if cfg.train.activation_checkpointing else s.routed_expert_params
        dev["bf16 expert weights saved for backward"] = 2 * held // cfg.distributed.expert_parallel_size
        out.notes.append(
            "bf16 autocast caches a bf16 copy of every fp32 nn.Linear weight until the forward ends, and each "
            "layer keeps the bf16 copy of its routed experts for its backward (unsharded even under ZeRO-3)"
        )


def _reduce_bucket(cfg: Config) -> int:
    """DeepSpeed's reduce_bucket_size, as overridden by distributed.deepspeed_config if it is."""
    if cfg.distributed.deepspeed_config:
        import json
        from pathlib import Path

        user = json.loads(Path(cfg.distributed.deepspeed_config).read_text())
        return int(float(user.get("zero_optimization", {}).get("reduce_bucket_size", DS_REDUCE_BUCKET)))
    return DS_REDUCE_BUCKET


def _fsdp_states(out: MemoryPlan, cfg: Config) -> None:
    """FSDP2: fp32 shards of parameters, gradients and moments; layers gathered in the compute dtype."""
    s, n, d = out.model, out.shard_size, cfg.distributed
    p, t = s.total_params, s.trainable_params
    e = _compute_bytes(cfg)
    states = out.host if d.fsdp_cpu_offload else out.device
    states["parameters (fp32 shard)"] = 4 * p // n
    states["gradients (fp32 shard)"] = 4 * t // n
    states["AdamW moments (fp32 shard)"] = 8 * t // n
    if n == 1 and e == 4:
        # one rank, no cast: the "gathered" parameters and the unsharded gradients are the shards
        # themselves (measured on CPU: the step's peak is the states plus activations and the head)
        return
    layers = 2 if d.fsdp_reshard_after_forward else s.num_layers
    # With expert parallelism a layer's experts are gathered only across the EP groups: 1/EP of them
    ep = d.expert_parallel_size
    layer = s.largest_layer_params - s.largest_layer_expert_params * (ep - 1) // ep
    out.device[f"gathered layers ({'bf16' if e == 2 else 'fp32'}, {layers} layers)"] = e * layers * layer
    out.device["gathered root (embeddings, head)"] = e * s.root_params
    # unsharded gradient of the layer in backward, plus its fp32 copy for the reduce-scatter
    grad_bytes = e + (4 if e == 2 and d.reduce_dtype == "fp32" else 0)
    out.device["gradients of one layer + root (unsharded)"] = grad_bytes * (layer + s.root_params)


def _activations(out: MemoryPlan, cfg: Config) -> None:
    """Saved activations of one micro-batch; one layer recomputed at a time under checkpointing."""
    s, tokens = out.model, out.tokens_per_micro_batch
    e = _compute_bytes(cfg)
    # the residual stream is fp32 under autocast with fp32 weights, bf16 with FSDP2's bf16 parameters;
    # every matmul, grouped_mm's of the experts included, saves its inputs in the compute dtype
    low = cfg.distributed.engine == "fsdp2" and e == 2
    stream = 2 if low else 4
    per_layer = [e * (mm + ex) + 4 * nm for mm, ex, nm in s.act_elems_per_token]
    if cfg.train.activation_checkpointing:
        out.device["activations (layer inputs)"] = tokens * s.num_layers * s.hidden_size * stream
        out.device["activations (one layer recomputed)"] = tokens * max(per_layer, default=0)
    else:
        out.device["activations (all layers)"] = tokens * sum(per_layer)
    # last hidden state, its gradient and the gradient flowing back through the residual stream
    out.device["hidden-state gradients"] = 3 * tokens * s.hidden_size * 4


def _lm_head(out: MemoryPlan, cfg: Config) -> None:
    """Loss buffers of `train.objective`: the fused head (ZeRO 0-2) or the chunked one (ZeRO-3, FSDP2)."""
    from moe_recipes.train.objective import loss_chunk_tokens

    s, tokens = out.model, out.tokens_per_micro_batch
    configured = loss_chunk_tokens(cfg.train.loss_chunk_size, s.vocab_size)  # 0: all logits at once
    chunk = min(configured or tokens, tokens)
    e = _compute_bytes(cfg)
    ds = cfg.distributed
    if ds.engine == "deepspeed" and ds.zero_stage != 3 and configured > 0:
        # fp32 head gradient and its scaled copy in backward, bf16 copies of the weight and of each
        # chunk's weight gradient, then one chunk of fp32 logits and their gradient in the matmul dtype
        head = s.vocab_size * s.hidden_size * (8 + (4 if e == 2 else 0))
        out.device["LM head: fused loss buffers"] = head + chunk * s.vocab_size * (4 + e)
    else:
        # logits of one chunk in the compute dtype, their fp32 copy (none when they are fp32), softmax
        # and gradient
        out.device["LM head: logits of one chunk"] = chunk * s.vocab_size * (e + (4 if e == 2 else 0) + 4 + 4)
