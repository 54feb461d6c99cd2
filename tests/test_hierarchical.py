"""The hierarchical bank layer (DESIGN §5): a model with fetched blocks equals, sequence by
sequence, a plain model whose FFNs hold the concatenation of the anchor's neurons and the
fetched blocks, forward and backward; only fetched blocks move."""

import pytest
import torch

from memtron.config import BankConfig, ConfigError, MemoryConfig, ModelConfig, load_config
from memtron.model.forward import ForwardContext
from memtron.model.memory.hierarchical import level_offsets, table_name
from memtron.model.transformer import Transformer
from memtron.train.optim import SparseRowOptimizer

D, LAYERS, D_FF, VOCAB, SEQ = 16, 2, 24, 40, 7
BANK = dict(layers=[0, 1], levels=2, branching=3, block_sizes=[2, 5], generic_size=3)


def _bank_model(**bank) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, d_model=D, n_layers=LAYERS, n_heads=2, n_kv_heads=1,
                      d_ff=D_FF, max_seq_len=16)
    return Transformer(cfg, MemoryConfig(), bank=BankConfig(**{**BANK, **bank}))


def _paths(bank: BankConfig) -> torch.Tensor:
    """Three sequences: two share their level-0 node, none shares a leaf."""
    offsets = level_offsets(bank.nodes_per_level())
    local = torch.tensor([[1, 4], [1, 5], [2, 7]])
    return local + torch.tensor(offsets)


def _dense_twin(model: Transformer, path: torch.Tensor) -> Transformer:
    """A plain model for one sequence: every bank layer's FFN holds the anchor's neurons, then
    the path's blocks level by level, then the generic block (all copied, grads separate)."""
    bank = model.bank
    sizes = sum(bank.cfg.block_sizes) + bank.cfg.generic_size
    cfg = ModelConfig(**{**model.cfg.__dict__, "d_ff": D_FF + sizes})
    twin = Transformer(cfg, MemoryConfig())
    anchor = {k: v for k, v in model.state_dict().items() if "ffn" not in k
              and not k.startswith("value_tables") and not k.startswith("bank")}
    twin.load_state_dict(anchor, strict=False)
    offsets = level_offsets(bank.cfg.nodes_per_level())
    for layer, block in enumerate(model.blocks):
        k = bank.slot[layer]
        parts = []  # [3, n, d] per source of neurons
        for level, table in enumerate(bank.tables):
            row = table.weight.detach()[int(path[level]) - offsets[level]]
            parts.append(row.view(len(bank.slot), 3, bank.cfg.block_sizes[level], D)[k])
        parts.append(bank.generic.detach()[k])
        extra = torch.cat(parts, dim=1)
        ffn, dense = block.ffn, twin.blocks[layer].ffn
        with torch.no_grad():
            dense.w_gate.weight.copy_(torch.cat([ffn.w_gate.weight, extra[0]]))
            dense.w_up.weight.copy_(torch.cat([ffn.w_up.weight, extra[1]]))
            dense.w_down.weight.copy_(torch.cat([ffn.w_down.weight, extra[2].T], dim=1))
    return twin


def test_fetched_blocks_equal_concatenated_dense_ffn():
    model = _bank_model()
    bank = model.bank
    paths = _paths(bank.cfg)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (3, SEQ), generator=g)
    probe = torch.randn(3, SEQ, VOCAB, generator=g)
    logits = model(tokens, ForwardContext(bank_path=paths))
    (logits * probe).sum().backward()

    offsets = level_offsets(bank.cfg.nodes_per_level())
    row_grads = [torch.zeros_like(t.weight) for t in bank.tables]
    generic_grad = torch.zeros_like(bank.generic)
    anchor_grads: dict[str, torch.Tensor] = {}
    for b in range(3):
        twin = _dense_twin(model, paths[b])
        twin_logits = twin(tokens[b:b + 1])
        torch.testing.assert_close(logits[b:b + 1], twin_logits, rtol=1e-5, atol=1e-5)
        (twin_logits * probe[b:b + 1]).sum().backward()
        for name, p in twin.named_parameters():
            if "ffn" not in name:
                anchor_grads[name] = anchor_grads.get(name, 0) + p.grad
        for layer, block in enumerate(twin.blocks):
            k = bank.slot[layer]
            gate, up = block.ffn.w_gate.weight.grad, block.ffn.w_up.weight.grad
            down = block.ffn.w_down.weight.grad.T
            grads = torch.stack([gate, up, down])[:, D_FF:]  # [3, extra neurons, d]
            start = 0
            for level, size in enumerate(bank.cfg.block_sizes):
                row = int(paths[b, level]) - offsets[level]
                view = row_grads[level][row].view(len(bank.slot), 3, size, D)
                view[k] += grads[:, start:start + size]
                start += size
            generic_grad[k] += grads[:, start:]
            ffn = model.blocks[layer].ffn
            for name in ("w_gate", "w_up"):
                grad = getattr(block.ffn, name).weight.grad[:D_FF]
                anchor_grads[f"ffn.{layer}.{name}"] = anchor_grads.get(
                    f"ffn.{layer}.{name}", 0) + grad
            anchor_grads[f"ffn.{layer}.w_down"] = anchor_grads.get(
                f"ffn.{layer}.w_down", 0) + block.ffn.w_down.weight.grad[:, :D_FF]
            assert ffn is not None

    for name, p in model.named_parameters():
        if name.startswith(("value_tables", "bank")) or "ffn" in name:
            continue
        torch.testing.assert_close(p.grad, anchor_grads[name], rtol=1e-4, atol=1e-6)
    for layer, block in enumerate(model.blocks):
        for name in ("w_gate", "w_up", "w_down"):
            torch.testing.assert_close(getattr(block.ffn, name).weight.grad,
                                       anchor_grads[f"ffn.{layer}.{name}"], rtol=1e-4,
                                       atol=1e-6)
    torch.testing.assert_close(bank.generic.grad, generic_grad, rtol=1e-4, atol=1e-6)
    for level, table in enumerate(bank.tables):
        assert table.weight.grad is None  # no dense gradient, ever
        ids, rows = table.sparse_grad()
        fetched = sorted({int(p) - offsets[level] for p in paths[:, level]})
        assert ids.tolist() == fetched  # unique ids, only the fetched nodes
        torch.testing.assert_close(rows, row_grads[level][ids], rtol=1e-4, atol=1e-6)


