"""Checkpoint <-> Hugging Face model directory (DESIGN §9).

``export_hf`` reads a checkpoint saved at any layout in one process (no process group) through
:class:`~memtron.train.checkpoint.CheckpointReader` and streams every tensor, row block by row
block, into safetensors shards of at most ``max_shard_size`` with ``model.safetensors.index.json``,
so memory stays at a few read blocks (:data:`READ_BYTES`) whatever the model.
A model without memory layers is a native ``LlamaForCausalLM``: memtron's block is Llama's
(RMSNorm, RoPE, SwiGLU, GQA); only RoPE differs in layout, memtron rotating pairs
``(x[2i], x[2i+1])`` and Llama ``(x[i], x[i + d/2])``, so each head's q/k projection rows are
permuted (dot products of q and k are unchanged). A model with memory layers is
``model_type: memtron`` with the remote code of :mod:`memtron.export.hf_remote`; its value
tables are row-block tensors ``model.value_tables.table{g}.block_{j}`` of at most
:data:`TABLE_BLOCK_BYTES`, or (``values="bank"``) a memtron bank in ``OUT/values`` that the
model memory-maps (config field ``memory_bank``). The directory also gets the tokenizer,
``generation_config.json`` and ``memtron.json`` (the memtron config, step and data position).

``import_hf`` goes back: an exported directory, or a plain Llama of a shape memtron can express,
becomes a checkpoint that ``memtron train --resume CKPT_DIR`` continues.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memtron.config import Config, ConfigError, architecture_diff, load_config
from memtron.data.loader import ShardLoader
from memtron.export.hf_tokenizer import write_hf_tokenizer
from memtron.model.tables import LocalValueTable
from memtron.model.transformer import build_model, table_groups
from memtron.storage import rowblock
from memtron.storage.bank import TableRows, open_bank, write_bank
from memtron.storage.checkpoint import CheckpointReader
from memtron.storage.manifest import CheckpointError
from memtron.storage.rowblock import RowBlockWriter
from memtron.train.checkpoint import save_checkpoint
from memtron.train.optim import build_optimizers

HF_FORMAT = "memtron-hf"
PROVENANCE = "memtron.json"  # memtron config, step and data position of an exported model
INDEX = "model.safetensors.index.json"
REMOTE_CODE = Path(__file__).with_name("hf_remote")
# remote code files, and where each comes from: the bank reader is the one of memtron.storage
REMOTE_FILES = {"configuration_memtron.py": REMOTE_CODE / "configuration_memtron.py",
                "modeling_memtron.py": REMOTE_CODE / "modeling_memtron.py",
                "rowblock.py": Path(rowblock.__file__)}
TABLE_BLOCK_BYTES = 1 << 30  # value-table row blocks are at most this (and max_shard_size)
# Rows read from a checkpoint at a time: small enough that the allocator's slack (freed blocks
# it keeps) stays a few MiB, large enough that reads and writes run at disk speed.
READ_BYTES = 4 << 20
BANK_DIR = "values"  # where values="bank" puts the tables, relative to OUT
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10,
          "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class HFError(CheckpointError):
    """An export or import cannot proceed; the message names the file or key."""


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string like ``"2GB"`` (decimal) or ``"512MiB"`` (binary),
    as transformers spells shard sizes."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", size.upper())
        if match is None:
            raise HFError(f"max_shard_size {size!r}: expected bytes or e.g. 2GB, 500MB, 1GiB")
        value = int(float(match[1]) * _UNITS[match[2] or ""])
    if value < 1:
        raise HFError(f"max_shard_size must be positive, got {size!r}")
    return value


# --------------------------------------------------------------------------- names


@dataclass(frozen=True)
class _Name:
    hf: str  # name in the Hugging Face model
    key: str  # name in memtron's model state dict
    rotary: bool = False  # q/k projection: rows permuted per head between the RoPE layouts


def _dense_names(cfg: Config) -> list[_Name]:
    """Every tensor but the value tables, in the order of the Hugging Face model."""
    model, mem = cfg.model, cfg.memory
    names = [_Name("model.embed_tokens.weight", "embed.weight")]
    for i in range(model.n_layers):
        hf, key = f"model.layers.{i}.", f"blocks.{i}."
        names += [_Name(hf + "input_layernorm.weight", key + "attn_norm.weight"),
                  _Name(hf + "self_attn.q_proj.weight", key + "attn.wq.weight", rotary=True),
                  _Name(hf + "self_attn.k_proj.weight", key + "attn.wk.weight", rotary=True),
                  _Name(hf + "self_attn.v_proj.weight", key + "attn.wv.weight"),
                  _Name(hf + "self_attn.o_proj.weight", key + "attn.wo.weight"),
                  _Name(hf + "post_attention_layernorm.weight", key + "mlp_norm.weight")]
        memory = i in mem.layers
        if not memory or mem.placement == "beside":
            ffn = hf + ("mlp.ffn." if memory else "mlp.")
            names += [_Name(ffn + "gate_proj.weight", key + "ffn.w_gate.weight"),
                      _Name(ffn + "up_proj.weight", key + "ffn.w_up.weight"),
                      _Name(ffn + "down_proj.weight", key + "ffn.w_down.weight")]
        if memory:
            parts = ["query.weight", "keys"]
            parts += ["query_norm.weight"] if mem.query_norm else []
            parts += ["gate.weight", "out.weight"] if mem.memory_plus else []
            names += [_Name(f"{hf}mlp.memory.{p}", f"{key}memory.{p}") for p in parts]
    names.append(_Name("model.norm.weight", "norm.weight"))
    if not model.tie_embeddings:
        names.append(_Name("lm_head.weight", "head.weight"))
    return names


def _rope_permutation(head_dim: int) -> torch.Tensor:
    """Row ``j`` of a Llama head is row ``perm[j]`` of the memtron head: memtron's pair i is
    (2i, 2i+1), Llama's is (i, i + head_dim/2), both rotating by frequency i."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def _permute_heads(rows: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Permute the rows of each head (whole heads only) of a projection weight block."""
    width = rows.shape[-1]
    return rows.view(-1, perm.numel(), width)[:, perm].reshape(-1, width)


