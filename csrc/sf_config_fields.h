/* Every configuration field, once: the C struct (sf.h), its defaults and per-field range checks
 * (sf_config.c), the binding's keyword parsing and the Python Config dataclass
 * (stackformer.config) are all generated from this list. Adding a knob = one line here, its
 * cross-field rules (if any) in sf_config_validate, and the code that uses it.
 *
 * SF_FIELD(c_name, py_name, kind, default, lo, hi, choices, doc)
 *   kind INT  int64_t, lo <= x <= hi; default SF_DERIVED = computed from other fields
 *             (Python: None), see sf_config_default
 *        BOOL int32_t 0 or 1
 *        ENUM int32_t index into choices ('|'-separated, in the C enum's order)
 *        REAL float, lo < x < hi (checked after rounding to float32)
 *        PROB float, lo <= x < hi
 * The order is the Python dataclass's order (positional arguments). No include guard: the
 * includer defines SF_FIELD. */
SF_FIELD(vocab_size, vocab_size, INT, 256, 1, SF_DIM_MAX, "", "vocabulary size (byte-level text: 256)")
SF_FIELD(d_model, d_model, INT, 128, 1, SF_DIM_MAX, "", "model width d = n_heads * d_head")
SF_FIELD(n_heads, n_heads, INT, 4, 1, SF_DIM_MAX, "", "attention (query) heads; d_model % n_heads == 0")
SF_FIELD(n_layers, n_layers, INT, 4, 1, 4096, "", "transformer blocks, each an attention and an MLP sublayer (L = 2 n_layers sublayers)")
SF_FIELD(max_seq_len, max_seq_len, INT, 256, 1, SF_DIM_MAX, "", "longest sequence (learned positions, caches)")
SF_FIELD(n_kv_heads, n_kv_heads, INT, SF_DERIVED, 1, SF_DIM_MAX, "", "grouped-query attention key/value heads (None = n_heads); n_heads % n_kv_heads == 0")
SF_FIELD(d_ff, d_ff, INT, SF_DERIVED, 1, SF_DIM_MAX, "", "MLP hidden width (None = 4 d_model)")
SF_FIELD(causal, causal, BOOL, 1, 0, 1, "", "True: decoder (causal mask); False: encoder (bidirectional)")
SF_FIELD(pos, pos, ENUM, 1, 0, 3, "none|learned|sinusoidal|rope", "positions: none, learned table, sinusoidal, or RoPE on queries/keys")
SF_FIELD(act, activation, ENUM, 0, 0, 3, "gelu|gelu_tanh|relu|swiglu", "MLP activation (gelu is the exact erf form)")
SF_FIELD(norm, norm, ENUM, 0, 0, 1, "layernorm|rmsnorm", "normalisation layer")
SF_FIELD(pre_norm, norm_position, ENUM, 1, 0, 1, "post|pre", "pre-norm (norm before each sublayer) or post-norm (after each residual add)")
SF_FIELD(bias, bias, BOOL, 1, 0, 1, "", "biases in linears and LayerNorms")
SF_FIELD(final_norm, final_norm, BOOL, 1, 0, 1, "", "a norm before the head")
SF_FIELD(tie_embeddings, tie_embeddings, BOOL, 1, 0, 1, "", "the head shares tok_emb.weight")
SF_FIELD(norm_eps, norm_eps, REAL, 1e-5, 0, 1, "", "epsilon of the norms")
SF_FIELD(rope_theta, rope_theta, REAL, 10000.0, 1, 1e30, "", "RoPE base")
SF_FIELD(residual, residual, ENUM, 0, 0, SF_NUM_WIRINGS - 1, SF_WIRING_CHOICES, "depth wiring (csrc/wiring/): plain residual stream; Attention Residuals over all sublayer outputs (full) or over blocks of attnres_block_size sublayers (block); DenseFormer depth-weighted averages after blocks; Hyper-Connections over hc_expansion copies of the stream, and mHC with its doubly-stochastic residual mixing")
SF_FIELD(attnres_block_size, attnres_block_size, INT, 4, 1, 65536, "", "Block AttnRes: sublayers per block (S)")
SF_FIELD(attnres_eps, attnres_eps, REAL, 1e-6, 0, 1, "", "epsilon of the RMS norm on AttnRes keys")
SF_FIELD(denseformer_dilation, denseformer_dilation, INT, 1, 1, 4096, "", "DenseFormer: block i averages the outputs j with j = i+1 (mod dilation)")
SF_FIELD(denseformer_period, denseformer_period, INT, 1, 1, 4096, "", "DenseFormer: a depth-weighted average after every period-th block only")
SF_FIELD(hc_expansion, hc_expansion, INT, 4, 1, 16, "", "Hyper-Connections and mHC: copies of the residual stream (the papers' expansion rate n; mHC needs n >= 2)")
SF_FIELD(hc_dynamic, hc_dynamic, BOOL, 0, 0, 1, "", "Hyper-Connections: input-dependent (dynamic, DHC) connection weights on top of the static ones (SHC)")
SF_FIELD(mhc_sinkhorn_iters, mhc_sinkhorn_iters, INT, 20, 1, 1000, "", "mHC: Sinkhorn-Knopp passes (column then row normalisation) projecting the residual mixing matrix (the paper's t_max)")
SF_FIELD(moda, moda, BOOL, 0, 0, 1, "", "Mixture-of-Depths Attention: heads also attend to keys/values earlier layers wrote at the same position")
SF_FIELD(moda_chunk, moda_chunk, INT, 1, 1, SF_DIM_MAX, "", "MoDA: depth slots visible within chunks of this many positions (1 = same position only; <= max_seq_len)")
SF_FIELD(moda_depth_only, moda_depth_only, BOOL, 0, 0, 1, "", "MoDA ablation: heads attend to depth slots only (needs moda)")
SF_FIELD(attn_dropout, attn_dropout, PROB, 0.0, 0, 1, "", "dropout on attention probabilities (training steps only)")
SF_FIELD(resid_dropout, resid_dropout, PROB, 0.0, 0, 1, "", "dropout on every sublayer's output (training steps only)")
SF_FIELD(compute_dtype, compute_dtype, ENUM, 0, 0, 1, "float32|bfloat16", "operands of the Linear products (forward, input and weight gradients, head): float32, or bfloat16 (round-to-nearest-even, fp32 accumulation, VDPBF16PS semantics; weights converted once per call from the fp32 master copy); everything else stays float32. Without AVX512_BF16 an emulated kernel gives the same bits, slowly (sf.bf16_kernel())")
SF_FIELD(moda_depth_kv, moda_depth_kv, ENUM, 1, 0, 2, "attn|attn+ffn|attn+ffn+extra", "MoDA depth slots (MoDA Table 3 rows 3-5): attn = each attention sublayer's own K/V only; attn+ffn = also an FFN slot from its input (depth_k/v_proj); attn+ffn+extra = the attention sublayer writes its slot from extra projections of its input (attn.depth_k/v_proj) instead of its sequence K/V")
SF_FIELD(moda_depth_rope, moda_depth_rope, ENUM, 1, 0, 2, "legacy|none|own", "MoDA with pos='rope': how depth logits see positions. none: depth keys and the query's depth logits are never rotated (attention slots hold pre-RoPE keys; offset-blind); own: every depth key is rotated at its own position, like the query (the logit sees t - u); legacy: attention slots rotated, FFN slots not (before issue 20; old checkpoints)")
SF_FIELD(attnres_key_norm, attnres_key_norm, BOOL, 1, 0, 1, "", "AttnRes: RMSNorm (with a learned gain) on the keys before the pseudo-query dot product; False = the paper's Table 4 ablation without it (s_i = w . v_i, no *_res_norm tensors)")
SF_FIELD(attnres_mixing, attnres_mixing, ENUM, 0, 0, 2, "softmax|sigmoid|static", "AttnRes: depth weights from a softmax over the sources (the paper), or independent sigmoid gates alpha_i = sigmoid(s_i) (its Table 4 ablation; the weights then need not sum to 1), or static: input-independent weights softmax(b) from learned logits b per sublayer and source (its input-independent mixing row; no keys, so attnres_key_norm=False)")
SF_FIELD(attnres_query, attnres_query, ENUM, 0, 0, 1, "static|input", "AttnRes query: static = a learned pseudo-query per sublayer (the paper); input = q_t = W x_t projected (d x d, zero init) from the newest source the sublayer reads (the previous sublayer's output; Block: the running partial or newest block sum), Table 4's input-dependent query")
SF_FIELD(attnres_window, attnres_window, INT, 0, 0, 65536, "", "AttnRes sliding-window aggregation (Table 4's SWA row, W = 8): each read mixes the embedding (b_0) plus its last W other sources; None (0 in C) = all sources")
SF_FIELD(attnres_heads, attnres_heads, INT, 1, 1, SF_DIM_MAX, "", "multi-head AttnRes (Table 4's multihead row): d_model split into H contiguous heads, each with its own depth softmax over the same sources (one RMS key norm over the whole d); d_model % H == 0")