def test_untouched_blocks_get_no_update():
    model = _bank_model()
    paths = _paths(model.bank.cfg)
    tables = {table_name(level): t for level, t in enumerate(model.bank.tables)}
    before = {name: t.weight.detach().clone() for name, t in tables.items()}
    opt = SparseRowOptimizer(tables, lr=0.1, betas=(0.9, 0.95), weight_decay=0.1)
    tokens = torch.randint(0, VOCAB, (3, SEQ))
    model(tokens, ForwardContext(bank_path=paths)).square().mean().backward()
    opt.step()
    offsets = level_offsets(model.bank.cfg.nodes_per_level())
    for level, (name, table) in enumerate(tables.items()):
        touched = {int(p) - offsets[level] for p in paths[:, level]}
        changed = (table.weight.detach() != before[name]).any(1)
        assert set(torch.nonzero(changed).view(-1).tolist()) == touched, name


def test_frozen_anchor_trains_only_the_bank():
    model = _bank_model(freeze_anchor=True)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"value_tables.bank0.weight", "value_tables.bank1.weight",
                       "bank.generic"}
    model(torch.randint(0, VOCAB, (3, SEQ)),
          ForwardContext(bank_path=_paths(model.bank.cfg))).sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trained)
    assert model.bank.generic.grad is not None
    assert all(t.sparse_grad() is not None for t in model.bank.tables)


def test_no_path_uses_the_generic_block_only():
    model = _bank_model()
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    with_generic = model(tokens)
    model.bank.generic.data.zero_()
    plain = Transformer(model.cfg, MemoryConfig())
    plain.load_state_dict({k: v for k, v in model.state_dict().items()
                           if not k.startswith(("value_tables", "bank"))})
    torch.testing.assert_close(model(tokens), plain(tokens))
    assert not torch.allclose(with_generic, plain(tokens))
    generic_only = _bank_model(levels=0, block_sizes=[])  # the generic-only baseline
    assert generic_only.bank.tables == [] and generic_only.bank.generic is not None
    torch.testing.assert_close(generic_only(tokens, ForwardContext(bank_path=_paths(
        model.bank.cfg))), generic_only(tokens))


def test_bad_paths_and_configs_are_named():
    model = _bank_model()
    with pytest.raises(ValueError, match="outside the tree"):
        model(torch.zeros(1, 3, dtype=torch.long),
              ForwardContext(bank_path=torch.tensor([[0, 2]])))  # 2 is a level-0 node
    with pytest.raises(ValueError, match=r"expected \[batch, 2\]"):
        model(torch.zeros(1, 3, dtype=torch.long), ForwardContext(bank_path=torch.tensor([1])))
    for override, key in [("bank.block_sizes=[4]", "bank.block_sizes"),
                          ("bank.layers=[9]", "bank.layers[0]"),
                          ("bank.branching=1", "bank.branching"),
                          ("bank.layers=[]", "bank.generic_size"),
                          ("bank.levels=0", "bank.block_sizes")]:
        with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
            load_config(None, ["bank.layers=[0]", "bank.levels=2", "bank.block_sizes=[2,4]",
                               "bank.generic_size=2", override])
    with pytest.raises(ConfigError, match="bank.layers"):
        load_config(None, ["bank.layers=[1]", "bank.levels=1", "bank.block_sizes=[2]",
                           "memory.layers=[1]"])


def test_bank_tables_learn_at_their_own_rate():
    """build_optimizers: bank level tables step at lr * bank.lr_mult, value tables at
    lr * memory_lr_mult, in the one sparse optimizer."""
    from memtron.config import OptimConfig
    from memtron.model.tables import LocalValueTable, TableSpec
    from memtron.train.optim import build_optimizers

    def stepped(bank_lr_mult):
        model = _bank_model()
        tables = {"table0": LocalValueTable(TableSpec("table0", 10, D, 3)),
                  "bank0": model.bank.tables[0]}
        cfg = OptimConfig(lr=0.01, memory_lr_mult=10.0, warmup_steps=0)
        _, sparse = build_optimizers(model, tables, cfg, bank_lr_mult)
        for table in tables.values():
            table.accumulate_grad(torch.tensor([1]), torch.ones(1, table.dim))
        sparse.step()
        return {name: t.weight.detach()[1].clone() for name, t in tables.items()}, model

    same, model = stepped(None)
    own, _ = stepped(1.0)
    initial = _bank_model().bank.tables[0].weight.detach()[1]
    torch.testing.assert_close(own["table0"], same["table0"])  # value tables: unchanged
    # Adam's first step moves every element by lr: 0.1 at memory_lr_mult, 0.01 at lr_mult 1.
    torch.testing.assert_close((initial - same["bank0"]).abs(), torch.full((initial.numel(),),
                                                                          0.1), rtol=1e-4,
                               atol=1e-6)
    torch.testing.assert_close((initial - own["bank0"]).abs(), torch.full((initial.numel(),),
                                                                         0.01), rtol=1e-4,
                               atol=1e-6)
