"""GPT-2 import (stackformer.gpt2): a synthetic GPT-2-named state dict round-trips, and where
`transformers` is installed a random GPT2LMHeadModel and its import agree on logits and greedy
generation."""
import numpy as np
import pytest

import stackformer as sf
from stackformer.gpt2 import from_gpt2_state_dict, gpt2_config, load_gpt2_safetensors

GPT2_LIKE = dict(vocab_size=100, d_model=64, n_heads=4, n_layers=3, max_seq_len=64, pos="learned",
                 activation="gelu_tanh", norm="layernorm", norm_position="pre", bias=True,
                 final_norm=True, tie_embeddings=True, norm_eps=1e-5)


def gpt2_model(seed=0, **kw):
    model = sf.Model(sf.Config(**{**GPT2_LIKE, **kw}), seed=seed)
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters().items():  # make biases and LN params non-trivial
        if name.endswith(".bias") or "norm" in name:
            p += 0.1 * rng.standard_normal(p.shape).astype(np.float32)
    return model


def to_gpt2_names(model, prefix="transformer.", with_mask_buffers=True):
    """The inverse mapping: stackformer weights -> GPT-2 names, Conv1D (in, out) orientation,
    q/k/v fused into c_attn (and the causal-mask buffers old checkpoints carry)."""
    p = model.state_dict()
    c = model.config
    sd = {prefix + "wte.weight": p["tok_emb.weight"], prefix + "wpe.weight": p["pos_emb.weight"]}
    for i in range(c.n_layers):
        L, h = f"layers.{i}.", f"{prefix}h.{i}."
        sd[h + "ln_1.weight"], sd[h + "ln_1.bias"] = p[L + "attn_norm.weight"], p[L + "attn_norm.bias"]
        sd[h + "attn.c_attn.weight"] = np.concatenate(
            [p[L + f"attn.{x}_proj.weight"] for x in "qkv"], axis=0).T.copy()
        sd[h + "attn.c_attn.bias"] = np.concatenate([p[L + f"attn.{x}_proj.bias"] for x in "qkv"])
        sd[h + "attn.c_proj.weight"] = p[L + "attn.o_proj.weight"].T.copy()
        sd[h + "attn.c_proj.bias"] = p[L + "attn.o_proj.bias"]
        sd[h + "ln_2.weight"], sd[h + "ln_2.bias"] = p[L + "mlp_norm.weight"], p[L + "mlp_norm.bias"]
        sd[h + "mlp.c_fc.weight"] = p[L + "mlp.up_proj.weight"].T.copy()
        sd[h + "mlp.c_fc.bias"] = p[L + "mlp.up_proj.bias"]
        sd[h + "mlp.c_proj.weight"] = p[L + "mlp.down_proj.weight"].T.copy()
        sd[h + "mlp.c_proj.bias"] = p[L + "mlp.down_proj.bias"]
        if with_mask_buffers:
            sd[h + "attn.bias"] = np.tril(np.ones((c.max_seq_len, c.max_seq_len), np.float32))[None, None]
            sd[h + "attn.masked_bias"] = np.array(-1e4, np.float32)
    sd[prefix + "ln_f.weight"], sd[prefix + "ln_f.bias"] = p["final_norm.weight"], p["final_norm.bias"]
    if prefix:  # GPT2LMHeadModel's state_dict also lists the (tied) head
        sd["lm_head.weight"] = p["lm_head.weight"] if "lm_head.weight" in p else p["tok_emb.weight"]
    return sd


def assert_same_model(got, want):
    assert got.config == want.config
    sd = want.state_dict()
    assert list(got.state_dict()) == list(sd)
    for k, v in got.state_dict().items():
        assert np.array_equal(v, sd[k]), k


@pytest.mark.parametrize("prefix", ["transformer.", ""])
def test_synthetic_state_dict_round_trips(prefix):
    model = gpt2_model()
    got = from_gpt2_state_dict(to_gpt2_names(model, prefix), n_head=4)
    assert_same_model(got, model)
    x = np.random.default_rng(1).integers(0, 100, size=(2, 20))
    assert np.array_equal(got(x, n_threads=1).logits, model(x, n_threads=1).logits)


def test_torch_tensors_and_untied_head():
    torch = pytest.importorskip("torch")
    model = gpt2_model(tie_embeddings=False)
    sd = {k: torch.from_numpy(v) for k, v in to_gpt2_names(model).items()}
    assert_same_model(from_gpt2_state_dict(sd, n_head=4), model)
    # half precision checkpoints load (rounded to the stored values)
    half = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    got = from_gpt2_state_dict(half, n_head=4)
    assert np.array_equal(got.tok_emb.weight, sd["transformer.wte.weight"].to(torch.bfloat16).float().numpy())


