"""Bit-identity check for refactors: one SHA-256 per config over logits, traces, loss,
gradients, the two-phase/direct Block AttnRes paths, checkpointed backward, cached generation
and three AdamW steps. Configs whose name ends in "_perturbed" first move every depth-wiring
tensor (the ones that start at an identity: mHC/HC maps, DenseFormer weights, AttnRes queries)
off its init by seeded noise, so the hash sees the wiring's arithmetic away from the identity.

    python tools/bits_hash.py > before.txt   # on the old tree
    python tools/bits_hash.py > after.txt    # on the new tree
    diff before.txt after.txt                # empty = same bits

Runs with 1 and 2 threads (results must not depend on the thread count either)."""
import hashlib
import sys

import numpy as np

import stackformer as sf

BASE = dict(vocab_size=64, d_model=32, n_heads=4, n_layers=3, max_seq_len=16)
CONFIGS = {
    "plain": {},
    "plain_post_rms_swiglu_rope": dict(norm_position="post", norm="rmsnorm", activation="swiglu", pos="rope"),
    "plain_gqa_encoder": dict(n_kv_heads=2, causal=False, pos="sinusoidal", bias=False),
    "plain_untied_nofinal_relu": dict(tie_embeddings=False, final_norm=False, activation="relu"),
    "full": dict(residual="attnres_full"),
    "full_rms_rope": dict(residual="attnres_full", norm="rmsnorm", pos="rope", activation="gelu_tanh"),
    "block2": dict(residual="attnres_block", attnres_block_size=2),
    "block4_layers5": dict(residual="attnres_block", attnres_block_size=4, n_layers=5),
    "block3_post": dict(residual="attnres_block", attnres_block_size=3, norm_position="post"),
    "moda": dict(moda=True),
    "moda_chunk4_gqa": dict(moda=True, moda_chunk=4, n_kv_heads=2),
    "moda_depth_only_post": dict(moda=True, moda_depth_only=True, norm_position="post"),
    "moda_full": dict(moda=True, residual="attnres_full"),
    "moda_block2_encoder": dict(moda=True, residual="attnres_block", attnres_block_size=2, causal=False),
    "dropout_block": dict(residual="attnres_block", attnres_block_size=2, attn_dropout=0.1, resid_dropout=0.2),
    "dropout_moda": dict(moda=True, attn_dropout=0.1, resid_dropout=0.1),
    "denseformer": dict(residual="denseformer"),
    "denseformer_k2_p2_post_moda": dict(residual="denseformer", denseformer_dilation=2, denseformer_period=2,
                                        norm_position="post", moda=True),
    "hyper_connections": dict(residual="hyper_connections"),
    "hyper_static_n2_post_rms_moda": dict(residual="hyper_connections", hc_dynamic=False, hc_expansion=2,
                                          norm_position="post", norm="rmsnorm", moda=True),
    "mhc": dict(residual="mhc"),
    "mhc_n2_it5_post_moda": dict(residual="mhc", hc_expansion=2, mhc_sinkhorn_iters=5,
                                 norm_position="post", moda=True),
    "bf16_plain": dict(compute_dtype="bfloat16"),
    "bf16_swiglu_rope_untied_gqa": dict(compute_dtype="bfloat16", activation="swiglu", pos="rope",
                                        tie_embeddings=False, n_kv_heads=2),
    "bf16_moda_full": dict(compute_dtype="bfloat16", moda=True, residual="attnres_full"),
    "bf16_mhc_post_relu": dict(compute_dtype="bfloat16", residual="mhc", norm_position="post", activation="relu"),
    # issue 20 ablation knobs
    "moda_rope_none": dict(moda=True, pos="rope"),
    "moda_rope_own_chunk2_gqa": dict(moda=True, pos="rope", moda_depth_rope="own", moda_chunk=2, n_kv_heads=2),
    "moda_rope_legacy_post": dict(moda=True, pos="rope", moda_depth_rope="legacy", norm_position="post"),
    "moda_rope_none_full_chunk3": dict(moda=True, pos="rope", residual="attnres_full", moda_chunk=3),
    "moda_kv_attn_rope": dict(moda=True, pos="rope", moda_depth_kv="attn"),
    "full_no_key_norm": dict(residual="attnres_full", attnres_key_norm=False),
    "full_sigmoid_rope": dict(residual="attnres_full", attnres_mixing="sigmoid", pos="rope"),
    "block2_sigmoid_post_moda": dict(residual="attnres_block", attnres_block_size=2, attnres_mixing="sigmoid",
                                     norm_position="post", moda=True),
    "block3_no_key_norm_post_moda": dict(residual="attnres_block", attnres_block_size=3, attnres_key_norm=False,
                                         norm_position="post", moda=True),
    "moda_kv_extra_chunk2_gqa": dict(moda=True, moda_depth_kv="attn+ffn+extra", moda_chunk=2, n_kv_heads=2),
    "moda_kv_extra_rope_own_post_block2": dict(moda=True, moda_depth_kv="attn+ffn+extra", pos="rope",
                                               moda_depth_rope="own", norm_position="post",
                                               residual="attnres_block", attnres_block_size=2),
    # away from the identity init (see the module docstring)
    "mhc_perturbed": dict(residual="mhc"),
    "mhc_n2_post_moda_perturbed": dict(residual="mhc", hc_expansion=2, norm_position="post", moda=True),
    "hc_dynamic_perturbed": dict(residual="hyper_connections", hc_dynamic=True),
    "denseformer_perturbed": dict(residual="denseformer"),
    "full_perturbed": dict(residual="attnres_full"),
}

