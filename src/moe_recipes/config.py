"""The typed config tree of `moe-recipes train`: YAML file + dotted command-line overrides.

Every key has a default, a type and a one-line meaning (`moe-recipes train --show-keys`). Unknown keys,
values of the wrong type and inconsistent combinations are errors that name the key. The resolved config
is saved with every checkpoint (`config.yaml`) so a run can always be reproduced and resumed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    path: str = _f("", "Hugging Face model folder to start from (loaded as it is)")
    attn_implementation: str = _f(
        "sdpa", "attention kernel: sdpa, flash_attention_2 (when installed) or eager"
    )
    experts_implementation: str = _f(
        "grouped_mm", "expert compute in transformers: grouped_mm (fast) or eager"
    )

    def validate(self) -> None:
        if not self.path:
            raise ValueError("model.path must name a Hugging Face model folder")
        _choice("model.attn_implementation", self.attn_implementation, ("sdpa", "flash_attention_2", "eager"))
        _choice("model.experts_implementation", self.experts_implementation, ("grouped_mm", "eager"))


@dataclass
class DataConfig:
    format: str = _f(
        "pretrain", "pretrain (indexed .bin/.idx datasets) or chat (conversations: JSONL, Parquet or Arrow)"
    )
    path: Any = _f(
        "",
        "one dataset prefix, or a Megatron-style blend [w1, prefix1, w2, prefix2, ...]; "
        "chat: a JSONL, Parquet or Arrow file, a list of files, or [w1, file1, w2, file2, ...]",
    )
    split: str = _f(
        "969,30,1", "train,valid,test proportions of the documents (chat: conversations) of every prefix"
    )
    seq_length: int = _f(2048, "tokens per sample")
    cache_dir: str | None = _f(
        None, "where sample indices are cached (default: a cache/ folder beside the data)"
    )
    reset_position_ids: bool = _f(False, "restart position ids at every document boundary inside a sample")
    reset_attention_mask: bool = _f(False, "keep attention inside each document (needs reset_position_ids)")
    num_workers: int = _f(1, "DataLoader worker processes per rank (0: load in the training process)")
    packing: bool = _f(
        False, "chat: pack several conversations per sequence (position ids reset, attention kept inside)"
    )
    skip_bad_lines: bool = _f(False, "chat: skip and count invalid JSONL lines instead of stopping")

    def validate(self) -> None:
        _choice("data.format", self.format, ("pretrain", "chat"))
        if self.format != "chat" and (self.packing or self.skip_bad_lines):
            raise ValueError("data.packing and data.skip_bad_lines apply to data.format=chat only")
        if self.path in ("", None, []):
            raise ValueError("data.path must name a dataset prefix or a weighted list of prefixes")
        _positive("data.seq_length", self.seq_length)
        if self.reset_attention_mask and not self.reset_position_ids:
            raise ValueError("data.reset_attention_mask=true needs data.reset_position_ids=true")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")


@dataclass
class TrainConfig:
    micro_batch_size: int = _f(1, "samples per forward pass on each rank")
    global_batch_size: int = _f(
        8, "samples per optimizer step over all ranks (= micro x accumulation x ranks)"
    )
    iters: int = _f(1000, "optimizer steps to train in total")
    epochs: float | None = _f(
        None, "chat: train this many epochs (fractions allowed) instead of train.iters, which it sets"
    )
    seed: int = _f(1234, "seed for initial RNG state and data shuffling")
    precision: str = _f(
        "auto",
        "auto (bf16 where the device computes it natively: GPUs with bf16 units, CPUs with AVX-512-BF16 or "
        "AMX; fp32 elsewhere), bf16 (autocast, fp32 master weights and gradients) or fp32",
    )
    activation_checkpointing: bool = _f(False, "recompute decoder layers in backward to save memory")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this value (0: off)")
    loss_chunk_size: int | None = _f(
        None,
        "tokens per chunk of the fused LM-head cross-entropy (default: as many as make ~256 MiB of fp32 "
        "logits, e.g. 512 for a 129k vocabulary, 2048 for 32k; 0: full logits at once)",
    )
    loss_kernel: str = _f(
        "auto",
        "softmax gradient of the fused LM-head loss: compiled (torch.compile, one fused pass; compiles once "
        "per process, needs a C++ compiler on CPU, falls back to eager on a compile error), eager, or auto "
        "(compiled when a chunk holds >= 32M logits, where it repays the compile time)",
    )
    nan_policy: str = _f("stop", "on a NaN/inf loss: stop (save nothing, exit non-zero) or skip the step")
    exit_interval: int | None = _f(
        None,
        "save and exit 0 after this many steps of this run (for jobs whose "
        "time limit is known; resume with --resume)",
    )

    def validate(self) -> None:
        for key in ("micro_batch_size", "global_batch_size", "iters"):
            _positive(f"train.{key}", getattr(self, key))
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"train.epochs must be > 0, got {self.epochs}")
        _choice("train.precision", self.precision, ("auto", "bf16", "fp32"))
        _choice("train.nan_policy", self.nan_policy, ("stop", "skip"))
        _choice("train.loss_kernel", self.loss_kernel, ("auto", "compiled", "eager"))
        if self.exit_interval is not None:
            _positive("train.exit_interval", self.exit_interval)
        if self.grad_clip < 0 or (self.loss_chunk_size or 0) < 0:
            raise ValueError("train.grad_clip and train.loss_chunk_size must be >= 0")


@dataclass
class OptimConfig:
    lr: float = _f(3e-4, "peak learning rate")
    min_lr: float = _f(3e-5, "learning rate at the end of the decay")
    warmup_iters: int = _f(0, "steps of linear warmup from 0 to lr")
    decay_style: str = _f("cosine", "cosine, linear, constant or wsd (warmup-stable-decay)")
    decay_iters: int | None = _f(None, "steps over which lr decays (default: train.iters)")
    wsd_decay_fraction: float = _f(0.1, "wsd: fraction of decay_iters spent in the final linear decay")
    weight_decay: float = _f(0.1, "AdamW decoupled weight decay (not applied to biases and norms)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    eps: float = _f(1e-8, "AdamW epsilon")

    def validate(self) -> None:
        _choice("optim.decay_style", self.decay_style, ("cosine", "linear", "constant", "wsd"))
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(
                f"optim.lr must be > 0 and 0 <= optim.min_lr <= optim.lr "
                f"(got lr={self.lr}, min_lr={self.min_lr})"
            )
        if self.warmup_iters < 0:
            raise ValueError(f"optim.warmup_iters must be >= 0, got {self.warmup_iters}")
        if self.decay_iters is not None and self.decay_iters < 1:
            raise ValueError(
                f"optim.decay_iters must be >= 1 (or null for train.iters), got {self.decay_iters}"
            )
        if self.decay_iters is not None and self.decay_iters < self.warmup_iters:
            raise ValueError(
                f"optim.decay_iters={self.decay_iters} is shorter than optim.warmup_iters={self.warmup_iters}"
            )
        if not 0 <= self.wsd_decay_fraction <= 1:
            raise ValueError(f"optim.wsd_decay_fraction must be in [0, 1], got {self.wsd_decay_fraction}")


@dataclass
class MoEConfig:
    aux_loss_coef: float | None = _f(
        None,
        "load-balancing loss coefficient (default: the model's "
        "router_aux_loss_coef, else 0.01; 0 turns it off)",
    )
    aux_loss_type: str = _f(
        "hf",
        "form of the load-balancing (and global-batch) loss: hf = HF's load_balancing_loss_func (layers "
        "pooled, even routing = top_k), so router_aux_loss_coef means what it meant in training; per_layer = "
        "Switch/Megatron normalisation (even routing = 1) averaged over layers, 1/top_k of hf for one layer "
        "(Megatron's moe_aux_loss_coeff x MoE layers is the coefficient here)",
    )
    z_loss_coef: float = _f(0.0, "router z-loss coefficient (ST-MoE; 1e-3 is typical)")
    global_aux_loss_coef: float = _f(
        0.0, "global-batch load-balancing loss coefficient (expert load over all micro-batches and ranks)"
    )
    seq_aux_loss_coef: float = _f(0.0, "per-sequence balance loss coefficient (DeepSeek-V2/V3)")
    bias_update_rate: float = _f(
        0.0, "aux-loss-free balancing: e_score_correction_bias update per step (DeepSeek-V3: 0.001)"
    )
    freeze: Any = _f(
        [],
        "freeze parameters by kind: router, experts, shared_experts, attention, embeddings, lm_head, "
        "layers:I-J (decoder layers I..J)",
    )
    freeze_patterns: Any = _f([], "freeze parameters whose name matches one of these regular expressions")

    def validate(self) -> None:
        for key in ("aux_loss_coef", "z_loss_coef", "global_aux_loss_coef", "seq_aux_loss_coef"):
            value = getattr(self, key)
            if value is not None and value < 0:
                raise ValueError(f"moe.{key} must be >= 0, got {value}")
        _choice("moe.aux_loss_type", self.aux_loss_type, ("hf", "per_layer"))
        if self.bias_update_rate < 0:
            raise ValueError(f"moe.bias_update_rate must be >= 0, got {self.bias_update_rate}")
        from moe_recipes.models.freeze import check_freeze_spec

        check_freeze_spec(self.freeze, self.freeze_patterns)


@dataclass
class EvalConfig:
    interval: int = _f(100, "run validation every N steps (0: never; it always runs at the end if iters > 0)")
    iters: int = _f(10, "validation global batches per evaluation (the same samples every time)")

    def validate(self) -> None:
        for key in ("interval", "iters"):
            if getattr(self, key) < 0:
                raise ValueError(f"eval.{key} must be >= 0, got {getattr(self, key)}")


@dataclass
class LogConfig:
    interval: int = _f(1, "print and record metrics every N steps")
    dir: str = _f("runs/default", "run directory: metrics.jsonl, TensorBoard events, resolved config")
    tensorboard: bool = _f(True, "write TensorBoard events under log.dir/tensorboard")
    wandb_project: str | None = _f(None, "log to this Weights & Biases project (needs the wandb package)")
    progress_bar: bool = _f(True, "show a progress bar when the console is interactive")
    peak_tflops: float | None = _f(
        None, "device peak TFLOP/s for MFU (default: the bf16 peak of known GPUs; none on CPU)"
    )

    def validate(self) -> None:
        _positive("log.interval", self.interval)
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ValueError(f"log.peak_tflops must be > 0, got {self.peak_tflops}")


RESUME_CHANGES = ("seq_length", "global_batch_size", "base_model")


@dataclass
class CheckpointConfig:
    save: str | None = _f(None, "folder for checkpoints SAVE/iter_NNNNNNN/ (none: do not save)")
    save_interval: int = _f(0, "save every N steps (0: only at the end and on SIGTERM/SIGINT)")
    load: str | None = _f(
        None, "resume from the latest complete checkpoint in this folder (or an iter_ folder)"
    )
    keep_last_n: int | None = _f(None, "keep only the newest N checkpoints (none: keep all)")
    save_hf: bool = _f(False, "also write a Hugging Face folder (fp32) iter_NNNNNNN/hf/ per checkpoint")
    allow_changes: Any = _f(
        [],
        "on resume, what may differ from the checkpoint on purpose: seq_length, global_batch_size, "
        "base_model (otherwise a mismatch with the checkpoint's run_state.json is an error)",
    )

    def validate(self) -> None:
        changes = self.allow_changes
        if not isinstance(changes, list) or any(c not in RESUME_CHANGES for c in changes):
            raise ValueError(
                f"checkpoint.allow_changes={changes!r} must be a list of {', '.join(RESUME_CHANGES)}"
            )
        if self.save_interval < 0:
            raise ValueError(f"checkpoint.save_interval must be >= 0, got {self.save_interval}")
        if self.keep_last_n is not None and self.keep_last_n < 1:
            raise ValueError(f"checkpoint.keep_last_n must be >= 1, got {self.keep_last_n}")


@dataclass
class DistributedConfig:
    engine: str = _f("deepspeed", "sharding engine: deepspeed or fsdp2 (PyTorch fully_shard)")
    zero_stage: int = _f(2, "DeepSpeed ZeRO stage 0-3")
    offload_optimizer: bool = _f(False, "ZeRO: keep optimizer states (and step) on the CPU")
    offload_params: bool = _f(False, "ZeRO-3: keep parameters on the CPU")
    deepspeed_config: str | None = _f(
        None, "a DeepSpeed JSON whose keys override the ones built from this config"
    )
    fsdp_shard_size: int | None = _f(
        None, "FSDP2 hybrid sharding: shard inside groups of N ranks, replicate across groups (None: all)"
    )
    fsdp_reshard_after_forward: bool = _f(
        True, "FSDP2: free gathered decoder-layer weights after forward (False: keep them for backward)"
    )
    fsdp_cpu_offload: bool = _f(False, "FSDP2: keep parameters, gradients and optimizer states on the CPU")
    fsdp_defer_grad_sync: bool = _f(
        False,
        "FSDP2 with gradient accumulation: keep unsharded fp32 gradients of the whole model until the last "
        "micro-batch and reduce once (less communication, but full gradients on every rank: for small "
        "models only); false: reduce-scatter every micro-batch and accumulate sharded gradients",
    )
    reduce_dtype: str = _f(
        "fp32",
        "dtype of the gradient reduction across ranks: fp32, or bf16 (half the bytes on the wire, as in "
        "DeepSpeed's bf16 mode; each rank's gradient is rounded to bf16 before the sum; needs "
        "train.precision=bf16)",
    )
    expert_parallel_size: int = _f(
        1,
        "expert parallelism: spread each MoE layer's routed experts over groups of N consecutive ranks and "
        "send tokens to their experts with all-to-all (N divides the processes and the expert count; 1: off)",
    )
    backend: str | None = _f(None, "torch.distributed backend (default: nccl with CUDA, else gloo)")
    timeout_minutes: float = _f(
        30.0, "collective timeout: how long a rank waits for the others in a collective"
    )
    init_timeout_minutes: float = _f(
        5.0,
        "start-up timeout: how long the ranks wait for each other at the rendezvous (a rank missing, "
        "MASTER_ADDR unreachable) and for another process's build of a PyTorch extension, before they stop "
        "with a message",
    )

    def _validate_expert_parallel(self) -> None:
        """What can be told from the config alone; the process and expert counts are checked at start."""
        ep = self.expert_parallel_size
        if ep < 1:
            raise ValueError(f"distributed.expert_parallel_size must be >= 1, got {ep}")
        if ep == 1:
            return
        if self.engine == "deepspeed":
            if self.zero_stage == 3:
                raise ValueError(
                    f"distributed.expert_parallel_size={ep} cannot be combined with distributed.zero_stage=3 "
                    "(ZeRO-3 would partition the experts again across the ranks that hold different ones); "
                    "use distributed.zero_stage 0, 1 or 2, or distributed.engine=fsdp2"
                )
            if self.offload_optimizer:
                raise ValueError(
                    f"distributed.expert_parallel_size={ep} cannot be combined with "
                    "distributed.offload_optimizer=true (not verified with expert parallelism)"
                )
            return
        if self.fsdp_shard_size is not None:
            raise ValueError(
                f"distributed.expert_parallel_size={ep} cannot be combined with distributed.fsdp_shard_size="
                f"{self.fsdp_shard_size} (hybrid sharding); leave fsdp_shard_size unset"
            )

    def validate(self) -> None:
        _choice("distributed.engine", self.engine, ("deepspeed", "fsdp2"))
        for key in ("timeout_minutes", "init_timeout_minutes"):
            if not getattr(self, key) > 0:
                raise ValueError(f"distributed.{key} must be > 0, got {getattr(self, key)}")
        if self.fsdp_shard_size is not None and self.fsdp_shard_size < 1:
            raise ValueError(f"distributed.fsdp_shard_size must be >= 1, got {self.fsdp_shard_size}")
        fsdp_keys = {
            "fsdp_shard_size": self.fsdp_shard_size is not None,
            "fsdp_reshard_after_forward": not self.fsdp_reshard_after_forward,
            "fsdp_cpu_offload": self.fsdp_cpu_offload,
            "fsdp_defer_grad_sync": self.fsdp_defer_grad_sync,
        }
        ds_keys = {
            "offload_optimizer": self.offload_optimizer,
            "offload_params": self.offload_params,
            "deepspeed_config": bool(self.deepspeed_config),
        }
        wrong = [k for k, v in (ds_keys if self.engine == "fsdp2" else fsdp_keys).items() if v]
        if wrong:
            raise ValueError(f"distributed.{wrong[0]} does not apply to distributed.engine={self.engine}")
        _choice("distributed.zero_stage", self.zero_stage, (0, 1, 2, 3))
        self._validate_expert_parallel()
        _choice("distributed.reduce_dtype", self.reduce_dtype, ("fp32", "bf16"))
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("distributed.offload_params needs distributed.zero_stage=3")
        if self.deepspeed_config and not Path(self.deepspeed_config).is_file():
            raise FileNotFoundError(f"distributed.deepspeed_config: no such file {self.deepspeed_config}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def validate(self) -> None:
        for section in dataclasses.fields(self):
            check = getattr(getattr(self, section.name), "validate", None)
            if check:
                check()
        if self.distributed.reduce_dtype == "bf16" and self.train.precision == "fp32":
            raise ValueError(
                "distributed.reduce_dtype=bf16 needs train.precision=bf16 (or auto on bf16 hardware)"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}")


def _positive(key: str, value: int) -> None:
    if value <= 0:
        raise ValueError(f"{key} must be > 0, got {value}")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check `value` against a field's type annotation (a string under postponed evaluation)."""
    tp = eval(annotation, {"Any": Any}) if isinstance(annotation, str) else annotation  # noqa: S307
    if tp is Any:
        return value
    options = typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,)
    if value is None:
        if type(None) in options:
            return None
        raise ValueError(f"{key} may not be null")
    for opt in options:
        if opt is bool and isinstance(value, bool):
            return value
        if opt is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if opt is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if opt is str and isinstance(value, str):
            return value
    if isinstance(value, str) and (float in options or int in options):
        # YAML 1.1 reads "1e-4" (no dot) as a string; accept numbers written that way
        try:
            number = float(value)
        except ValueError:
            pass
        else:
            if float in options:
                return number
            if number.is_integer():
                return int(number)
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ValueError(f"{key}={value!r} should be {names}")