def _table_name(g: int) -> str:
    return f"table{g}"


def _block_name(g: int, j: int) -> str:
    return f"model.value_tables.{_table_name(g)}.block_{j}"


# --------------------------------------------------------------------------- config


def _hf_config(cfg: Config, eos_id: int, dtype: torch.dtype, rows_per_block: int,
               bank: str | None) -> dict[str, Any]:
    """``config.json``, readable by transformers 4.x (``rope_theta``, ``torch_dtype``) and 5.x
    (``rope_parameters``, ``dtype``)."""
    m, mem = cfg.model, cfg.memory
    dtype_name = str(dtype).removeprefix("torch.")
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": m.vocab_size, "hidden_size": m.d_model, "intermediate_size": m.d_ff,
        "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads, "head_dim": m.d_model // m.n_heads,
        "hidden_act": "silu", "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "tie_word_embeddings": m.tie_embeddings, "attention_bias": False,
        "attention_dropout": 0.0, "mlp_bias": False, "initializer_range": m.init_std,
        "bos_token_id": None, "eos_token_id": eos_id, "pad_token_id": None, "use_cache": True,
        "torch_dtype": dtype_name, "dtype": dtype_name,
    }
    if mem.layers:
        config.update({
            "architectures": ["MemtronForCausalLM"], "model_type": "memtron",
            "auto_map": {"AutoConfig": "configuration_memtron.MemtronConfig",
                         "AutoModelForCausalLM": "modeling_memtron.MemtronForCausalLM"},
            "memory_layers": sorted(mem.layers), "memory_tables": table_groups(mem),
            "memory_placement": mem.placement, "memory_plus": mem.memory_plus,
            "memory_heads": mem.n_heads, "memory_topk": mem.topk, "memory_d_key": mem.d_key,
            "memory_n_sub_keys": mem.n_sub_keys, "memory_value_dim": mem.value_dim,
            "memory_query_norm": mem.query_norm, "memory_key_norm": mem.key_norm,
            "memory_rows_per_block": rows_per_block, "memory_bank": bank,
        })
    return config


