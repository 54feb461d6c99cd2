"""Dataclass configs, YAML loading, dotted CLI overrides and validation.

Every check runs before any work starts, and every error names the offending key
(``model.n_heads``), so a bad recipe fails in a second instead of after a launch.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml


class ConfigError(ValueError):
    """A config value is unknown, mistyped or inconsistent; the message names the key."""


# Field metadata of the architecture keys: what the checkpoint's tensors are (their set, shapes,
# dtypes and meaning). Resume, export and explicit-memory fingerprints compare exactly these
# (:func:`architecture`); layout, schedules and other knobs may change between runs.
ARCH = {"arch": True}


def arch(default: Any) -> Any:
    """An architecture field with a scalar default (lists: ``field(default_factory=list,
    metadata=ARCH)``)."""
    return field(default=default, metadata=ARCH)


class Section:
    """A config section: ``key`` is its dotted name in :class:`Config`; :meth:`validate` checks
    the values that need no other section, naming the key."""

    key: ClassVar[str]

    def validate(self) -> None:
        """Nothing to check unless a section says so."""

    def require(self, cond: bool, name: str, msg: str) -> None:
        """Fail naming ``<section>.<name>`` unless ``cond``."""
        _require(cond, f"{self.key}.{name}", msg)

    def require_positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            self.require(value > 0, name, f"must be positive, got {value}")


@dataclass
class ModelConfig(Section):
    key: ClassVar[str] = "model"

    vocab_size: int = arch(260)
    d_model: int = arch(128)
    n_layers: int = arch(4)
    n_heads: int = arch(4)
    n_kv_heads: int = arch(2)
    d_ff: int = arch(384)
    max_seq_len: int = arch(256)
    rope_theta: float = arch(10000.0)
    norm_eps: float = arch(1e-5)
    tie_embeddings: bool = arch(True)
    init_std: float = 0.02  # the init only: a trained model's weights are what they are

    def validate(self) -> None:
        self.require_positive("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                              "d_ff", "max_seq_len")
        self.require(self.d_model % self.n_heads == 0, "n_heads",
                     f"{self.n_heads} heads do not divide d_model={self.d_model}")
        self.require((self.d_model // self.n_heads) % 2 == 0, "n_heads",
                     f"head dim {self.d_model // self.n_heads} must be even for RoPE")
        self.require(self.n_heads % self.n_kv_heads == 0, "n_kv_heads",
                     f"{self.n_kv_heads} kv heads do not divide n_heads={self.n_heads}")


def _require_distinct(section: Section, name: str, layers: list[int]) -> None:
    for i, layer in enumerate(layers):
        section.require(layer >= 0, f"{name}[{i}]", f"layer {layer} must be >= 0")
        section.require(layer not in layers[:i], f"{name}[{i}]", f"layer {layer} listed twice")


@dataclass
class ExplicitConfig(Section):
    """Memory^3 explicit memories (DESIGN §6): in the memory layers every ``chunk``-token chunk
    attends to the K/V of its ``r`` retrieved references besides its causal context. They hold
    no parameters, so a run trained without them may continue with them (two-stage recipe)."""

    key: ClassVar[str] = "memory.explicit"

    store: str = ""  # explicit-memory store directory or http(s):// URL; "" = no memories
    r: int = 5  # memories per chunk
    chunk: int = 64  # tokens per retrieval chunk
    # attention layers that take memories; [] = the first half of the model's layers
    layers: list[int] = field(default_factory=list)
    # Two-stage training: the steps before start_step train without memory, the continual stage
    # from start_step on reads each sample's `memory_ids` field and attends to those memories.
    start_step: int = 0
    cache: int = 4096  # decoded memories kept in the store's LRU cache (0 = none)
    prefetch: int = 2  # batches whose memories a background thread fetches ahead

    def resolved_layers(self, n_layers: int) -> list[int]:
        """The memory layers: ``layers``, or the first half of the model's layers."""
        return list(self.layers) or list(range(max(1, n_layers // 2)))

    def validate(self) -> None:
        self.require_positive("r", "chunk", "prefetch")
        for name in ("start_step", "cache"):
            self.require(getattr(self, name) >= 0, name, f"must be >= 0, got "
                         f"{getattr(self, name)}")
        _require_distinct(self, "layers", self.layers)


@dataclass
class MemoryConfig(Section):
    """Product-key memory layers (DESIGN §3), and explicit memories (``memory.explicit``)."""

    key: ClassVar[str] = "memory"

    # block indices that get a memory layer
    layers: list[int] = field(default_factory=list, metadata=ARCH)
    # replace the FFN or run beside it
    placement: Literal["replace", "beside"] = arch("replace")
    memory_plus: bool = arch(True)  # out = W_o(y * SiLU(W_g x)); plain PKM when False
    n_heads: int = arch(4)  # H
    topk: int = arch(32)  # k
    d_key: int = arch(64)  # full query/key width; each half is d_key / 2
    n_sub_keys: int = arch(64)  # n; N = n^2 slots
    value_dim: int = arch(0)  # d_v; 0 means d_model
    query_norm: bool = arch(True)
    key_norm: bool = arch(False)
    # Groups of layers that share one value table (each layer keeps its own keys and
    # query net). Layers not listed get a table of their own.
    shared_tables: list[list[int]] = field(default_factory=list, metadata=ARCH)
    usage_window: int = 100  # steps over which per-slot hits are counted
    # How tables spread over the memory-parallel group (parallel.ep): rows sharded with
    # all-to-all lookups; or the baselines, columns sharded, or whole tables everywhere with a
    # dense gradient all-reduce.
    parallel: Literal["rowwise", "colwise", "replicated"] = "rowwise"
    # Storage of value-table rows. bf16 halves the table; its optimizer state stays fp32 and its
    # row updates round stochastically, seeded (train/optim.py, values.store_rows).
    value_dtype: Literal["fp32", "bf16"] = arch("fp32")
    # Under tp, each tp rank looks up 1/tp of the tokens and the rows are all-gathered over tp
    # (parallel/token_slice.py), instead of every tp rank repeating every lookup: the memory
    # exchange carries 1/tp of the bytes. The same training up to fp32 summation order.
    tp_slice_lookups: bool = True
    explicit: ExplicitConfig = field(default_factory=ExplicitConfig)

    @property
    def n_slots(self) -> int:
        return self.n_sub_keys**2

    def validate(self) -> None:
        _require_distinct(self, "layers", self.layers)
        if self.layers:
            self.require_positive("n_heads", "n_sub_keys", "usage_window")
            self.require(self.d_key > 0 and self.d_key % 2 == 0, "d_key",
                         f"must be a positive even number (split in two halves), got "
                         f"{self.d_key}")
            self.require(0 < self.topk <= self.n_sub_keys, "topk",
                         f"k={self.topk} must be in [1, n_sub_keys={self.n_sub_keys}]")
            self.require(self.value_dim >= 0, "value_dim", "must be >= 0 (0 means d_model)")
        in_group: set[int] = set()
        for g, group in enumerate(self.shared_tables):
            name = f"shared_tables[{g}]"
            self.require(len(group) >= 2, name, "a shared group needs >= 2 layers")
            for layer in group:
                self.require(layer in self.layers, name, f"layer {layer} is not a memory layer "
                             f"(memory.layers={self.layers})")
                self.require(layer not in in_group, name, f"layer {layer} is in two shared "
                             "groups")
                in_group.add(layer)
        self.explicit.validate()


@dataclass
class BankConfig(Section):
    """Hierarchical memory bank (DESIGN §5, model/memory/hierarchical.py). Every node of the
    corpus's cluster tree (``levels`` x ``branching``, root excluded, as ``memtron data
    cluster`` built it) owns a block of extra SwiGLU neurons in each of ``layers``; a sequence
    adds the blocks on its root-to-leaf path to those layers' FFNs."""

    key: ClassVar[str] = "bank"

    # blocks whose FFN gets a bank; [] = none
    layers: list[int] = field(default_factory=list, metadata=ARCH)
    levels: int = arch(4)  # tree depth below the root (must match the tree); 0 = generic only
    branching: int = arch(16)  # children per node (must match the tree)
    # Neurons per node block, per level from the root's children down (often larger deeper).
    block_sizes: list[int] = field(default_factory=list, metadata=ARCH)
    generic_size: int = arch(0)  # neurons of a block every sequence uses (dense); 0 = off
    # Train only the bank (blocks and the generic block). Architecture: it decides which
    # parameters the checkpoint holds optimizer state for.
    freeze_anchor: bool = arch(False)
    # Block rows learn at optim.lr * lr_mult (sparse row optimizer); value tables use
    # optim.memory_lr_mult. Blocks are FFN weights at the anchor's init scale: 1 is the default.
    lr_mult: float = 1.0

    def nodes_per_level(self) -> list[int]:
        return [self.branching ** (level + 1) for level in range(self.levels)]

    def validate(self) -> None:
        if not self.layers:
            self.require(not self.freeze_anchor, "freeze_anchor", "needs bank.layers")
            self.require(self.generic_size == 0, "generic_size", "needs bank.layers")
            return
        _require_distinct(self, "layers", self.layers)
        self.require(self.levels >= 0, "levels", f"must be >= 0, got {self.levels}")
        self.require(bool(self.levels or self.generic_size), "levels",
                     "0 levels (no tree blocks) needs bank.generic_size > 0")
        self.require(self.branching >= 2, "branching", f"must be >= 2, got {self.branching}")
        self.require(len(self.block_sizes) == self.levels, "block_sizes",
                     f"needs one size per level (bank.levels={self.levels}), got "
                     f"{self.block_sizes}")
        for i, size in enumerate(self.block_sizes):
            self.require(size > 0, f"block_sizes[{i}]", f"must be positive, got {size}")
        self.require(self.generic_size >= 0, "generic_size",
                     "must be >= 0 (0 = no generic block)")
        self.require(self.lr_mult > 0, "lr_mult", f"must be positive, got {self.lr_mult}")


@dataclass
class DataConfig(Section):
    key: ClassVar[str] = "data"

    train: str = "runs/data/tiny/train"  # directory of prepared shards (index.json)
    valid: str = "runs/data/tiny/valid"
    questions: str = "runs/data/tiny/questions.jsonl"  # fact questions; "" disables
    tokenizer: str = "byte"  # "byte" or a path to a Hugging Face tokenizer.json
    seq_len: int = 128
    micro_batch_size: int = 16
    num_workers: int = 0

    def validate(self) -> None:
        self.require_positive("seq_len", "micro_batch_size")
        self.require(self.num_workers >= 0, "num_workers", "must be >= 0")


MemoryOptimizer = Literal["adam", "adam_rowwise_v", "rowwise_adagrad", "adam_b1zero_rowwise"]
MemoryDecayMode = Literal["touched", "global"]


@dataclass
class OptimConfig(Section):
    key: ClassVar[str] = "optim"

    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # dense params; 0 disables
    memory_lr_mult: float = 10.0  # value tables learn at lr * memory_lr_mult
    memory_weight_decay: float = 0.0
    # How value rows decay (decoupled, row *= 1 - lr * memory_weight_decay): "touched" only on
    # the steps a row is read, so rarely read rows barely decay; "global" every row every step
    # as in dense AdamW, applied lazily and exactly: a row owes the decay of the steps it
    # missed (a per-row fp64 clock, sharded and checkpointed with the rows), lookups read it
    # decayed, the update writes it in (train/optim.py).
    memory_weight_decay_mode: MemoryDecayMode = "touched"
    memory_grad_clip: float = 1.0  # global norm over the touched value rows; 0 disables
    # Value-table optimizer (train/optim.py): lazy Adam with per-element moments, Adam with a
    # per-row second moment, row-wise Adagrad, or b1=0 Adam with a per-row second moment.
    memory_optimizer: MemoryOptimizer = "adam"
    memory_moment_dtype: Literal["fp32", "bf16"] = "fp32"  # the first moment's storage

    def validate(self) -> None:
        self.require_positive("lr", "memory_lr_mult")
        self.require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        self.require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        self.require(0 <= self.beta1 < 1, "beta1", "must be in [0, 1)")
        self.require(0 <= self.beta2 < 1, "beta2", "must be in [0, 1)")
        self.require(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables)")
        self.require(self.memory_grad_clip >= 0, "memory_grad_clip", "must be >= 0 (0 disables)")
        self.require(self.memory_moment_dtype == "fp32"
                     or self.memory_optimizer in ("adam", "adam_rowwise_v"),
                     "memory_moment_dtype", f"{self.memory_optimizer} keeps no first moment")


@dataclass
class ParallelConfig(Section):
    """Process layout (DESIGN §2, §4). The world is tp x cp x dp ranks; the memory-parallel group
    (ep) is folded over those same ranks, so value tables are stored once in the whole job."""

    key: ClassVar[str] = "parallel"

    tp: int = 1  # tensor parallel
    cp: int = 1  # context parallel
    dp: int = 0  # data parallel; 0 = world_size / (tp * cp)
    ep: int = 0  # memory (value-table) parallel; 0 = all ranks
    timeout_s: float = 600.0  # collective timeout: a hung or dead peer fails the job after it
    # auto: the backend of train.device (nccl on CUDA, gloo on CPU)
    backend: Literal["auto", "gloo", "nccl"] = "auto"

    def validate(self) -> None:
        for name in ("tp", "cp"):
            self.require(getattr(self, name) >= 1, name, "must be >= 1")
        for name in ("dp", "ep"):
            self.require(getattr(self, name) >= 0, name, "must be >= 0 (0 = derive)")
        self.require_positive("timeout_s")


@dataclass
class TrainConfig(Section):
    key: ClassVar[str] = "train"

    steps: int = 600
    grad_accum: int = 1
    seed: int = 1234
    dtype: Literal["fp32", "bf16"] = "fp32"  # bf16 = autocast; params and optimizer stay fp32
    # auto: this machine's accelerator (its local-rank device) if it has one, else the CPU
    # (memtron.device.resolve_device); cuda fails before launch on a machine without CUDA.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_every: int = 200
    eval_batches: int = 8
    log_every: int = 10
    run_dir: str = "runs/tiny-cpu"
    threads: int = 0  # torch intra-op threads; 0 leaves torch's default
    # The dense data-parallel engine over dp x cp (parallel/engine.py); "native" was its old
    # hand-written all-reduce, now "ddp".
    engine: Literal["ddp", "fsdp2", "deepspeed", "native"] = "ddp"
    zero_stage: int = 1  # DeepSpeed ZeRO stage (1 or 2) when engine=deepspeed
    # A step whose loss or gradient norm is not finite is skipped on every rank; after this many
    # in a row the run stops with a diagnostic (and no checkpoint of the diverged state).
    max_bad_steps: int = 5
    loss_spike_window: int = 100  # steps of the running loss z-score (metric loss_z); 0 = off
    loss_spike_z: float = 6.0  # a loss this many standard deviations above the window is reported

    def validate(self) -> None:
        self.require_positive("steps", "grad_accum", "log_every", "loss_spike_z")
        self.require(self.engine != "native", "engine", "'native' is now called 'ddp'")
        self.require(self.zero_stage in (1, 2), "zero_stage",
                     f"must be 1 or 2, got {self.zero_stage}")
        self.require(self.eval_every >= 0, "eval_every", "must be >= 0 (0 disables)")
        self.require(self.threads >= 0, "threads", "must be >= 0")
        self.require(self.max_bad_steps >= 1, "max_bad_steps",
                     f"must be >= 1, got {self.max_bad_steps}")
        self.require(self.loss_spike_window >= 0, "loss_spike_window",
                     "must be >= 0 (0 disables)")


@dataclass
class CheckpointConfig(Section):
    key: ClassVar[str] = "checkpoint"

    every: int = 200  # steps; 0 saves only at the end and on signals
    keep_last: int = 2
    resume: str = "auto"  # "auto" (newest valid in run_dir, if any), "none", or a checkpoint path
    # Write from a CPU copy in a background thread: training waits for the copy only (costs
    # one copy of the model and optimizer state in host memory).
    async_save: bool = False

    def validate(self) -> None:
        self.require(self.every >= 0, "every", "must be >= 0")
        self.require(self.keep_last >= 1, "keep_last", "must keep at least 1")


@dataclass
class LoggingConfig(Section):
    key: ClassVar[str] = "logging"

    jsonl: bool = True
    tensorboard: bool = True
    progress: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def sections(self) -> list[Section]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]


# --------------------------------------------------------------------------- architecture


def architecture_keys(section: type | Section) -> tuple[str, ...]:
    """The architecture fields of a section (class or instance), tagged ``ARCH``."""
    return tuple(f.name for f in dataclasses.fields(section) if f.metadata.get("arch"))


def architecture(cfg: Config) -> dict[str, dict[str, Any]]:
    """``{section: {key: value}}`` of every architecture key: two configs with the same
    architecture load each other's checkpoints."""
    arch_of = {}
    for section in cfg.sections():
        keys = architecture_keys(section)
        if keys:
            arch_of[section.key] = {k: getattr(section, k) for k in keys}
    return arch_of


def architecture_diff(a: Config, b: Config) -> tuple[str, Any, Any] | None:
    """The first architecture key (``model.d_model``) where ``a`` and ``b`` differ, with both
    values, or None."""
    new = architecture(b)
    for section, values in architecture(a).items():
        for key, value in values.items():
            if new[section][key] != value:
                return f"{section}.{key}", value, new[section][key]
    return None


# --------------------------------------------------------------------------- typing


# Why a small coercer rather than pydantic (installed) or draccus/tyro: pydantic's lax mode
# turns `memory.explicit.r=true` into 1 and `model.tie_embeddings=yes` into True, and its strict
# mode refuses the YAML mappings themselves (it wants dataclass instances) and "1e-3", which
# YAML 1.1 reads as a string; its unknown-key error lists no known keys. draccus and tyro parse
# `--model.n-layers` command lines, not our dotted `key=value` overrides of a YAML recipe.
# These sixty lines give exact types and errors that name the key and the choices.
def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: unexpected {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise ConfigError(f"{key}: unsupported config type {tp!r}")  # a bug in this file


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in raw.items()}
    return cls(**kwargs)


# --------------------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """``model.n_layers=4`` -> (["model", "n_layers"], 4); values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    key, _, raw = text.partition("=")
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"override {text!r}: empty key component")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {e}") from e
    return path, value


def _merge(base: dict, path: list[str], value: Any) -> None:
    node = base
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path[: i + 1])}: is a value, not a section")
        node = child
    node[path[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe (or the defaults), apply dotted overrides, type-check and validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML: {e}") from e
        raw = loaded or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
    for text in overrides or []:
        path_parts, value = parse_override(text)
        _merge(raw, path_parts, value)
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Rebuild a config saved in a checkpoint manifest."""
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------- validation


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def check_world(cfg: Config, world_size: int) -> tuple[int, int, int, int]:
    """Resolve (tp, cp, dp, ep) for ``world_size`` ranks, or fail naming the numbers."""
    p = cfg.parallel
    model_ranks = p.tp * p.cp
    _require(world_size % model_ranks == 0, "parallel.tp",
             f"tp={p.tp} x cp={p.cp} = {model_ranks} does not divide world size {world_size}")
    dp = p.dp or world_size // model_ranks
    _require(model_ranks * dp == world_size, "parallel.dp",
             f"tp={p.tp} x cp={p.cp} x dp={dp} = {model_ranks * dp} != world size {world_size}")
    ep = p.ep or world_size
    _require(world_size % ep == 0, "parallel.ep", f"ep={ep} does not divide world size "
             f"{world_size}")
    value_dim = cfg.memory.value_dim or cfg.model.d_model
    _require(cfg.memory.parallel != "colwise" or value_dim % ep == 0, "memory.value_dim",
             f"{value_dim} is not divisible by ep={ep} (memory.parallel=colwise)")
    return p.tp, p.cp, dp, ep


def _check_layers(key: str, layers: list[int], n_layers: int) -> None:
    for i, layer in enumerate(layers):
        _require(layer < n_layers, f"{key}[{i}]",
                 f"layer {layer} out of range for model.n_layers={n_layers}")


def check_across(cfg: Config) -> None:
    """The checks that relate keys of different sections (each section checked itself)."""
    m, mem, b, d, o, p, t = (cfg.model, cfg.memory, cfg.bank, cfg.data, cfg.optim, cfg.parallel,
                             cfg.train)
    _require(d.seq_len <= m.max_seq_len, "data.seq_len",
             f"{d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    _check_layers("memory.layers", mem.layers, m.n_layers)
    _require(not mem.layers or mem.memory_plus or mem.value_dim in (0, m.d_model),
             "memory.value_dim",
             f"plain PKM (memory_plus=false) needs value_dim == d_model={m.d_model}")
    _check_layers("memory.explicit.layers", mem.explicit.layers, m.n_layers)
    _check_layers("bank.layers", b.layers, m.n_layers)
    for i, layer in enumerate(b.layers):
        _require(layer not in mem.layers or mem.placement == "beside", f"bank.layers[{i}]",
                 f"layer {layer} has no FFN to extend (a memory layer with "
                 "memory.placement=replace)")
    _require(not (b.freeze_anchor and mem.layers), "bank.freeze_anchor",
             "freezing an anchor with product-key memory layers is not supported (their "
             "value tables train through the sparse optimizer)")
    _require(o.memory_optimizer == "adam" or mem.parallel != "colwise", "optim.memory_optimizer",
             f"{o.memory_optimizer} keeps per-row statistics of whole rows: it needs "
             "memory.parallel rowwise or replicated, not colwise")
    _require(o.memory_weight_decay_mode == "touched" or mem.parallel != "colwise",
             "optim.memory_weight_decay_mode", "global decay keeps a clock per whole row: it "
             "needs memory.parallel rowwise or replicated, not colwise")
    _require(d.seq_len % (2 * p.cp) == 0, "data.seq_len",
             f"{d.seq_len} must be divisible by 2 * parallel.cp = {2 * p.cp} (zigzag chunks)")
    for what, size in [("n_heads", m.n_heads), ("n_kv_heads", m.n_kv_heads), ("d_ff", m.d_ff),
                       ("vocab_size", m.vocab_size)]:
        _require(size % p.tp == 0, "parallel.tp",
                 f"tp={p.tp} does not divide model.{what}={size}")
    _require(t.engine != "deepspeed" or (p.tp == 1 and p.cp == 1), "train.engine",
             "deepspeed runs data parallelism only here: needs parallel.tp=1 and parallel.cp=1")
    _require(t.engine != "fsdp2" or p.tp == 1, "train.engine",
             "fsdp2 shards over dp x cp only here: needs parallel.tp=1")
    _require(p.backend != "nccl" or t.device != "cpu", "parallel.backend",
             "nccl runs on CUDA devices, but train.device=cpu; use gloo or auto")


def validate(cfg: Config) -> None:
    """Every section's own checks, then the checks across sections."""
    for section in cfg.sections():
        section.validate()
    check_across(cfg)