def _apply(cfg: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) != 2:
        raise ValueError(f"unknown config key {key!r} (keys look like section.name, see --show-keys)")
    section, name = parts
    if section not in {f.name for f in dataclasses.fields(cfg)}:
        raise ValueError(f"unknown config section {section!r} in key {key!r}")
    sub = getattr(cfg, section)
    fields = {f.name: f for f in dataclasses.fields(sub)}
    if name not in fields:
        raise ValueError(f"unknown config key {key!r}")
    setattr(sub, name, _coerce(key, value, fields[name].type))


def _flatten(tree: dict[str, Any], source: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section, values in tree.items():
        if not isinstance(values, dict):
            raise ValueError(f"{source}: section {section!r} must be a mapping of keys, got {values!r}")
        for name, value in values.items():
            flat[f"{section}.{name}"] = value
    return flat


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value parsed as YAML, so 1e-4, true, [1, x] work)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} should look like key=value (e.g. train.iters=100)")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, validate: bool = True
) -> Config:
    """Build a Config from a YAML file and `key=value` overrides, then validate it."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        tree = yaml.safe_load(p.read_text()) or {}
        if not isinstance(tree, dict):
            raise ValueError(f"{p}: the config must be a mapping of sections")
        for key, value in _flatten(tree, str(p)).items():
            _apply(cfg, key, value)
    for item in overrides or []:
        key, value = parse_override(item)
        _apply(cfg, key, value)
    if validate:
        cfg.validate()
    return cfg


def config_from_dict(tree: dict[str, Any]) -> Config:
    cfg = Config()
    for key, value in _flatten(tree, "config").items():
        _apply(cfg, key, value)
    return cfg


def describe_keys() -> str:
    """One line per key: name, default and meaning (for `moe-recipes train --show-keys`)."""
    lines = []
    for section in dataclasses.fields(Config):
        sub = section.default_factory()  # type: ignore[misc]
        for f in dataclasses.fields(sub):
            lines.append(
                f"{section.name}.{f.name} = {getattr(sub, f.name)!r}\n    {f.metadata.get('help', '')}"
            )
    return "\n".join(lines)
