"""stablemdm.models.transformer: shapes, attention patterns, padding, init, config, round trips."""

from __future__ import annotations

import math

import pytest
import torch

from stablemdm.models import PRESETS, ModelConfig, Transformer

VOCAB = 13
MASK_ID = 12


def make_config(**overrides) -> ModelConfig:
    values = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, max_seq_len=24)
    values["mask_token_id"] = MASK_ID
    values.update(overrides)
    return ModelConfig(**values)


def make_model(seed: int = 0, **overrides) -> Transformer:
    return Transformer(make_config(**overrides), generator=torch.Generator().manual_seed(seed))


def random_ids(b: int, l: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, l), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_forward_shape_and_dtype(causal: bool, with_mask: bool) -> None:
    model = make_model(causal=causal)
    ids = random_ids(3, 10, seed=1)
    mask = torch.ones(3, 10, dtype=torch.bool) if with_mask else None
    logits = model(input_ids=ids, attention_mask=mask)
    assert logits.shape == (3, 10, VOCAB)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_causal_logits_ignore_future_tokens() -> None:
    model = make_model(causal=True)
    ids = random_ids(2, 12, seed=2)
    base = model(input_ids=ids)
    for i in range(11):
        changed = ids.clone()
        changed[:, i + 1 :] = (changed[:, i + 1 :] + 1) % VOCAB
        out = model(input_ids=changed)
        assert torch.equal(out[:, : i + 1], base[:, : i + 1]), f"position {i} saw the future"
        assert not torch.allclose(out[:, i + 1 :], base[:, i + 1 :])


def test_bidirectional_logits_see_future_tokens() -> None:
    model = make_model(causal=False)
    ids = random_ids(2, 12, seed=3)
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % VOCAB
    assert not torch.allclose(model(input_ids=changed)[:, 0], model(input_ids=ids)[:, 0])


@pytest.mark.parametrize("causal", [False, True])
def test_padding_does_not_affect_real_positions(causal: bool) -> None:
    model = make_model(causal=causal)
    ids = random_ids(3, 12, seed=4)
    lengths = torch.tensor([12, 7, 0])  # full row, right-padded row, all-padding row
    real = torch.arange(12)[None, :] < lengths[:, None]  # [B, L]
    changed = torch.where(real, ids, (ids + 5) % VOCAB)
    for mask in (real, real.long()):
        base = model(input_ids=ids, attention_mask=mask)
        out = model(input_ids=changed, attention_mask=mask)
        assert torch.isfinite(base).all() and torch.isfinite(out).all()
        assert torch.equal(out[real], base[real])
    truncated = model(input_ids=ids[1:2, :7])
    assert torch.allclose(base[1, :7], truncated[0], atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_mask_keeps_every_query_row_non_empty(causal: bool) -> None:
    # Some SDPA kernels return NaN for a query with no allowed key, so the mask itself must
    # give every query (padded ones included) at least one key.
    model = make_model(causal=causal)
    real = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    allowed = model._attention_mask(real, 5)  # [B, 1, L, L]
    assert allowed.shape == (3, 1, 5, 5)
    assert allowed.any(dim=-1).all()
    expected = real[:, None, None, :].expand(3, 1, 5, 5)
    if causal:
        expected = expected & torch.ones(5, 5, dtype=torch.bool).tril()
    query_is_real = real[:, None, :, None].expand(3, 1, 5, 5)
    assert torch.equal(allowed[query_is_real], expected[query_is_real])


def test_padding_gives_finite_gradients() -> None:
    model = make_model(causal=False)
    ids = random_ids(2, 8, seed=5)
    mask = torch.tensor([[1] * 8, [1] * 3 + [0] * 5])
    model(input_ids=ids, attention_mask=mask).logsumexp(-1).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("tie", [False, True])
def test_parameter_count_is_the_same_for_mdm_and_arm(tie: bool) -> None:
    mdm = make_model(causal=False, tie_embeddings=tie)
    arm = make_model(causal=True, tie_embeddings=tie)
    c = mdm.config
    per_layer = 4 * c.d_model**2 + 3 * c.d_model * c.d_ff + 2 * c.d_model
    expected = (1 if tie else 2) * c.vocab_size * c.d_model + c.n_layers * per_layer + c.d_model
    assert mdm.num_parameters() == arm.num_parameters() == expected


def test_initialisation_std_matches_gpt2_scheme() -> None:
    config = make_config(d_model=64, n_layers=4, n_heads=4)
    model = Transformer(config, generator=torch.Generator().manual_seed(6))
    residual = torch.cat(
        [
            torch.cat([b.attn.out.weight.flatten(), b.mlp.down.weight.flatten()])
            for b in model.blocks
        ]
    )
    other = torch.cat(
        [
            torch.cat([b.attn.qkv.weight.flatten(), b.mlp.gate.weight.flatten()])
            for b in model.blocks
        ]
    )
    for weights, std in ((residual, 0.02 / math.sqrt(2 * config.n_layers)), (other, 0.02)):
        se = std / math.sqrt(2 * weights.numel())  # standard error of a normal sample's std
        assert abs(weights.std().item() - std) < 5 * se
        assert abs(weights.mean().item()) < 5 * std / math.sqrt(weights.numel())
    assert torch.equal(model.blocks[0].attn_norm.weight, torch.ones(config.d_model))


def test_generator_makes_init_reproducible_without_touching_global_rng() -> None:
    state = torch.get_rng_state()
    a, b, c = make_model(seed=7), make_model(seed=7), make_model(seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    for (name, pa), pb, pc in zip(
        a.state_dict().items(), b.state_dict().values(), c.state_dict().values(), strict=True
    ):
        assert torch.equal(pa, pb), name
        if not name.endswith("norm.weight"):
            assert not torch.equal(pa, pc), name


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_save_and_load_round_trip_is_bit_exact(tmp_path, tie: bool, causal: bool) -> None:
    model = make_model(seed=9, tie_embeddings=tie, causal=causal)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = Transformer.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, restored[name]), name
    if tie:
        assert loaded.lm_head.weight is loaded.tok_embeddings.weight
    ids = random_ids(2, 9, seed=10)
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])
    assert torch.equal(
        model(input_ids=ids, attention_mask=mask), loaded(input_ids=ids, attention_mask=mask)
    )


