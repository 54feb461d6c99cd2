"""KV-cache generation equals recomputing the whole sequence, and the training-time forward."""

import pytest
import torch

from memtron.config import load_config
from memtron.infer.generate import GenerationError, SamplingConfig, generate, next_token
from memtron.model.forward import ForwardContext
from memtron.model.transformer import build_model

EOS = 256


def _model(placement: str, seed: int = 0):
    """Two memory layers sharing one table, beside or instead of the FFN; values scaled up so
    the memory output moves the logits."""
    torch.manual_seed(seed)
    cfg = load_config(None, [
        "model.n_layers=3", "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2",
        "model.d_ff=64", "model.max_seq_len=48", "data.seq_len=48",
        "memory.layers=[0,2]", "memory.shared_tables=[[0,2]]", f"memory.placement={placement}",
        "memory.n_sub_keys=16", "memory.topk=4", "memory.n_heads=2", "memory.d_key=16"])
    model = build_model(cfg).eval()
    with torch.no_grad():
        for table in model.value_tables.values():
            table.weight.mul_(20)
        for layer in model.memory_layers():
            layer.out.weight.mul_(20)
    return model


def _greedy_by_recompute(model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """The reference: a full forward over the whole sequence for every new token."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        logits = model(torch.tensor([seq[:-1]]))[0]
    return seq[len(prompt):], logits


@pytest.mark.parametrize("placement", ["replace", "beside"])
def test_cached_logits_equal_training_forward(placement):
    model = _model(placement)
    tokens = torch.randint(0, 256, (3, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(3, 48)
        steps = [model(tokens[:, :11], ForwardContext(cache=cache))]
        for t in range(11, 30):
            steps.append(model(tokens[:, t:t + 1], ForwardContext(cache=cache)))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    # the memory layers matter to these logits, so the equality covers them
    without = _model(placement)
    for layer in without.memory_layers():
        torch.nn.init.zeros_(layer.out.weight)
    with torch.no_grad():
        assert (without(tokens) - full).abs().max() > 1e-2


@pytest.mark.parametrize("placement", ["replace", "beside"])
def test_greedy_with_cache_equals_recompute(placement):
    model = _model(placement)
    prompt = [EOS, *b"Ada was born in"]
    reference, reference_logits = _greedy_by_recompute(model, prompt, 12)
    steps = []
    result = generate(model, [prompt], SamplingConfig(max_new_tokens=12, greedy=True,
                                                      stop_at_eos=False), EOS,
                      on_tokens=lambda t: steps.append(int(t[0])))
    assert result.tokens[0] == reference == steps
    assert result.new_tokens == 12 and result.prompt_tokens == len(prompt)
    # the cached forward's logits at each generated position equal the full forward's
    cache = model.new_cache(1, 48)
    seq = torch.tensor([prompt + reference[:-1]])
    with torch.no_grad():
        parts = [model(seq[:, :len(prompt)], ForwardContext(cache=cache))]
        for t in range(len(prompt), seq.shape[1]):
            parts.append(model(seq[:, t:t + 1], ForwardContext(cache=cache)))
    torch.testing.assert_close(torch.cat(parts, 1)[0], reference_logits, atol=1e-5, rtol=0)


def test_batched_prompts_of_different_lengths_equal_each_alone():
    model = _model("beside")
    prompts = [[EOS, *b"Bo"], [EOS, *b"The birthplace of Ada is"], [EOS, *b"Cy works as a"]]
    cfg = SamplingConfig(max_new_tokens=10, greedy=True, stop_at_eos=False)
    batched = generate(model, prompts, cfg, EOS)
    for prompt, tokens in zip(prompts, batched.tokens):
        assert generate(model, [prompt], cfg, EOS).tokens[0] == tokens
        assert tokens == _greedy_by_recompute(model, prompt, 10)[0]


def test_sampling_is_seeded_and_filters():
    model = _model("replace")
    prompt = [[EOS, *b"Ada"]]
    sample = SamplingConfig(max_new_tokens=8, temperature=1.3, top_p=0.9, seed=7,
                            stop_at_eos=False)
    first = generate(model, prompt, sample, EOS).tokens
    assert generate(model, prompt, sample, EOS).tokens == first
    top1 = SamplingConfig(max_new_tokens=8, top_k=1, seed=3, stop_at_eos=False)
    greedy = SamplingConfig(max_new_tokens=8, greedy=True, stop_at_eos=False)
    assert generate(model, prompt, top1, EOS).tokens == generate(model, prompt, greedy, EOS).tokens
    # top-p keeps the smallest set reaching p: here only the best token
    logits = torch.tensor([[5.0, 1.0, 0.0, -1.0]])
    picks = {int(next_token(logits, SamplingConfig(top_p=0.5), None)) for _ in range(20)}
    assert picks == {0}


def test_stops_at_eos_and_context():
    model = _model("replace")
    free = generate(model, [[EOS, 65, 66], [EOS, 67]],
                    SamplingConfig(max_new_tokens=6, greedy=True, stop_at_eos=False), EOS).tokens
    stop = free[0][2]  # call the third token of the first row "eos": that row ends before it
    ended = generate(model, [[EOS, 65, 66], [EOS, 67]],
                     SamplingConfig(max_new_tokens=6, greedy=True), stop).tokens
    assert ended[0] == free[0][:2]
    second = free[1][:free[1].index(stop)] if stop in free[1] else free[1]
    assert ended[1] == second  # the other row goes on, unaffected
    plain = _model("beside")
    long_prompt = [EOS] + [65] * 44
    cut = generate(plain, [long_prompt], SamplingConfig(max_new_tokens=10, greedy=True,
                                                        stop_at_eos=False), EOS)
    assert len(cut.tokens[0]) == 48 - 45 and cut.truncated == [True]


def test_bad_requests_fail_clearly():
    model = _model("replace")
    with pytest.raises(GenerationError, match="prompt 1 has 48 tokens; the model's context is 48"):
        generate(model, [[EOS], [65] * 48], SamplingConfig(), EOS)
    with pytest.raises(GenerationError, match="temperature"):
        generate(model, [[EOS]], SamplingConfig(temperature=0), EOS)
    with pytest.raises(GenerationError, match="at least one token"):
        generate(model, [[]], SamplingConfig(), EOS)


def test_a_forward_past_max_seq_len_names_the_limit():
    model = _model("beside")
    with torch.no_grad():
        model(torch.zeros(1, 48, dtype=torch.long))  # exactly the limit is fine
        with pytest.raises(ValueError, match=r"49 token positions .*model.max_seq_len=48"):
            model(torch.zeros(1, 49, dtype=torch.long))
        cache = model.new_cache(1, 64)
        model(torch.zeros(1, 40, dtype=torch.long), ForwardContext(cache=cache))
        with pytest.raises(ValueError,
                           match=r"50 token positions requested \(40 cached \+ 10 new\)"):
            model(torch.zeros(1, 10, dtype=torch.long), ForwardContext(cache=cache))