def _model_section(hf: dict[str, Any], where: Path) -> dict[str, Any]:
    """memtron ``model.*`` keys of a Llama-shaped ``config.json``, or an error naming the field
    memtron cannot express."""
    def require(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise HFError(f"{where}: {key}: {why}; memtron cannot express this model")

    require(hf.get("hidden_act", "silu") == "silu", "hidden_act", f"{hf.get('hidden_act')!r} "
            "is not silu (SwiGLU)")
    for key in ("attention_bias", "mlp_bias"):
        require(not hf.get(key), key, "biases are not supported")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    require(rope_type == "default", "rope_parameters", f"RoPE type {rope_type!r} is not default")
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = hf.get("head_dim") or hidden // heads
    require(head_dim * heads == hidden, "head_dim", f"{head_dim} x {heads} heads != hidden_size "
            f"{hidden}")
    return {"vocab_size": hf["vocab_size"], "d_model": hidden, "n_layers": hf["num_hidden_layers"],
            "n_heads": heads, "n_kv_heads": hf.get("num_key_value_heads") or heads,
            "d_ff": hf["intermediate_size"], "max_seq_len": hf["max_position_embeddings"],
            "rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            "norm_eps": hf.get("rms_norm_eps", 1e-6),
            "tie_embeddings": hf.get("tie_word_embeddings", False),
            "init_std": hf.get("initializer_range", 0.02)}


def _memory_section(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("model_type") != "memtron":
        return {"layers": []}
    return {"layers": hf["memory_layers"], "placement": hf["memory_placement"],
            "memory_plus": hf["memory_plus"], "n_heads": hf["memory_heads"],
            "topk": hf["memory_topk"], "d_key": hf["memory_d_key"],
            "n_sub_keys": hf["memory_n_sub_keys"], "value_dim": hf["memory_value_dim"],
            "query_norm": hf["memory_query_norm"], "key_norm": hf["memory_key_norm"],
            "shared_tables": [g for g in hf["memory_tables"] if len(g) > 1]}


# --------------------------------------------------------------------------- export


class _RowStream:
    """Consecutive rows of one checkpoint tensor, read ``max_rows`` at a time into one buffer,
    converted, and handed out in runs of any length (a value table feeds all its row blocks in
    order). Each run is written out before the next is taken, so the buffer is refilled in
    place: fresh blocks would leave freed ones for the allocator to hold on to."""

    def __init__(self, reader: CheckpointReader, key: str, max_rows: int,
                 convert: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._reads = self._read(reader, key, max_rows, convert)
        self._left: torch.Tensor | None = None

    @staticmethod
    def _read(reader: CheckpointReader, key: str, max_rows: int,
              convert: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[torch.Tensor]:
        shape = reader.shape(key)
        buffer = torch.empty(min(max_rows, shape[0]), *shape[1:], dtype=reader.dtype(key))
        for start in range(0, shape[0], max_rows):
            stop = min(shape[0], start + max_rows)
            yield convert(reader.read_rows(key, start, stop, out=buffer[: stop - start]))

    def take(self, n: int) -> Iterator[torch.Tensor]:
        while n:
            if self._left is None or not self._left.shape[0]:
                self._left = next(self._reads)
            piece, self._left = self._left[:n], self._left[n:]
            n -= piece.shape[0]
            yield piece


@dataclass
class _Tensor:
    """One tensor of the output: its name and shape, and its rows as they are read."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    pieces: Callable[[], Iterator[torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _converter(dtype: torch.dtype,
               perm: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    def convert(rows: torch.Tensor) -> torch.Tensor:
        if perm is not None:
            rows = _permute_heads(rows, perm)
        return rows.to(dtype) if rows.is_floating_point() else rows

    return convert


def _stream_rows(reader: CheckpointReader, key: str, dtype: torch.dtype,
                 perm: torch.Tensor | None = None) -> _RowStream:
    shape = reader.shape(key)
    row_bytes = max(1, shape[1:].numel() * reader.dtype(key).itemsize)
    unit = 1 if perm is None else perm.numel()  # q/k: whole heads per read
    max_rows = max(unit, READ_BYTES // row_bytes // unit * unit)
    return _RowStream(reader, key, max_rows, _converter(dtype, perm))


def _dense_tensors(reader: CheckpointReader, cfg: Config, dtype: torch.dtype) -> list[_Tensor]:
    names = _dense_names(cfg)
    expected = {f"model.{n.key}" for n in names}
    found = {k for k in reader.keys("model.") if not k.startswith("model.value_tables.")}
    if found != expected:
        raise HFError(f"{reader.path}: model tensors do not match the config "
                      f"(unexpected {sorted(found - expected)}, missing "
                      f"{sorted(expected - found)})")
    perm = _rope_permutation(cfg.model.d_model // cfg.model.n_heads)
    tensors = []
    for name in names:
        key = f"model.{name.key}"
        shape = tuple(reader.shape(key))
        out_dtype = dtype if reader.dtype(key).is_floating_point else reader.dtype(key)
        stream = _stream_rows(reader, key, out_dtype, perm if name.rotary else None)
        tensors.append(_Tensor(name.hf, shape, out_dtype,
                               lambda s=stream, n=shape[0]: s.take(n)))
    return tensors


def _table_rows_per_block(cfg: Config, dtype: torch.dtype, max_shard: int) -> int:
    dim = cfg.memory.value_dim or cfg.model.d_model
    return max(1, min(TABLE_BLOCK_BYTES, max_shard) // (dim * dtype.itemsize))


def _table_tensors(reader: CheckpointReader, n_tables: int, dtype: torch.dtype,
                   rows_per_block: int) -> list[_Tensor]:
    """Each value table as row blocks, all fed by one stream over the table."""
    tensors = []
    for g in range(n_tables):
        key = f"model.value_tables.{_table_name(g)}.weight"
        n_rows, dim = reader.shape(key)
        stream = _stream_rows(reader, key, dtype)
        for j, start in enumerate(range(0, n_rows, rows_per_block)):
            rows = min(rows_per_block, n_rows - start)
            tensors.append(_Tensor(_block_name(g, j), (rows, dim), dtype,
                                   lambda s=stream, n=rows: s.take(n)))
    return tensors


def _write_safetensors(path: Path, tensors: list[_Tensor]) -> None:
    """A safetensors file written tensor by tensor, row block by row block, as its pieces are
    read."""
    with RowBlockWriter(path, [(t.name, t.shape, t.dtype) for t in tensors],
                        {"format": "pt"}) as writer:
        for t in tensors:
            for piece in t.pieces():
                writer.write(piece)
        writer.finish()


def _shards(tensors: list[_Tensor], max_bytes: int) -> list[list[_Tensor]]:
    """Consecutive tensors packed into shards of at most ``max_bytes`` (a bigger tensor gets a
    shard of its own)."""
    shards: list[list[_Tensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _prepare_out(out: Path, overwrite: bool) -> Path:
    """A fresh temporary sibling of ``out`` to write into; ``out`` must be absent or empty
    unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise HFError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise HFError(f"{out}: not empty (pass --overwrite to replace it)")
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _commit(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def export_hf(ckpt: str | Path, out: str | Path, dtype: str = "fp32",
              max_shard_size: int | str = "2GB", values: str = "weights",
              overwrite: bool = False) -> dict[str, Any]:
    """Write checkpoint ``ckpt`` (a checkpoint or run directory, any layout) as a Hugging Face
    model directory ``out`` (see the module docstring).

    ``dtype``: ``fp32`` or ``bf16`` for floating tensors. ``values``: ``weights`` (value tables
    as row-block tensors in the shards) or ``bank`` (a memtron bank in ``out/values``, which
    the model memory-maps). Everything is written under a temporary sibling and renamed when
    complete. Returns a summary: model type, files, bytes written and seconds taken.
    """
    if dtype not in DTYPES:
        raise HFError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    if values not in ("weights", "bank"):
        raise HFError(f"values {values!r}: expected weights or bank")
    max_shard = parse_size(max_shard_size)
    out = Path(out)
    start = time.perf_counter()
    torch_dtype = DTYPES[dtype]
    with CheckpointReader(ckpt) as reader:
        cfg = reader.config
        tmp = _prepare_out(out, overwrite)
        try:
            n_tables = len(table_groups(cfg.memory)) if cfg.memory.layers else 0
            rows_per_block = _table_rows_per_block(cfg, torch_dtype, max_shard)
            tensors = _dense_tensors(reader, cfg, torch_dtype)
            bank = None
            if n_tables and values == "bank":
                bank = BANK_DIR
                write_bank(tmp / BANK_DIR, _bank_tables(reader, n_tables, torch_dtype),
                           source={"checkpoint": str(reader.path.resolve()), "step": reader.step},
                           block_bytes=rows_per_block * _row_bytes(cfg, torch_dtype))
            elif n_tables:
                tensors += _table_tensors(reader, n_tables, torch_dtype, rows_per_block)
            shards = _shards(tensors, max_shard)
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                _write_safetensors(tmp / name, shard)
                weight_map.update({t.name: name for t in shard})
            total = sum(t.nbytes for t in tensors)
            _write_json(tmp / INDEX, {"metadata": {"total_size": total, "format": HF_FORMAT},
                                      "weight_map": weight_map})
            eos_id = write_hf_tokenizer(cfg.data.tokenizer, tmp, cfg.model.max_seq_len)
            _write_json(tmp / "config.json",
                        _hf_config(cfg, eos_id, torch_dtype, rows_per_block, bank))
            _write_json(tmp / "generation_config.json", {
                "bos_token_id": None, "eos_token_id": eos_id, "pad_token_id": eos_id,
                "do_sample": False})
            if n_tables:
                for file, source in REMOTE_FILES.items():
                    shutil.copyfile(source, tmp / file)
            _write_json(tmp / PROVENANCE, {
                "format": HF_FORMAT, "version": 1, "checkpoint": str(reader.path.resolve()),
                "step": reader.step, "config": reader.manifest["config"],
                "data_state": reader.manifest.get("data_state")})
            written = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
            _commit(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return {"out": str(out), "model_type": "memtron" if n_tables else "llama",
            "files": len(shards), "bytes": written, "seconds": time.perf_counter() - start}


def _row_bytes(cfg: Config, dtype: torch.dtype) -> int:
    return (cfg.memory.value_dim or cfg.model.d_model) * dtype.itemsize


def _bank_tables(reader: CheckpointReader, n_tables: int,
                 dtype: torch.dtype) -> dict[str, TableRows]:
    tables = {}
    for g in range(n_tables):
        key = f"model.value_tables.{_table_name(g)}.weight"
        n_rows, dim = reader.shape(key)
        tables[_table_name(g)] = TableRows(n_rows, dim, dtype,
                                           _stream_rows(reader, key, dtype).take(n_rows))
    return tables


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=1) + "\n")


# --------------------------------------------------------------------------- import


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise HFError(f"{path}: missing") from e
    except (OSError, ValueError) as e:
        raise HFError(f"{path}: unreadable ({e})") from e
    if not isinstance(value, dict):
        raise HFError(f"{path}: not a JSON object")
    return value


def _flat_overrides(raw: dict[str, Any]) -> list[str]:
    """A config dict as dotted overrides (values as JSON, which YAML reads back)."""
    return [f"{section}.{key}={json.dumps(value)}" for section, values in raw.items()
            for key, value in values.items()]


def _import_config(hf: dict[str, Any], provenance: dict[str, Any] | None, hf_dir: Path,
                   overrides: Sequence[str]) -> Config:
    """The exported memtron config (or the defaults), with the architecture read from
    ``config.json``, then ``overrides``, which must leave the architecture as it is."""
    where = hf_dir / "config.json"
    arch = {"model": _model_section(hf, where), "memory": _memory_section(hf)}
    raw = provenance["config"] if provenance else Config().to_dict()
    for section, values in arch.items():
        raw[section].update(values)
    if provenance is None:
        raw["data"]["seq_len"] = min(raw["data"]["seq_len"], arch["model"]["max_seq_len"])
        if (hf_dir / "tokenizer.json").is_file():
            raw["data"]["tokenizer"] = str((hf_dir / "tokenizer.json").resolve())
    try:
        cfg = load_config(None, _flat_overrides(raw) + list(overrides))
    except ConfigError as e:
        raise HFError(f"{where}: {e}") from e
    for section, values in arch.items():
        for key, value in values.items():
            if getattr(getattr(cfg, section), key) != value:
                raise HFError(f"override {section}.{key}={getattr(getattr(cfg, section), key)!r}"
                              f": the model has {value!r} (from {where})")
    if hf.get("model_type") == "memtron" and table_groups(cfg.memory) != hf["memory_tables"]:
        raise HFError(f"{where}: memory_tables {hf['memory_tables']} are not in memtron's "
                      f"table order {table_groups(cfg.memory)}")
    return cfg


class _HFWeights:
    """Tensors of a Hugging Face directory (sharded with an index, or one model.safetensors)."""

    def __init__(self, hf_dir: Path) -> None:
        from safetensors import safe_open

        index = hf_dir / INDEX
        if index.is_file():
            weight_map = _read_json(index).get("weight_map", {})
        elif (hf_dir / "model.safetensors").is_file():
            with safe_open(str(hf_dir / "model.safetensors"), framework="pt") as f:
                weight_map = dict.fromkeys(f.keys(), "model.safetensors")
        else:
            raise HFError(f"{hf_dir}: no {INDEX} or model.safetensors (only safetensors "
                          f"weights are read)")
        self.dir, self.weight_map, self.used = hf_dir, weight_map, set()
        self._safe_open = safe_open

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise HFError(f"{self.dir}: tensor {name} is missing")
        file = self.dir / self.weight_map[name]
        try:
            with self._safe_open(str(file), framework="pt") as f:
                tensor = f.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types and OSError
            raise HFError(f"{file}: cannot read {name} ({e})") from e
        self.used.add(name)
        return tensor.float()

    def check_all_used(self, tied: bool) -> None:
        ignorable = re.compile(r".*rotary_emb\.inv_freq$" + (r"|lm_head\.weight$" if tied else ""))
        left = [n for n in self.weight_map if n not in self.used and not ignorable.match(n)]
        if left:
            raise HFError(f"{self.dir}: tensors memtron's model does not have: {left[:5]}"
                          + (f" and {len(left) - 5} more" if len(left) > 5 else ""))


def _table_rows(weights: _HFWeights, hf: dict[str, Any], hf_dir: Path, g: int,
                shape: torch.Size) -> torch.Tensor:
    """Table ``g`` from its row blocks in the shards, or from the bank ``memory_bank``."""
    table = torch.empty(shape)
    if hf.get("memory_bank") is None:
        row = j = 0
        while row < shape[0]:
            block = weights.get(_block_name(g, j))
            table[row:row + block.shape[0]] = block
            row, j = row + block.shape[0], j + 1
        return table
    bank_dir = Path(hf["memory_bank"])
    store = open_bank(bank_dir if bank_dir.is_absolute() else hf_dir / bank_dir).table(
        _table_name(g))
    step = max(1, READ_BYTES // (shape[1] * store.dtype.itemsize))
    for start in range(0, shape[0], step):
        ids = torch.arange(start, min(shape[0], start + step))
        table[start:start + ids.numel()] = store.fetch(ids).float()
    return table


def _fresh_data_state(cfg: Config) -> dict[str, Any]:
    """The loader's position at the start of ``data.train`` (a fresh run's first batch)."""
    try:
        loader = ShardLoader(cfg.data.train, cfg.data.micro_batch_size, cfg.data.seq_len,
                             dp_size=cfg.parallel.dp or 1, seed=cfg.train.seed)
    except Exception as e:  # the loader reports missing or bad shards several ways
        raise HFError(f"data.train: {e}; the checkpoint records the data position, so the "
                      f"training data must be given (data.train=..., parallel.dp=N)") from e
    return loader.state_dict()


def import_hf(hf_dir: str | Path, ckpt_dir: str | Path, overrides: Sequence[str] = (),
              optimizer_from: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write the Hugging Face model at ``hf_dir`` (a memtron export or a plain Llama of a shape
    memtron can express) as a memtron checkpoint directory ``ckpt_dir``, which
    ``memtron train --resume ckpt_dir`` continues (one process; any layout).

    The config is the exported one (``memtron.json``) or memtron's defaults, with the
    architecture from ``config.json`` and then ``overrides`` (dotted ``key=value``; they may not
    change the architecture). A Hugging Face directory holds no optimizer state: the moments
    start at zero, unless ``optimizer_from`` names a memtron checkpoint of the same
    architecture (e.g. the exported one) whose moments, step and data position are taken.
    Otherwise the step and data position are the exported ones, or a fresh start of
    ``data.train``. The model is held in memory (tables included) while it is written.
    """
    hf_dir, ckpt_dir = Path(hf_dir), Path(ckpt_dir)
    tmp_root = _prepare_out(ckpt_dir, overwrite)
    try:
        step, state, meta = _imported_state(hf_dir, overrides, optimizer_from)
        saved = save_checkpoint(tmp_root, step, state, meta, keep_last=1)
        _commit(saved, ckpt_dir)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return ckpt_dir


def _imported_state(hf_dir: Path, overrides: Sequence[str], optimizer_from: str | Path | None
                    ) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """(step, checkpoint tensors, manifest entries) of the model at ``hf_dir``."""
    hf = _read_json(hf_dir / "config.json")
    if hf.get("model_type") not in ("llama", "memtron"):
        raise HFError(f"{hf_dir / 'config.json'}: model_type {hf.get('model_type')!r} is not "
                      f"llama or memtron")
    provenance = _read_json(hf_dir / PROVENANCE) if (hf_dir / PROVENANCE).is_file() else None
    cfg = _import_config(hf, provenance, hf_dir, overrides)

    weights = _HFWeights(hf_dir)
    perm = torch.argsort(_rope_permutation(cfg.model.d_model // cfg.model.n_heads))
    state = {n.key: _permute_heads(weights.get(n.hf), perm) if n.rotary else weights.get(n.hf)
             for n in _dense_names(cfg)}
    model = build_model(cfg, functools.partial(LocalValueTable, device="meta"))  # assigned
    for g in range(len(model.value_tables)):
        shape = model.value_tables[_table_name(g)].weight.shape
        state[f"value_tables.{_table_name(g)}.weight"] = _table_rows(weights, hf, hf_dir, g,
                                                                     shape)
    weights.check_all_used(cfg.model.tie_embeddings)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise HFError(f"{hf_dir}: weights do not fit the model of config.json: {e}") from e

    # The trainer's optimizer state, as it checkpoints it: AdamW moments per dense parameter,
    # sparse row-wise Adam moments per value table.
    tables = dict(model.value_tables.items())
    dense_opt, sparse_opt = build_optimizers(model, tables, cfg.optim)
    names = {id(p): n for n, p in model.named_parameters()}
    optim = {names[id(p)]: {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                            "exp_avg_sq": torch.zeros_like(p)}
             for group in dense_opt.param_groups for p in group["params"]}
    memory_optim = sparse_opt.state_dict()
    if optimizer_from is not None:
        step, data_state = _copy_optimizer(optimizer_from, cfg, optim, memory_optim)
    elif provenance is not None:
        step, data_state = provenance["step"], provenance["data_state"]
    else:
        step, data_state = 0, _fresh_data_state(cfg)
    meta = {"config": cfg.to_dict(), "data_state": data_state,
            "layout": {"world_size": 1, "tp": 1, "cp": 1, "dp": 1, "ep": 1},
            "imported_from": str(hf_dir.resolve())}
    return step, {"model": model.state_dict(), "optim": optim,
                  "memory_optim": memory_optim}, meta


def _copy_optimizer(path: str | Path, cfg: Config, optim: dict[str, dict[str, torch.Tensor]],
                    memory_optim: dict[str, dict[str, torch.Tensor]]) -> tuple[int, Any]:
    """Fill the optimizer state from checkpoint ``path`` in place; its (step, data state)."""
    with CheckpointReader(path) as source:
        diff = architecture_diff(source.config, cfg)
        if diff is not None:
            key, old, new = diff
            raise HFError(f"{source.path}: saved with {key}={old!r}, the imported model has "
                          f"{new!r}")
        for prefix, states in (("optim", optim), ("memory_optim", memory_optim)):
            for name, state in states.items():
                for key in state:
                    try:
                        state[key] = source.read(f"{prefix}.{name}.{key}")
                    except KeyError as e:
                        raise HFError(f"{source.path}: no optimizer state {prefix}.{name}.{key} "
                                      f"(a native-engine checkpoint is needed)") from e
                if "row_decay_clock" in state:  # the exported rows were decayed as of the step
                    state["row_decay_clock"] = state["row_decay_clock"].fill_(
                        float(state["decay_clock"]))
        return source.step, source.manifest["data_state"]