def test_from_pretrained_reports_missing_and_corrupt_files(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        Transformer.from_pretrained(tmp_path / "nowhere")
    make_model().save_pretrained(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(ValueError, match="safetensors"):
        Transformer.from_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Transformer.from_pretrained(tmp_path / "ckpt")


def test_from_pretrained_rejects_weights_of_another_shape(tmp_path) -> None:
    make_model(d_model=32).save_pretrained(tmp_path / "a")
    make_model(d_model=16).save_pretrained(tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").replace(tmp_path / "a" / "model.safetensors")
    with pytest.raises(ValueError, match="wrong shape"):
        Transformer.from_pretrained(tmp_path / "a")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_and_default_ffn_size(name: str) -> None:
    config = ModelConfig.from_preset(name, vocab_size=VOCAB, mask_token_id=MASK_ID)
    for key, value in PRESETS[name].items():
        assert getattr(config, key) == value
    assert config.d_ff % 64 == 0
    assert config.d_ff - 64 < round(8 * config.d_model / 3) <= config.d_ff


def test_preset_overrides_and_unknown_preset() -> None:
    config = ModelConfig.from_preset("tiny", vocab_size=VOCAB, causal=True, n_layers=3)
    assert (config.d_model, config.n_layers, config.causal) == (128, 3, True)
    with pytest.raises(ValueError, match="'base', 'small', 'tiny'"):
        ModelConfig.from_preset("huge", vocab_size=VOCAB, mask_token_id=MASK_ID)


def test_config_dict_round_trip_and_unknown_keys() -> None:
    config = make_config(d_ff=96, tie_embeddings=True)
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown keys \\['n_embd'\\]"):
        ModelConfig.from_dict({**config.to_dict(), "n_embd": 32})
    with pytest.raises(ValueError, match="vocab_size"):
        ModelConfig.from_preset("tiny", mask_token_id=0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mask_token_id": None}, "mask_token_id is required"),
        ({"d_model": 30, "n_heads": 4}, "not divisible by n_heads"),
        ({"d_model": 30, "n_heads": 2}, "odd"),
        ({"mask_token_id": VOCAB}, "mask_token_id=13"),
        ({"n_layers": 0}, "n_layers must be a positive integer"),
        ({"d_ff": 0}, "d_ff"),
        ({"norm_eps": 0.0}, "norm_eps"),
    ],
)
def test_config_validation(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_config(**overrides)


def test_causal_config_needs_no_mask_id() -> None:
    assert make_config(causal=True, mask_token_id=None).mask_token_id is None


def test_input_errors() -> None:
    model = make_model()
    with pytest.raises(ValueError, match="max_seq_len=24"):
        model(input_ids=random_ids(1, 25, seed=11))
    with pytest.raises(ValueError, match="outside"):
        model(input_ids=torch.full((1, 4), VOCAB))
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(input_ids=random_ids(1, 4, seed=12), attention_mask=torch.ones(1, 5))
    with pytest.raises(ValueError, match="long tensor"):
        model(input_ids=random_ids(1, 4, seed=13).float())


def test_id_range_is_checked_on_the_host_and_on_a_device_only_when_asked(monkeypatch) -> None:
    """Off the CPU the range check would read a device value back (a sync every forward): it
    is skipped there unless `check_device_ids` is set. A meta tensor has no values to read,
    so reading one raises; skipping the check does not."""
    model = make_model()
    bad = torch.full((1, 4), VOCAB)
    with pytest.raises(ValueError, match=r"outside \[0, vocab_size=13\)"):
        model._check_inputs(bad, None)
    model._check_inputs(bad.to("meta"), None)
    monkeypatch.setattr(Transformer, "check_device_ids", True)
    with pytest.raises(RuntimeError, match="meta"):
        model._check_inputs(bad.to("meta"), None)
    with pytest.raises(ValueError, match="outside"):
        model(input_ids=torch.full((1, 4), -1))


def test_network_does_not_condition_on_t() -> None:
    assert Transformer.conditions_on_t is False
