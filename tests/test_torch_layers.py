"""stackformer against PyTorch's own layers (not our mirror): nn.TransformerEncoderLayer in both
norm placements, and F.scaled_dot_product_attention, with the same weights."""
import numpy as np
import pytest

import stackformer as sf

torch = pytest.importorskip("torch")


def _encoder_pair(norm_first, activation, causal, seed=0):
    d, H, F = 32, 4, 64
    cfg = sf.Config(vocab_size=7, d_model=d, n_heads=H, n_layers=1, d_ff=F, max_seq_len=16,
                    causal=causal, pos="none", activation=activation,
                    norm_position="pre" if norm_first else "post", final_norm=False)
    m = sf.Model(cfg, seed=seed)
    rng = np.random.default_rng(seed)
    for name, v in m.named_parameters().items():  # non-trivial weights everywhere
        v[:] = (1 + 0.1 * rng.normal(size=v.shape)) if "norm" in name else rng.normal(0, 0.2, v.shape)
    layer = torch.nn.TransformerEncoderLayer(d, H, dim_feedforward=F, dropout=0.0,
                                             activation=activation, batch_first=True,
                                             norm_first=norm_first).double().eval()
    sd = {k: torch.tensor(v, dtype=torch.float64) for k, v in m.state_dict().items()}
    p = "layers.0."
    with torch.no_grad():
        layer.self_attn.in_proj_weight.copy_(torch.cat([sd[p + "attn.q_proj.weight"], sd[p + "attn.k_proj.weight"], sd[p + "attn.v_proj.weight"]]))
        layer.self_attn.in_proj_bias.copy_(torch.cat([sd[p + "attn.q_proj.bias"], sd[p + "attn.k_proj.bias"], sd[p + "attn.v_proj.bias"]]))
        layer.self_attn.out_proj.weight.copy_(sd[p + "attn.o_proj.weight"])
        layer.self_attn.out_proj.bias.copy_(sd[p + "attn.o_proj.bias"])
        layer.linear1.weight.copy_(sd[p + "mlp.up_proj.weight"])
        layer.linear1.bias.copy_(sd[p + "mlp.up_proj.bias"])
        layer.linear2.weight.copy_(sd[p + "mlp.down_proj.weight"])
        layer.linear2.bias.copy_(sd[p + "mlp.down_proj.bias"])
        layer.norm1.weight.copy_(sd[p + "attn_norm.weight"])
        layer.norm1.bias.copy_(sd[p + "attn_norm.bias"])
        layer.norm2.weight.copy_(sd[p + "mlp_norm.weight"])
        layer.norm2.bias.copy_(sd[p + "mlp_norm.bias"])
    return m, layer


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "norm_first"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "causal"])
def test_matches_transformer_encoder_layer(norm_first, activation, causal):
    m, layer = _encoder_pair(norm_first, activation, causal)
    x = np.random.default_rng(1).normal(size=(3, 9, 32)).astype(np.float32)
    mask = np.ones((3, 9), bool)
    mask[1, 6:] = False  # padding in one row (encoder batches)
    ours = m(x, return_hidden=True, key_padding_mask=mask).hidden_states
    kw = dict(src_key_padding_mask=torch.tensor(~mask))
    if causal:
        kw["src_mask"] = torch.nn.Transformer.generate_square_subsequent_mask(9, dtype=torch.float64)
        kw["is_causal"] = True
    with torch.no_grad():
        ref = layer(torch.tensor(x, dtype=torch.float64), **kw).numpy()
    real = mask[:, :, None].repeat(32, axis=2)  # torch's fast path may zero padded rows
    assert np.abs(ours - ref)[real].max() < 1e-4


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_sdpa(n_kv_heads, causal):
    """The attention probabilities stackformer traces, applied to its own V, equal SDPA."""
    cfg = sf.Config(vocab_size=11, d_model=32, n_heads=4, n_kv_heads=n_kv_heads, n_layers=1,
                    max_seq_len=16, causal=causal, pos="rope")
    m = sf.Model(cfg, seed=0)
    rng = np.random.default_rng(2)
    for v in m.named_parameters().values():
        v[:] = rng.normal(0, 0.3, v.shape)
    toks = rng.integers(0, 11, size=(2, 10))
    tr = m(toks, trace=True).trace
    # q, k, v recomputed from the traced block input in float64
    sd = {k: v.astype(np.float64) for k, v in m.state_dict().items()}
    h = tr.hidden[0].astype(np.float64)
    mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    u = (h - mu) / np.sqrt(var + cfg.norm_eps) * sd["layers.0.attn_norm.weight"] + sd["layers.0.attn_norm.bias"]
    def proj(n):
        return u @ sd[f"layers.0.attn.{n}_proj.weight"].T + sd[f"layers.0.attn.{n}_proj.bias"]
    q = torch.tensor(proj("q")).view(2, 10, 4, 8).transpose(1, 2)
    k = torch.tensor(proj("k")).view(2, 10, n_kv_heads, 8).transpose(1, 2)
    v = torch.tensor(proj("v")).view(2, 10, n_kv_heads, 8).transpose(1, 2)
    # RoPE, half-split convention
    pos = torch.arange(10, dtype=torch.float64)[:, None]
    inv = 10000.0 ** (-torch.arange(4, dtype=torch.float64) * 2 / 8)
    cos, sin = torch.cos(pos * inv), torch.sin(pos * inv)
    def rope(t):
        a, b = t[..., :4], t[..., 4:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)
    q, k = rope(q), rope(k)
    G = 4 // n_kv_heads
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal).numpy()
    probs = tr.attention[0].astype(np.float64)
    ours = probs @ v.numpy()
    assert np.abs(ours - out).max() < 1e-5