def test_n_head_and_config():
    model = gpt2_model()
    sd = to_gpt2_names(model, with_mask_buffers=False)
    with pytest.raises(ValueError, match="n_head"):
        from_gpt2_state_dict(sd)  # d_model 64: no default
    with pytest.raises(ValueError, match="divide"):
        from_gpt2_state_dict(sd, n_head=5)
    cfg = gpt2_config(sd, config={"n_head": 4, "layer_norm_epsilon": 1e-6, "activation_function": "gelu_new"})
    assert (cfg.n_heads, cfg.norm_eps, cfg.activation, cfg.d_ff, cfg.max_seq_len) == (4, 1e-6, "gelu_tanh", 256, 64)
    with pytest.raises(ValueError, match="activation_function"):
        gpt2_config(sd, config={"n_head": 4, "activation_function": "silu"})
    big = sf.Model(sf.Config(**{**GPT2_LIKE, "d_model": 768, "n_heads": 12, "n_layers": 1,
                                "vocab_size": 8, "max_seq_len": 4, "d_ff": 8}))
    assert gpt2_config(to_gpt2_names(big)).n_heads == 12  # GPT-2 small's default


def test_bad_state_dicts():
    sd = to_gpt2_names(gpt2_model(), prefix="")
    with pytest.raises(KeyError, match="wte"):
        from_gpt2_state_dict({k: v for k, v in sd.items() if k != "wte.weight"}, n_head=4)
    with pytest.raises(KeyError, match="h.1.mlp.c_fc.bias"):
        from_gpt2_state_dict({k: v for k, v in sd.items() if k != "h.1.mlp.c_fc.bias"}, n_head=4)
    with pytest.raises(ValueError, match="unexpected"):
        from_gpt2_state_dict({**sd, "h.0.crossattention.q_attn.weight": sd["wte.weight"]}, n_head=4)
    with pytest.raises(ValueError, match="c_attn"):
        from_gpt2_state_dict({**sd, "h.0.attn.c_attn.weight": sd["h.0.attn.c_attn.weight"][:, :-1]}, n_head=4)
    with pytest.raises(ValueError, match="h.0 ... "):
        from_gpt2_state_dict({k: v for k, v in sd.items() if not k.startswith("h.1.")}, n_head=4)


def test_load_safetensors_with_config_json(tmp_path):
    import json

    from safetensors.numpy import save_file
    model = gpt2_model()
    save_file(to_gpt2_names(model, prefix=""), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"n_head": 4, "model_type": "gpt2"}))
    assert_same_model(load_gpt2_safetensors(str(tmp_path / "model.safetensors")), model)
    assert_same_model(load_gpt2_safetensors(str(tmp_path / "model.safetensors"), n_head=4), model)


# ------------------------------------------------------------------------------------------------
# against Hugging Face transformers
# ------------------------------------------------------------------------------------------------

def hf_gpt2(n_layer=3, seed=0):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=100, n_positions=64, n_embd=64, n_layer=n_layer, n_head=4,
                                  initializer_range=0.1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # LayerNorms at init are (1, 0): perturb them so they are tested too
        for name, p in hf.named_parameters():
            if "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return torch, hf


@pytest.mark.parametrize("n_layer", [2, 4])
def test_matches_transformers_logits_and_greedy_generation(n_layer):
    torch, hf = hf_gpt2(n_layer)
    model = from_gpt2_state_dict(hf.state_dict(), config=hf.config)
    assert model.config.tie_embeddings and model.config.n_heads == 4 and model.config.n_layers == n_layer
    x = np.random.default_rng(0).integers(0, 100, size=(2, 24))
    with torch.no_grad():
        want = hf(torch.from_numpy(x)).logits.numpy()
    got = model(x, n_threads=1).logits
    assert np.abs(want).max() > 0.5  # far from uniform
    assert np.abs(got - want).max() <= 1e-4

    prompt = x[:, :8]
    ids = torch.from_numpy(prompt)
    with torch.no_grad():
        for _ in range(32):  # greedy decoding with the HF model, no cache
            ids = torch.cat([ids, hf(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    gen = model.generate(prompt, 32, temperature=0)
    assert np.array_equal(gen, ids.numpy())
    # the bare GPT2Model naming of published checkpoints (no prefix, no lm_head) works too
    bare = {k[len("transformer."):]: v for k, v in hf.state_dict().items() if k.startswith("transformer.")}
    assert_same_model(from_gpt2_state_dict(bare, n_head=4), model)


def test_save_pretrained_directory(tmp_path):
    """What a user has on disk after `save_pretrained`: model.safetensors + config.json."""
    torch, hf = hf_gpt2(2, seed=1)
    hf.save_pretrained(str(tmp_path))
    model = load_gpt2_safetensors(str(tmp_path / "model.safetensors"))  # n_head from config.json
    assert model.config.n_heads == 4
    x = np.random.default_rng(2).integers(0, 100, size=(1, 40))
    with torch.no_grad():
        want = hf(torch.from_numpy(x)).logits.numpy()
    assert np.abs(model(x, n_threads=1).logits - want).max() <= 1e-4
