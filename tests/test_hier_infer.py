"""A hierarchical bank end to end: cluster -> prepare (bank_path per sample) -> train ->
export bank -> generate. Generation with the blocks fetched from the on-disk bank and from
``serve-memory`` equals the training-time forward on the same context (RAM tables, the path
the tree gives the prompt)."""

import json

import pytest
import torch

from memtron.cli import main
from memtron.config import ConfigError
from memtron.data.clustering import build_tree
from memtron.data.embed import HashedNgramEmbedder
from memtron.data.loader import DataError
from memtron.data.prepare import prepare
from memtron.data.synthetic import generate_corpus, load_questions
from memtron.data.tokenizer import ByteTokenizer
from memtron.eval.facts import eval_facts
from memtron.export.bank import export_bank
from memtron.infer.generate import SamplingConfig, generate
from memtron.infer.model import load_model
from memtron.infer.server import running_server
from memtron.model.forward import ForwardContext
from memtron.storage.bank import open_bank
from memtron.storage.rowblock import BankError
from memtron.train.trainer import Trainer
from tests.conftest import TINY_SEQ_LEN, tiny_overrides

BANK = {"bank.layers": "[0,1]", "bank.levels": 2, "bank.branching": 2,
        "bank.block_sizes": "[4,8]", "bank.generic_size": 2}
PROMPT = "The capital of"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("hier")
    generate_corpus(root, n_entities=40, n_train_docs=200, n_valid_docs=20, seed=2,
                    questions_per_bucket=2)
    docs = [json.loads(line)["text"]
            for line in (root / "raw" / "train.jsonl").read_text().splitlines()]
    build_tree(docs, 2, 2, HashedNgramEmbedder(dim=32), seed=0).save(root / "tree")
    for split in ("train", "valid"):
        prepare([root / "raw" / f"{split}.jsonl"], root / split, seq_len=TINY_SEQ_LEN,
                clusters=root / "tree")
    from memtron.config import load_config

    cfg = load_config(None, tiny_overrides(root, root / "run", **BANK, **{"train.steps": 3}))
    result = Trainer(cfg).run()
    assert result.checkpoint is not None
    return root, result


def _training_forward(ckpt, tokens: list[int], path: torch.Tensor) -> torch.Tensor:
    loaded = load_model(ckpt)  # every table in RAM, as in training
    with torch.no_grad():
        return loaded.model(torch.tensor([tokens]), ForwardContext(bank_path=path))[0]


def _generated_logits(loaded, prompt: list[int], path: torch.Tensor, steps: int):
    """Greedy tokens from ``generate`` and the cached forward's logits for prompt + tokens."""
    result = generate(loaded.model, [prompt], SamplingConfig(max_new_tokens=steps, greedy=True,
                                                             stop_at_eos=False),
                      eos_id=0, bank_path=path)
    tokens = prompt + result.tokens[0]
    cache = loaded.model.new_cache(1, len(tokens))
    with torch.no_grad():
        logits = [loaded.model(torch.tensor([prompt]),
                               ForwardContext(cache=cache, bank_path=path))[0]]
        for t in result.tokens[0][:-1]:
            logits.append(loaded.model(torch.tensor([[t]]),
                                       ForwardContext(cache=cache, bank_path=path))[0])
    return tokens, torch.cat(logits)


def test_generation_with_fetched_blocks_equals_training_forward(trained, tmp_path):
    root, result = trained
    bank_dir = tmp_path / "bank"
    manifest = export_bank(result.checkpoint, bank_dir)
    info = manifest["source"]["bank"]
    assert info["tables"] == ["bank0", "bank1"] and info["offsets"] == [0, 2]
    assert info["tree"] == str((root / "train" / "tree").resolve())
    assert manifest["tables"]["bank1"]["n_rows"] == 4  # one row per level-2 node

    tok = ByteTokenizer()
    prompt = [tok.eos_id, *tok.encode(PROMPT)]
    disk = load_model(result.checkpoint, bank=str(bank_dir), cache_rows=8)
    path = disk.bank_paths([PROMPT])
    assert path.shape == (1, 2) and 0 <= int(path[0, 0]) < 2 <= int(path[0, 1]) < 6
    tokens, logits = _generated_logits(disk, prompt, path, steps=6)
    want = _training_forward(result.checkpoint, tokens[:-1], path)
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
    stats = disk.fetch_stats()
    assert stats["rows_fetched"] == 2 and stats["cache_hit_rate"] > 0.9  # one fetch per level
    # The blocks matter: another leaf's blocks give other logits.
    other = path.clone()
    other[0, 1] = 2 + (int(path[0, 1]) - 2 + 1) % 4
    assert not torch.allclose(_training_forward(result.checkpoint, tokens[:-1], other), want)

    with running_server(bank_dir) as url:
        remote = load_model(result.checkpoint, bank=url, cache_rows=8,
                            tree=root / "train" / "tree")
        remote_tokens, remote_logits = _generated_logits(remote, prompt, path, steps=6)
    assert remote_tokens == tokens
    torch.testing.assert_close(remote_logits, logits, rtol=0, atol=0)


