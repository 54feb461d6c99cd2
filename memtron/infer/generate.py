"""KV-cache generation (``memtron generate``).

Prompts of different lengths run as one left-padded batch: each row's RoPE positions start at
0 at its first real token and padding keys are masked, so a row generates exactly what it would
alone. The prompt is read in one forward (prefill); every new token then costs one forward of
a single position over the cache. With explicit memories (``explicit``), every chunk of 64
positions attends to its retrieved memories in the memory layers (see ``infer/explicit.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from memtron.infer.explicit import ChunkMemories, ExplicitGeneration
from memtron.model.forward import ForwardContext, autocast
from memtron.model.transformer import Transformer


class GenerationError(ValueError):
    """A request generation cannot serve (e.g. a prompt longer than the model's context)."""


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = all tokens
    top_p: float = 1.0
    seed: int = 0
    stop_at_eos: bool = True

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.greedy and self.temperature <= 0:
            raise GenerationError(f"temperature must be > 0 (or use greedy), got "
                                  f"{self.temperature}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per prompt (without the prompt, eos excluded)
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    truncated: list[bool] = field(default_factory=list)  # stopped by the context length
    retrievals: int = 0  # explicit-memory retrievals (one per row and chunk)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else 0.0


def next_token(logits: torch.Tensor, cfg: SamplingConfig,
               generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]: argmax, or a sample after temperature, top-k, top-p."""
    if cfg.greedy:
        return logits.argmax(-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= cfg.top_p  # keep the first over top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], cfg: SamplingConfig, eos_id: int,
             pad_id: int | None = None, dtype: str = "fp32",
             on_tokens: Callable[[torch.Tensor], None] | None = None,
             bank_path: torch.Tensor | None = None,
             explicit: ExplicitGeneration | None = None) -> GenerationResult:
    """Continue every prompt (token ids) with up to ``cfg.max_new_tokens`` tokens.

    ``on_tokens(ids [B])`` sees each step's new tokens as they come (for streaming). Rows stop
    at ``eos_id`` (when ``cfg.stop_at_eos``) or when the context (``model.cfg.max_seq_len``)
    is full. ``bank_path`` [B, levels]: each prompt's node ids in the cluster tree (models with
    a hierarchical bank); every forward fetches those blocks (a store-backed bank serves them
    from its LRU cache after the prefill).
    ``explicit``: explicit memories, retrieved per chunk as the rows reach it.
    """
    cfg.check()
    if not prompts or any(not p for p in prompts):
        raise GenerationError("every prompt needs at least one token")
    context = model.cfg.max_seq_len
    for i, prompt in enumerate(prompts):
        if len(prompt) >= context:
            raise GenerationError(f"prompt {i} has {len(prompt)} tokens; the model's context is "
                                  f"{context} (model.max_seq_len), leaving no room to generate")
    model.eval()
    device = model.embed.weight.device
    pad_id = eos_id if pad_id is None else pad_id
    batch, longest = len(prompts), max(len(p) for p in prompts)
    total = min(context, longest + cfg.max_new_tokens)
    pads = torch.tensor([longest - len(p) for p in prompts], device=device)
    tokens = torch.full((batch, longest), pad_id, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt):] = torch.tensor(prompt, device=device)
    columns = torch.arange(total, device=device)
    key_valid = columns[None, :] >= pads[:, None]  # [B, total]: False on left padding
    positions = (columns[None, :] - pads[:, None]).clamp_min(0)
    cache = model.new_cache(batch, total)
    generator = None
    if not cfg.greedy:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)

    result = GenerationResult(tokens=[[] for _ in prompts],
                              prompt_tokens=sum(len(p) for p in prompts))
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    start = time.perf_counter()
    memories, histories = None, [list(p) for p in prompts]
    if explicit is not None:
        memories = ChunkMemories(explicit, batch, total, device)
        memories.prompt(prompts)
    with autocast(device, dtype):
        logits = model(tokens, ForwardContext(
            positions=positions[:, :longest], cache=cache, key_valid=key_valid,
            bank_path=bank_path,
            explicit=None if memories is None else memories.kv(longest - 1)))[:, -1]
    _synchronize(device)
    result.prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    length = longest
    while True:
        new = next_token(logits, cfg, generator)
        ended = (new == eos_id) if cfg.stop_at_eos else torch.zeros_like(done)
        emit = ~done & ~ended
        done |= ended
        for row, (token, keep) in enumerate(zip(new.tolist(), emit.tolist())):
            if keep:
                result.tokens[row].append(token)
        if on_tokens is not None:
            on_tokens(torch.where(emit, new, -1))
        new = new.masked_fill(done, pad_id)  # finished rows idle on padding
        length += 1
        if bool(done.all()) or length - longest >= cfg.max_new_tokens or length >= total:
            break
        ctx = ForwardContext(positions=positions[:, length - 1:length], cache=cache,
                             key_valid=key_valid, bank_path=bank_path)
        if memories is not None:
            at = positions[:, length - 1].tolist()
            memories.step(histories, at)
            ctx.explicit = memories.kv(max(at))
            for history, token in zip(histories, new.tolist()):
                history.append(token)
        with autocast(device, dtype):
            logits = model(new[:, None], ctx)[:, -1]
    _synchronize(device)
    result.decode_s = time.perf_counter() - start
    result.new_tokens = sum(len(t) for t in result.tokens)
    result.retrievals = memories.retrievals if memories is not None else 0
    result.truncated = [not finished and len(t) < cfg.max_new_tokens
                        for t, finished in zip(result.tokens, done.tolist())]
    return result


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