WIRING_TENSORS = ("_hc.", "_mhc.", "dwa.", "res_proj", "res_norm")


def perturb(m):
    """Seeded noise on every depth-wiring tensor (its name names the wiring), in place."""
    rng = np.random.default_rng(11)
    moved = [p for k, p in m.named_parameters().items() if any(w in k for w in WIRING_TENSORS)]
    assert moved, "no wiring tensor found to perturb"
    for p in moved:
        p += (0.3 * rng.standard_normal(p.shape)).astype(np.float32)


def digest(name, overrides, n_threads):
    cfg = sf.Config(**{**BASE, **overrides})
    m = sf.Model(cfg, seed=3)
    if name.endswith("_perturbed"):
        perturb(m)
    rng = np.random.default_rng(7)
    x = rng.integers(0, cfg.vocab_size, (2, 12))
    y = rng.integers(0, cfg.vocab_size, (2, 12))
    h = hashlib.sha256()

    def add(a):
        a = np.ascontiguousarray(np.asarray(a))
        h.update(str(a.shape).encode() + a.tobytes())

    out = m(x, trace=True, n_threads=n_threads)
    add(out.logits)
    tr = out.trace
    for field in ("attention", "hidden", "attn_out", "mlp_out", "alpha", "depth_mass"):
        for a in getattr(tr, field) or []:
            if a is not None:
                add(a)
    if tr.rms is not None:
        add(tr.rms)
    if cfg.residual == "attnres_block":
        add(m(x, attnres_two_phase=False, n_threads=n_threads).logits)
    add(m(x, return_hidden=True, n_threads=n_threads).hidden_states)
    for ckpt in (False, True):
        loss = m.forward_backward(x, y, checkpoint=ckpt, n_threads=n_threads, dropout_seed=5)
        add(np.float32(loss))
        for k, g in sorted(m.grads.items()):
            add(g)
    for _ in range(3):
        add(np.float32(m.train_step(x, y, lr=3e-3, n_threads=n_threads, dropout_seed=1)))
    for k, p in sorted(m.state_dict().items()):
        add(p)
    if cfg.causal:
        add(m.generate(x[0, :4], 6, temperature=0.0))
    return h.hexdigest()[:24]


def main():
    for name, ov in CONFIGS.items():
        d1 = digest(name, ov, 1)
        d2 = digest(name, ov, 2)
        flag = "" if d1 == d2 else "  THREAD-DEPENDENT"
        print(f"{name:30s} {d1}{flag}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