def test_cli_generate_with_bank_and_tree_checks(trained, tmp_path, capsys):
    root, result = trained
    bank_dir = tmp_path / "bank"
    assert main(["export", "bank", "--ckpt", str(result.checkpoint), "--out",
                 str(bank_dir)]) == 0
    assert main(["generate", "--ckpt", str(result.checkpoint), "--rows", str(bank_dir),
                 "--prompt", PROMPT, "--max-new-tokens", "4", "--greedy"]) == 0
    err = capsys.readouterr().err
    # --rows serves every memory kind: the tree blocks of the path and the value-table rows
    assert "bank path(s): [[" in err and f"memory fetch (rows {bank_dir})" in err
    # A tree other than the one the bank was exported with is refused by its hash.
    other = tmp_path / "other-tree"
    build_tree(["a b c", "d e f", "g h i", "j k l"] * 4, 2, 2,
               HashedNgramEmbedder(dim=8)).save(other)
    with pytest.raises(BankError, match="not the tree the bank"):
        load_model(result.checkpoint, bank=str(bank_dir), tree=other)
    assert open_bank(bank_dir).manifest["source"]["bank"]["tree_sha256"]


def test_bank_needs_clustered_data(trained, tiny_corpus, tmp_path):
    from memtron.config import load_config

    cfg = load_config(None, tiny_overrides(tiny_corpus, tmp_path / "run", **BANK))
    with pytest.raises(ConfigError, match="no bank_path field"):
        Trainer(cfg)
    root, _ = trained
    cfg = load_config(None, tiny_overrides(root, tmp_path / "run2", **{
        **BANK, "bank.branching": 3}))
    with pytest.raises(ConfigError, match="bank.levels"):
        Trainer(cfg)


def test_frozen_anchor_trains_only_the_bank(trained, tmp_path):
    """With bank.freeze_anchor the trainer moves the fetched blocks and nothing else."""
    from memtron.config import load_config

    root, _ = trained
    cfg = load_config(None, tiny_overrides(root, tmp_path / "frozen", **{
        **BANK, "bank.generic_size": 0, "bank.freeze_anchor": "true", "memory.layers": "[]",
        "train.steps": 2}))
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.run()
    after = trainer.model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == {"value_tables.bank0.weight", "value_tables.bank1.weight"}


def _manual_choice_logp(model, question: dict, path: torch.Tensor | None) -> list[float]:
    """Each choice's summed log-probability, one unbatched forward per choice, the prompt cut
    from the left to the model's context as the eval does."""
    tok = ByteTokenizer()
    context = [tok.eos_id, *tok.encode(question["prompt"])]
    out = []
    for choice in question["choices"]:
        continuation = tok.encode(choice)
        tokens = (context + continuation)[-(TINY_SEQ_LEN + 1):]
        with torch.no_grad():
            logits = model(torch.tensor([tokens[:-1]]), ForwardContext(
                bank_path=None if path is None else path[None]))[0].float()
        logp = logits.log_softmax(-1)
        first = len(tokens) - 1 - len(continuation)
        out.append(sum(float(logp[p, tokens[p + 1]]) for p in range(first, len(tokens) - 1)))
    return out


def test_eval_facts_routes_each_question_through_the_tree(trained, tmp_path):
    """``eval facts`` scores a bank model's questions with their prompts' tree paths (batched,
    mixed paths per batch), not with the generic block alone; the trainer's in-training fact
    eval uses the same paths."""
    root, result = trained
    report = eval_facts(result.checkpoint, batch_size=5, valid_batches=1)
    assert report["routed"]
    loaded = load_model(result.checkpoint)
    questions = load_questions(root / "questions.jsonl")
    paths = loaded.bank_paths([q["prompt"] for q in questions])
    assert len(set(map(tuple, paths.tolist()))) > 1  # the questions reach several leaves
    routed = [_manual_choice_logp(loaded.model, q, p) for q, p in zip(questions, paths)]
    generic = [_manual_choice_logp(loaded.model, q, None) for q in questions]
    assert len(report["choice_logp"]) == len(questions)
    for got, want in zip(report["choice_logp"], routed):
        assert got == pytest.approx(want, abs=1e-4)
    # The routed blocks change the scores, so a generic-only eval would not pass the above.
    assert max(abs(a - b) for r, g in zip(routed, generic) for a, b in zip(r, g)) > 1e-3
    correct = [int(torch.tensor(r).argmax()) == q["choices"].index(q["answer"])
               for q, r in zip(questions, routed)]
    assert report["buckets"]["all"]["correct"] == sum(correct)

    from memtron.config import load_config

    cfg = load_config(None, tiny_overrides(root, tmp_path / "eval-run", **BANK))
    trainer = Trainer(cfg)
    assert torch.equal(trainer.question_paths, paths)
    trainer.load(result.checkpoint, verify=False)
    assert trainer.evaluate()["fact_acc/all"] == pytest.approx(sum(correct) / len(questions))


def test_eval_facts_needs_the_bank_models_tree(trained, tmp_path, capsys):
    _, result = trained
    with pytest.raises(DataError, match="hierarchical bank.*--tree"):
        eval_facts(result.checkpoint, tree=tmp_path / "no-tree")
    assert main(["eval", "facts", "--ckpt", str(result.checkpoint), "--tree",
                 str(tmp_path / "no-tree")]) == 2
    assert "pass --tree" in capsys.readouterr().err
